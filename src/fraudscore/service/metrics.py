"""The service's metrics: ``GET /metrics`` in Prometheus's text exposition format.

The numbers are counted where the work is done and only formatted when scraped.  The native fast
path answers an ordinary scoring request in about 5 us, and a prometheus_client counter costs
about a microsecond per call, so no prometheus_client object is touched per request: the fast
path counts and times its answers in C (``_fastpath.c``, ``RequestMetrics``), the Python path
records each response with one call into the same C object, and at scrape time a collector
(``_Collector``) turns those arrays into prometheus_client's metric families.

Labels are bounded: a route is one of ``ROUTES`` or ``other`` (any other path), a status one of
HTTP's, an answerer ``native`` (the fast path) or ``python`` (httptools and the vectorizer).

An instance behind the balancer listens on a unix or handoff socket that Prometheus cannot
reach, so ``serve --metrics-port N`` also serves ``GET /metrics`` (and only that) on
``127.0.0.1:N`` through ``MetricsConnection``; ``fraudscore stack --metrics-port BASE`` gives
instance i the port BASE + i.  Each instance is scraped as its own target: its counts stay its
own, an instance that restarts is seen to restart, and nothing sits between Prometheus and it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, cast

import httptools
import orjson
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector

from fraudscore.errors import Category, category_of
from fraudscore.scorer import ScorerId, decision
from fraudscore.service import responses
from fraudscore.service._fastpath import LATENCY_BOUNDS, SEARCH_BOUNDS, RequestMetrics

log = logging.getLogger(__name__)

# the routes counted by name; every other path is counted as OTHER_ROUTE (a label per path would
# let any client grow the series without bound)
ROUTES = ("/fraud-score", "/ready", "/metrics", "/v1/score")
OTHER_ROUTE = "other"
METRICS_PATH = b"/metrics"
# who answered, in the order of _fastpath.c's enum: the native fast path, or httptools and Python
ANSWERERS = ("native", "python")
# the text format Prometheus 2.x reads; generate_latest writes it
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_TARGET_BYTES = 1024  # a scrape's request line is short: longer ones are not a scraper's


def category_of_status(status: int) -> Category | None:
    """The error category of an HTTP status, or None for a success.

    A 4xx is the client's (bad input, timeouts included: the request did not arrive in time); a
    503 says "later" (warming up, shutting down); any other 5xx is a bug of ours.

    >>> [category_of_status(s) for s in (200, 404, 408, 503, 500)]  # doctest: +NORMALIZE_WHITESPACE
    [None, <Category.BAD_INPUT: 'bad input'>, <Category.BAD_INPUT: 'bad input'>,
     <Category.TRANSIENT: 'transient'>, <Category.INTERNAL: 'internal'>]
    """
    if status < 400:
        return None
    if status < 500:
        return Category.BAD_INPUT
    return Category.TRANSIENT if status == 503 else Category.INTERNAL


# -- process-wide counts, for code that runs outside a request (model loading) -----------------

_model_loads: Counter[tuple[str, str, str]] = Counter()
_errors: Counter[Category] = Counter()


def model_loaded(name: str, version: str, ok: bool) -> None:
    """Count one attempt to load a model version (``fraudscore_model_loads_total``)."""
    _model_loads[name, version, "ok" if ok else "failed"] += 1


def count_error(exc: BaseException) -> None:
    """Count an error that is not answered to a client (a model that fails to load), by its
    category; errors answered to a client are counted by their status, so do not count those here."""
    _errors[category_of(exc)] += 1


# -- one service's metrics ----------------------------------------------------------------------


class ServiceMetrics:
    """What one service process counts, and its ``/metrics`` page."""

    def __init__(self, knn: ScorerId) -> None:
        self.knn = knn  # the contract's scorer: /fraud-score's decisions are its own
        self.native = RequestMetrics(tuple(r.encode() for r in ROUTES), responses.SCORES)
        self._decisions: Counter[tuple[str, str, str, str]] = Counter()
        # the decisions the fast path counted natively (/v1/score's: service/v1.py native_decisions)
        self.more_decisions: Callable[[], Counter[tuple[str, str, str, str]]] = Counter
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))
        ProcessCollector(registry=self.registry)  # CPU, memory, open files: read from /proc when scraped

    def decided(self, scorer: ScorerId, approved: bool, arm: str = "production") -> None:
        """Count a decision of a scorer other than /fraud-score's kNN (whose are counted natively),
        by the A/B arm that decided (``models.live``)."""
        self._decisions[scorer.name, scorer.version, _outcome(approved), arm] += 1

    def exposition(self) -> bytes:
        """Every metric, in the text format."""
        return generate_latest(self.registry)

    def response(self) -> bytes:
        """The whole HTTP response to ``GET /metrics``."""
        body = self.exposition()
        head = f"HTTP/1.1 200 OK\r\nContent-Type: {CONTENT_TYPE}\r\nContent-Length: {len(body)}\r\n\r\n"
        return head.encode("ascii") + body

    def decisions(self) -> Iterator[tuple[tuple[str, str, str, str], int]]:
        counts = cast(Sequence[int], self.native.snapshot()["decisions"])
        name, version = self.knn.name, self.knn.version
        knn: Counter[tuple[str, str, str, str]] = Counter(
            {(name, version, _outcome(ok), "production"): 0 for ok in (True, False)}
        )
        for frauds, count in enumerate(counts):
            knn[name, version, _outcome(decision(frauds)[0]), "production"] += count
        knn.update(self._decisions)  # one series per labels, whoever counted it
        knn.update(self.more_decisions())
        yield from knn.items()


def _outcome(approved: bool) -> str:
    return "approved" if approved else "denied"


def _route(slot: int) -> str:
    return ROUTES[slot] if slot < len(ROUTES) else OTHER_ROUTE


def _buckets(bounds: Sequence[float], counts: Sequence[int]) -> list[tuple[str, float]]:
    """Per-bucket counts → Prometheus's cumulative ``le`` buckets, ending with +Inf."""
    out: list[tuple[str, float]] = []
    total = 0
    for bound, count in zip([*(repr(b) for b in bounds), "+Inf"], counts, strict=True):
        total += count
        out.append((bound, total))
    return out


class _Collector:
    """Reads the native counts at scrape time and hands them to prometheus_client as families."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        snap: dict[str, Any] = self._metrics.native.snapshot()
        requests = CounterMetricFamily(
            "fraudscore_http_requests",
            "HTTP responses sent, by route, status and answerer (native fast path or python).",
            labels=["route", "status", "answerer"],
        )
        errors_by_category: Counter[Category] = Counter({c: 0 for c in Category})
        for answerer, slot, status, count in snap["requests"]:
            requests.add_metric([_route(slot), str(status), ANSWERERS[answerer]], count)
            category = category_of_status(status)
            if category is not None:
                errors_by_category[category] += count
        yield requests

        latency = HistogramMetricFamily(
            "fraudscore_http_request_duration_seconds",
            "Time from a request's first byte read to its response written, by route and answerer.",
            labels=["route", "answerer"],
        )
        for answerer, slot, (counts, total) in snap["latency"]:
            latency.add_metric([_route(slot), ANSWERERS[answerer]], _buckets(LATENCY_BOUNDS, counts), total)
        yield latency

        search = HistogramMetricFamily(
            "fraudscore_knn_search_duration_seconds",
            "Time of one exact 5-nearest-neighbour search, by answerer.",
            labels=["answerer"],
        )
        for answerer, (counts, total) in snap["search"]:
            search.add_metric([ANSWERERS[answerer]], _buckets(SEARCH_BOUNDS, counts), total)
        yield search

        decisions = CounterMetricFamily(
            "fraudscore_decisions",
            "Scoring decisions, by scorer, its version, outcome and A/B arm (production, candidate).",
            labels=["scorer", "version", "outcome", "arm"],
        )
        for labels, count in self._metrics.decisions():
            decisions.add_metric(list(labels), count)
        yield decisions

        errors = CounterMetricFamily(
            "fraudscore_errors",
            "Errors by category: error responses by their status, and errors outside any request.",
            labels=["category"],
        )
        for category in Category:
            errors.add_metric([category.value], errors_by_category[category] + _errors[category])
        yield errors

        loads = CounterMetricFamily(
            "fraudscore_model_loads",
            "Model versions loaded, by result.",
            labels=["model", "version", "result"],
        )
        for load, count in _model_loads.items():
            loads.add_metric(list(load), count)
        yield loads

        yield CounterMetricFamily(
            "fraudscore_fast_path_declined",
            "Reads the native fast path passed to the Python path (which then counts the response).",
            value=snap["declined"],
        )


# -- the metrics listener -------------------------------------------------------------------------


class Admin(Protocol):
    """The admin routes' work (``server.py`` gives the instance's ``models.live`` follower)."""

    def status(self) -> dict[str, Any]: ...
    async def reload(self) -> dict[str, Any]: ...


ADMIN_STATUS, ADMIN_RELOAD = b"/admin/status", b"/admin/reload"


def _loopback(transport: asyncio.BaseTransport) -> bool:
    peer = transport.get_extra_info("peername")
    try:
        return isinstance(peer, tuple) and ipaddress.ip_address(peer[0]).is_loopback
    except ValueError:
        return False


class MetricsConnection(asyncio.Protocol):
    """One connection to the metrics listener: ``GET /metrics``, and, with ``admin``, the admin
    routes ``GET /admin/status`` (JSON) and ``POST /admin/reload``; nothing else (404, 405).

    The admin routes live here because this listener is the instance's own (one per instance,
    where a balanced main listener reaches an arbitrary one) and binds 127.0.0.1 by default; they
    also answer loopback clients only (403), whatever ``--metrics-host`` says, since a reload is
    an operator's act."""

    def __init__(
        self, metrics: ServiceMetrics, connections: set[MetricsConnection], admin: Admin | None = None
    ) -> None:
        self._metrics = metrics
        self._admin = admin
        self._reloading: asyncio.Task[None] | None = None  # a POST /admin/reload in progress
        self._connections = connections
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url: list[bytes] = []
        self._url_size = 0
        self._started = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._connections.discard(self)
        self._transport = None

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self._send(responses.error(400, "malformed HTTP request", close=True), close=True)

    def on_message_begin(self) -> None:
        self._url = []
        self._url_size = 0
        self._started = time.monotonic()

    def on_url(self, url: bytes) -> None:
        self._url_size += len(url)
        if self._url_size > MAX_TARGET_BYTES:
            message = f"the URL is longer than {MAX_TARGET_BYTES} bytes"
            self._send(responses.error(414, message, close=True), close=True)
            raise httptools.HttpParserError("URL too long")
        self._url.append(url)

    def on_message_complete(self) -> None:
        path = b"".join(self._url).split(b"?", 1)[0]
        method = self._parser.get_method()
        if self._admin is not None and path in (ADMIN_STATUS, ADMIN_RELOAD):
            self._administer(path, method, not self._parser.should_keep_alive())
            return
        if path != METRICS_PATH:
            answer = responses.error(404, "not found: this listener serves GET /metrics only")
        elif method not in (b"GET", b"HEAD"):
            answer = responses.METRICS_METHOD
        else:
            answer = self._metrics.response()
        self._metrics.native.record(self._url, answer, self._started)
        if method == b"HEAD":
            answer = answer[: answer.index(b"\r\n\r\n") + 4]
        self._send(answer, close=not self._parser.should_keep_alive())

    def _administer(self, path: bytes, method: bytes, close: bool) -> None:
        admin, transport = self._admin, self._transport
        assert admin is not None
        started, url = self._started, list(self._url)
        if transport is None:
            return
        if not _loopback(transport):
            answer = responses.error(403, "the admin routes answer local clients only")
        elif path == ADMIN_STATUS and method not in (b"GET", b"HEAD"):
            answer = responses.response(
                405, {"error": "use GET for /admin/status"}, extra="Allow: GET, HEAD\r\n"
            )
        elif path == ADMIN_RELOAD and method != b"POST":
            answer = responses.response(405, {"error": "use POST for /admin/reload"}, extra="Allow: POST\r\n")
        elif path == ADMIN_STATUS:
            answer = responses.ok(orjson.dumps(admin.status()))
        else:

            async def reload() -> None:
                answer = responses.ok(orjson.dumps(await admin.reload()))
                self._metrics.native.record(url, answer, started)
                self._send(answer, close=close)

            self._reloading = asyncio.get_running_loop().create_task(reload())
            return
        self._metrics.native.record(url, answer, started)
        if method == b"HEAD":
            answer = answer[: answer.index(b"\r\n\r\n") + 4]
        self._send(answer, close=close)

    def _send(self, answer: bytes, *, close: bool = False) -> None:
        if self._transport is None:
            return
        self._transport.write(answer)
        if close:
            self._transport.close()
            self._transport = None

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
