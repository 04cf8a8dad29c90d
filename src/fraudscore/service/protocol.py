"""One HTTP/1.1 connection: httptools parses, the request is answered as soon as it is whole.

State is grouped by lifetime, as in uvicorn: the connection's (transport, parser, timer) lives
in ``HttpConnection``; a request's (url, body) is reset by ``on_message_begin``.  Scoring is
synchronous and takes microseconds, so there are no tasks: a request is answered inside
``on_message_complete`` and pipelined requests are answered in order by construction.

Two paths answer.  A read that is exactly one ordinary scoring request (``/fraud-score``, or
``/v1/score`` with the plan ``service/v1.py`` gives the fast path), arriving while the parser is
between requests, is answered by the native fast path (``_fastpath.c``) in one call;
for everything else that path declines and httptools with ``vectorize`` answer, as they define
what the answer is.  Both give the same bytes for what both accept (tests/test_fastpath.py).
Every response is counted and timed for ``GET /metrics`` (``metrics.py``): the fast path does it
in C, the Python path with one native call per response (``_record``), never prometheus_client.

No client can make a request's head cost more than a bounded amount of memory or time: the URL,
the header section and the number of headers have limits (``ServiceConfig``), answered with 414
or 431 and a close.  httptools reports the URL in pieces as they arrive, but keeps an unfinished
header to itself until it ends; so every read that falls wholly inside one request also counts
its non-body bytes, and a head that never ends reaches the limit instead of growing memory.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import NoReturn, cast

import httptools

from fraudscore.contract.vectorize import NORMALIZATION_KEYS, UNKNOWN_MCC_RISK, Constants
from fraudscore.scorer import KnnScorer
from fraudscore.service import responses
from fraudscore.service._fastpath import FastPath, RequestMetrics
from fraudscore.service.decode import read_payload, unsearchable
from fraudscore.service.metrics import METRICS_PATH
from fraudscore.service.state import ServiceConfig, ServiceState

log = logging.getLogger(__name__)

LINGER_SECONDS = 1.0
# what a request may spend outside its body beyond the URL and header limits: the request line's
# method and version, the blank line, and per chunk of a chunked body its size line and CRLFs
HEAD_SLACK_BYTES = 1024
CHUNK_FRAMING_BYTES = 64


class _Refused(Exception):
    """Raised from a parser callback once the request is refused, so httptools stops parsing it."""


def fast_path(
    scorer: KnnScorer,
    constants: Constants,
    max_body_bytes: int,
    metrics: RequestMetrics | None = None,
    *,
    max_url_bytes: int = ServiceConfig.max_url_bytes,
    max_headers: int = ServiceConfig.max_headers,
    max_header_bytes: int = ServiceConfig.max_header_bytes,
) -> FastPath:
    """The native answerer of ordinary scoring requests, with this service's data and answers:
    every constant of the vector comes from here, none is the C code's own.  It counts and times
    what it answers in ``metrics``, and declines a request over the URL or header limits (the
    Python path answers it 414 or 431)."""
    return FastPath(
        scorer.index.native,
        divisors={key: getattr(constants, key) for key in NORMALIZATION_KEYS},
        mcc_risk=constants.mcc_risk,
        unknown_mcc_risk=UNKNOWN_MCC_RISK,
        answers=responses.SCORES,
        max_body=max_body_bytes,
        metrics=metrics,
        max_url=max_url_bytes,
        max_headers=max_headers,
        max_header_bytes=max_header_bytes,
    )


class HttpConnection(asyncio.Protocol):
    __slots__ = (
        "_body",
        "_body_size",
        "_budget",
        "_closing",
        "_continue",
        "_counting",
        "_expect",
        "_header_bytes",
        "_headers",
        "_in_request",
        "_last_active",
        "_linger",
        "_method",
        "_parser",
        "_record",
        "_request_started",
        "_state",
        "_transport",
        "_url",
        "_url_size",
    )

    def __init__(self, state: ServiceState) -> None:
        self._state = state
        # record(url, response, started): one native call counts and times a response (metrics.py)
        self._record = state.metrics.native.record
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._linger: asyncio.TimerHandle | None = None
        self._closing = False
        # deadlines are checked by the server's periodic sweep (server.serve), not a timer per request
        self._last_active = time.monotonic()
        self._request_started = 0.0
        # per request
        self._in_request = False
        self._url: list[bytes] = []  # pieces, joined once: a URL may arrive a byte at a time
        self._url_size = 0
        self._method = b""
        self._headers = 0
        self._header_bytes = 0
        self._expect: bytes | None = None
        self._continue = False  # answer "100 Continue" once this read is parsed
        self._body: list[bytes] = []
        self._body_size = 0
        # the non-body bytes this request may still take; they are counted from its second read
        # on (the first is bounded by the read size, and may hold earlier requests)
        self._budget = 0
        self._counting = False

    # -- connection lifetime --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self._transport = cast(asyncio.Transport, transport)
        self._state.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._state.connections.discard(self)
        self._cancel_linger()
        self._transport = None

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        self._last_active = time.monotonic()
        fast = self._state.fast
        if fast is not None and not self._in_request and self._transport is not None:
            answer = fast.answer(data, self._last_active)  # timed from this read, as the Python path
            if answer is not None:
                self._transport.write(answer)
                return
        body_before = self._body_size
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(responses.error(400, "protocol upgrades are not supported", close=True))
            return
        except httptools.HttpParserCallbackError:
            if not self._closing:  # not a refusal (_Refused) but a bug in a callback
                log.exception("failed to answer a request")
                self._fail(responses.INTERNAL_ERROR)
            return
        except httptools.HttpParserError as exc:
            self._fail(responses.error(400, f"malformed HTTP request: {exc}", close=True))
            return
        if self._in_request and not self._closing:
            self._after_partial_read(len(data) - (self._body_size - body_before))

    def _after_partial_read(self, overhead: int) -> None:
        """A read ended inside a request: bound its head, and invite its body if it expects that."""
        if self._counting:
            self._budget -= overhead
            if self._budget < 0:
                self._fail(self._headers_too_large())
                return
        else:
            self._counting = True  # the request began in this read: count from the next one
        if self._continue:
            self._continue = False
            if self._body_size == 0 and self._transport is not None:
                self._transport.write(responses.CONTINUE)

    def eof_received(self) -> bool | None:
        return None  # close our side too

    # -- httptools callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_request = True
        self._url = []
        self._url_size = 0
        self._headers = 0
        self._header_bytes = 0
        self._expect = None
        self._continue = False
        self._body = []
        self._body_size = 0
        config = self._state.config
        self._budget = config.max_url_bytes + config.max_header_bytes + HEAD_SLACK_BYTES
        self._counting = False
        # a request, once begun, must finish in time: a client that stalls its body is cut off
        self._request_started = self._last_active

    def on_url(self, url: bytes) -> None:
        self._url_size += len(url)
        limit = self._state.config.max_url_bytes
        if self._url_size > limit:
            self._refuse(responses.error(414, f"the URL is longer than {limit} bytes", close=True))
        self._url.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        # also called for a chunked body's trailers: they count against the same limits
        self._headers += 1
        self._header_bytes += len(name) + len(value) + 4  # "name: value\r\n"
        config = self._state.config
        if self._headers > config.max_headers or self._header_bytes > config.max_header_bytes:
            self._refuse(self._headers_too_large())
        if len(name) == 6 and name.lower() == b"expect":
            self._expect = value

    def on_headers_complete(self) -> None:
        self._method = self._parser.get_method()
        if self._expect is not None and self._parser.get_http_version() != "1.0":
            # RFC 9110 10.1.1: the one expectation is 100-continue (and HTTP/1.0 clients get none)
            if self._expect.strip().lower() != b"100-continue":
                self._refuse(responses.EXPECTATION_FAILED)
            self._continue = True

    def on_chunk_header(self) -> None:
        self._budget += CHUNK_FRAMING_BYTES  # each chunk's size line and CRLFs are not body

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self._state.config.max_body_bytes:
            self._refuse(responses.TOO_LARGE)
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._closing:
            return
        self._in_request = False
        if self._transport is None:
            return
        answer = self._respond()
        self._record(self._url, answer, self._request_started)
        if self._method == b"HEAD":  # the same head, and no body (RFC 9110 9.3.2)
            answer = answer[: answer.index(b"\r\n\r\n") + 4]
        self._transport.write(answer)
        if self._state.draining or not self._parser.should_keep_alive():
            self._close()

    # -- answering ----------------------------------------------------------------------------

    def _respond(self) -> bytes:
        url = self._url[0] if len(self._url) == 1 else b"".join(self._url)
        path = url.split(b"?", 1)[0]
        if path == b"/fraud-score":
            if self._method != b"POST":
                return responses.FRAUD_SCORE_METHOD
            return self._score()
        if path == b"/v1/score":
            return self._score_v1() if self._method == b"POST" else responses.V1_SCORE_METHOD
        if path == b"/ready":
            if self._method != b"GET" and self._method != b"HEAD":
                return responses.READY_METHOD
            return responses.READY if self._state.ready else responses.WARMING
        if path == METRICS_PATH:
            if self._method != b"GET" and self._method != b"HEAD":
                return responses.METRICS_METHOD
            return self._state.metrics.response()
        return responses.NOT_FOUND

    def _score(self) -> bytes:
        state = self._state
        if not state.ready:
            return responses.WARMING
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        decoded = read_payload(body, state.constants)
        if isinstance(decoded, bytes):
            return decoded
        try:
            started = time.perf_counter_ns()
            frauds = state.scorer.fraud_count(decoded[1])
            state.metrics.native.searched(time.perf_counter_ns() - started)
            return responses.SCORES[frauds]
        except ValueError as exc:
            return unsearchable(exc)

    def _score_v1(self) -> bytes:
        state = self._state
        if not state.ready or state.v1 is None:
            return responses.WARMING
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        decoded = read_payload(body, state.constants)
        if isinstance(decoded, bytes):
            return decoded
        return state.v1.answer(*decoded)

    def _headers_too_large(self) -> bytes:
        config = self._state.config
        if self._headers > config.max_headers:
            message = f"more than {config.max_headers} header fields"
        else:
            message = f"the header section is larger than {config.max_header_bytes} bytes"
        return responses.error(431, message, close=True)

    # -- closing ----------------------------------------------------------------------------

    def _refuse(self, response: bytes) -> NoReturn:
        """Answer ``response``, close, and stop the parser: nothing more of this request is read."""
        self._fail(response)
        raise _Refused

    def _fail(self, response: bytes) -> None:
        """Answer an error and close, lingering: closing with unread input would reset the
        connection and the client would never see the answer.  So: answer, half-close, discard
        what still arrives for a moment, then close."""
        transport = self._transport
        if transport is None or self._closing:
            return
        self._closing = True
        # the request last begun is the one refused (or whose answer broke); timed from its start
        self._record(self._url, response, self._request_started or self._last_active)
        transport.write(response)
        if transport.can_write_eof():
            transport.write_eof()
            self._linger = asyncio.get_running_loop().call_later(LINGER_SECONDS, self._close)
        else:
            self._close()

    def _close(self) -> None:
        self._closing = True
        self._cancel_linger()
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def _cancel_linger(self) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None

    def check_deadlines(self, now: float) -> None:
        """408 for a request begun too long ago; close a keep-alive connection idle too long."""
        if self._closing:
            return
        config = self._state.config
        if self._in_request:
            if now - self._request_started > config.request_timeout:
                self._fail(responses.TIMEOUT)
        elif now - self._last_active > config.idle_timeout:
            self._close()

    # -- shutdown ---------------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        return not self._in_request

    def shutdown(self) -> None:
        """Close now if idle; otherwise the response in progress closes it (draining)."""
        if not self._in_request:
            self._close()

    def abort(self) -> None:
        if self._transport is not None and not self._closing:
            self._record(self._url, responses.SHUTTING_DOWN, self._request_started)
            self._transport.write(responses.SHUTTING_DOWN)
        self._close()
        self._state.connections.discard(self)
