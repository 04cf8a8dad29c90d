"""POST /v1/score answered natively (``_fastpath.c`` with a ``V1Plan``), held to the Python path.

Real servers over real sockets: ``serve`` on a TCP port (the fast path in uvloop's
``data_received``) and ``serve --handoff --native-loop`` behind the balancer (the native loop's
thread).  The Python path (``service/v1.py``, ``V1Live.answer``) defines every answer: here it runs
in process on the same registry, and each native answer must parse to exactly its answer (the
same keys, the same floats).  ``/metrics`` shows who answered (``answerer="native"``), so a fast
path that declined everything could not pass.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import socket
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from fraudscore.contract.vectorize import vectorize
from fraudscore.models.registry import Registry
from fraudscore.models.train import train
from fraudscore.scorer import KnnScorer
from fraudscore.service import v1

from .conftest import HandoffServer, Server, free_port
from .models_support import SMALL_CONFIG, small_model, small_references
from .test_lifecycle import cli_ok, metric, wait_for

MODES = ["fast path", "native loop"]
CHECKED = 3000  # payloads per registry and mode


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory, index_path: Path) -> tuple[Path, str, str, str]:
    """A registry of its own: two small models (seeds 1 and 2) and the kNN of the index served;
    (path, A, B, the kNN's version).  Nothing promoted."""
    source, first = small_model()
    root = tmp_path_factory.mktemp("v1native") / "registry"
    shutil.copytree(source.root, root)
    second = train(
        small_references(),
        Registry(root),
        config=dataclasses.replace(SMALL_CONFIG, seed=2),
        index_path=None,
        progress=False,
    )
    knn = cli_ok("model", "add-knn", "--index", str(index_path), "--registry", str(root)).strip()
    return root, first.version, second.version, knn


def registry_for(versions: tuple[Path, str, str, str], setup: str, where: Path) -> Path:
    """A copy of the registry promoted for one case (an empty registry for "no model")."""
    source, a, b, knn = versions
    root = where / f"registry-{setup}"
    if setup == "no model":
        root.mkdir()
        return root
    shutil.copytree(source, root)
    promotions = {
        "model decides": [[a]],
        "knn decides beside a model": [[knn]],
        "model candidate": [[a], [b, "--candidate", "--share", "30"]],
        "knn candidate": [[a], [knn, "--candidate", "--share", "30"]],
    }[setup]
    for args in promotions:
        cli_ok("model", "promote", *args, "--registry", str(root))
    return root


def check_loop_answered(log: str, mode: str, at_least: int) -> None:
    """Behind the native loop, its own thread answered (not the event loop's fast path after
    moving the connections to Python)."""
    if mode == "native loop":
        loop = re.search(r"the native loop answered (\d+) requests", log)
        assert loop is not None and int(loop.group(1)) >= at_least, log


def start(index_path: Path, mode: str, *extra: str) -> Server:
    if mode == "native loop":
        return HandoffServer(index_path, "--native-loop", *extra)
    return Server(index_path, *extra)


def stop(server: Server) -> str:
    code, log = server.stop()
    assert code == 0 and "Traceback" not in log, log
    return log


def request(body: bytes, path: str = "/v1/score") -> bytes:
    """A request as a load tester sends it: one write, compact JSON."""
    head = f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
    return head.encode() + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)


class Client:
    """One keep-alive connection, each request in one write, each answer read whole."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buffer = b""

    def exchange(self, data: bytes) -> tuple[int, bytes]:
        self.sock.sendall(data)
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self._read()
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        while len(rest) < length:
            rest += self._read()
        self.buffer = rest[length:]
        return int(head[9:12]), rest[:length]

    def _read(self) -> bytes:
        chunk = self.sock.recv(65536)
        assert chunk, "the server closed the connection"
        return chunk

    def close(self) -> None:
        self.sock.close()


def scored(port: int, payloads: list[Any]) -> list[Any]:
    client = Client(port)
    try:
        out = []
        for payload in payloads:
            status, body = client.exchange(request(orjson.dumps(payload)))
            assert status == 200, body
            out.append(orjson.loads(body))
        return out
    finally:
        client.close()


def python_answers(root: Path, index_path: Path, payloads: list[Any]) -> list[Any]:
    """The Python path's answers (V1Live.answer, as httptools' path calls it), in process."""
    with KnnScorer.open(index_path) as knn:
        live = v1.load(root, knn)
        try:
            return [orjson.loads(live.answer(p, vectorize(p)).split(b"\r\n\r\n", 1)[1]) for p in payloads]
        finally:
            live.live.stop()


def scrape(port: int) -> str:
    client = Client(port)
    try:
        status, body = client.exchange(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
    finally:
        client.close()
    assert status == 200
    return body.decode()


def answered(text: str, answerer: str, status: str = "200") -> float:
    return metric(text, "fraudscore_http_requests_total", route="/v1/score", status=status, answerer=answerer)


def with_ids(payloads: list[Any]) -> list[Any]:
    """Half the payloads with a customer.id (the split's key then), half with the transaction's."""
    return [
        {**p, "customer": {**p["customer"], "id": f"customer-{i}"}} if i % 2 else p
        for i, p in enumerate(payloads)
    ]


def decisions(text: str) -> Counter[tuple[str, ...]]:
    """fraudscore_decisions_total's non-zero series of a /metrics page."""
    out: Counter[tuple[str, ...]] = Counter()
    for line in text.splitlines():
        if line.startswith("fraudscore_decisions_total{"):
            labels, value = line.rsplit(" ", 1)
            if float(value):
                out[tuple(sorted(labels.split("{", 1)[1].rstrip("}").split(",")))] += int(float(value))
    return out


# -- the answers -------------------------------------------------------------------------------------

SETUPS = ["model decides", "knn decides beside a model", "no model", "model candidate", "knn candidate"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("setup", SETUPS)
def test_native_answers_are_the_python_paths(
    versions: tuple[Path, str, str, str],
    index_path: Path,
    dev_entries: list[dict[str, Any]],
    tmp_path: Path,
    setup: str,
    mode: str,
) -> None:
    root = registry_for(versions, setup, tmp_path)
    payloads = with_ids([e["request"] for e in dev_entries[:CHECKED]])
    expected = python_answers(root, index_path, payloads)
    server = start(index_path, mode, "--registry", str(root))
    try:
        answers = scored(server.port, payloads)
        text = scrape(server.port)
    finally:
        log = stop(server)
    assert answered(text, "native") == len(payloads), text  # every one answered natively
    assert answered(text, "python") == 0
    for payload, got, want in zip(payloads, answers, expected, strict=True):
        assert got == want, payload
    arms = Counter(a["decided_by"]["arm"] for a in answers)
    if "candidate" in setup:
        assert 0.2 < arms["candidate"] / len(answers) < 0.4, arms  # the split did split (30 %)
    else:
        assert arms == {"production": len(answers)}
    check_loop_answered(log, mode, len(payloads))


# -- the counts ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_decisions_are_counted_as_if_python_answered(
    versions: tuple[Path, str, str, str],
    index_path: Path,
    dev_entries: list[dict[str, Any]],
    tmp_path: Path,
    mode: str,
) -> None:
    """/metrics' decisions by scorer, version, outcome and arm: the native server's equal the
    Python path's (a server without the fast path) for the same requests."""
    root = registry_for(versions, "knn candidate", tmp_path)
    payloads = with_ids([e["request"] for e in dev_entries[:500]])
    pages = {}
    for name, (server_mode, flags) in {
        "native": (mode, ()),
        "python": ("fast path", ("--no-fast-path",)),
    }.items():
        server = start(index_path, server_mode, "--registry", str(root), *flags)
        try:
            scored(server.port, payloads)
            pages[name] = scrape(server.port)
        finally:
            log = stop(server)
        if name == "native":
            check_loop_answered(log, mode, len(payloads))
    assert answered(pages["native"], "native") == len(payloads)
    assert answered(pages["python"], "python") == len(payloads)
    native, python = decisions(pages["native"]), decisions(pages["python"])
    assert sum(native.values()) == len(payloads)
    assert {labels for labels in native if 'arm="candidate"' in labels}  # both arms decided
    assert native == python


# -- drift and shadows ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_native_answers_feed_drift_and_shadows(
    versions: tuple[Path, str, str, str],
    index_path: Path,
    dev_entries: list[dict[str, Any]],
    tmp_path: Path,
    mode: str,
) -> None:
    root = registry_for(versions, "model decides", tmp_path)
    _, a, b, _ = versions
    cli_ok("model", "promote", b, "--shadow", "--registry", str(root))
    metrics_port = free_port()
    payloads = [e["request"] for e in dev_entries[:300]]
    server = start(index_path, mode, "--registry", str(root), "--metrics-port", str(metrics_port))
    try:
        scored(server.port, payloads)
        assert answered(scrape(metrics_port), "native") == len(payloads)

        def status() -> dict[str, Any]:
            client = Client(metrics_port)
            try:
                code, body = client.exchange(b"GET /admin/status HTTP/1.1\r\nHost: test\r\n\r\n")
            finally:
                client.close()
            assert code == 200
            document: dict[str, Any] = json.loads(body)
            return document

        wait_for(lambda: status()["drift"][a]["observed"] == len(payloads), "drift fed")
        wait_for(lambda: status()["shadow"]["scored"].get(b) == len(payloads), "shadow scored")
        time.sleep(0.2)  # nothing more arrives: each answer was fed once
        document = status()
        assert document["drift"][a]["observed"] == len(payloads)
        assert document["shadow"]["scored"] == {b: len(payloads)}
        assert document["shadow"]["dropped"] == 0
        assert metric(scrape(metrics_port), "fraudscore_shadow_scored_total", version=b) == len(payloads)
    finally:
        log = stop(server)
    check_loop_answered(log, mode, len(payloads))


# -- what Python still answers ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_what_the_native_path_declines_python_answers(
    versions: tuple[Path, str, str, str],
    index_path: Path,
    example_payloads: list[Any],
    tmp_path: Path,
    mode: str,
) -> None:
    root = registry_for(versions, "model decides", tmp_path)
    payload = example_payloads[0]
    bad_ids: list[Any] = [123, None, True, [], {}, ""]
    server = start(index_path, mode, "--registry", str(root))
    try:
        for value in bad_ids:
            client = Client(server.port)  # a 400 closes nothing, but one connection per case is clearer
            try:
                body = orjson.dumps({**payload, "customer": {**payload["customer"], "id": value}})
                status, answer = client.exchange(request(body))
            finally:
                client.close()
            assert status == 400 and "customer.id" in orjson.loads(answer)["error"], (value, answer)
        with_id = {**payload, "customer": {**payload["customer"], "id": "c-1"}}
        good = scored(server.port, [with_id])[0]
        text = scrape(server.port)
    finally:
        stop(server)
    assert answered(text, "python", "400") == len(bad_ids)
    assert answered(text, "native") == 1
    assert (
        good
        == python_answers(root, index_path, [{**payload, "customer": {**payload["customer"], "id": "c-1"}}])[
            0
        ]
    )


@pytest.mark.parametrize("mode", MODES)
def test_swaps_under_load_answer_from_one_version_or_the_other(
    versions: tuple[Path, str, str, str],
    index_path: Path,
    dev_entries: list[dict[str, Any]],
    tmp_path: Path,
    mode: str,
) -> None:
    """Promotions and rollbacks while clients score: every answer whole, each from one of the
    versions and equal to that version's Python answer."""
    root = registry_for(versions, "model decides", tmp_path)
    _, a, b, _ = versions
    payloads = [e["request"] for e in dev_entries[:200]]
    by_version = {}
    for version in (a, b):
        own = tmp_path / f"only-{version}"
        shutil.copytree(root, own)
        cli_ok("model", "promote", version, "--registry", str(own))
        by_version[version] = python_answers(own, index_path, payloads)
    server = start(index_path, mode, "--registry", str(root))
    stop_swapping = threading.Event()
    seen: list[tuple[int, Any]] = []
    errors: list[BaseException] = []

    def client() -> None:
        try:
            while not stop_swapping.is_set():
                for i, answer in enumerate(scored(server.port, payloads)):
                    seen.append((i, answer))
        except BaseException as exc:
            errors.append(exc)

    clients = [threading.Thread(target=client) for _ in range(2)]
    try:
        for t in clients:
            t.start()
        for round_ in range(6):
            cli_ok("model", "promote", b if round_ % 2 == 0 else a, "--registry", str(root))
            time.sleep(0.4)  # the follower polls every 0.2 s
        stop_swapping.set()
        for t in clients:
            t.join(timeout=60)
        text = scrape(server.port)
    finally:
        stop_swapping.set()
        log = stop(server)
    check_loop_answered(log, mode, len(seen))
    assert not errors, errors
    versions_seen = Counter(answer["decided_by"]["version"] for _, answer in seen)
    assert set(versions_seen) == {a, b}, versions_seen
    for i, answer in seen:
        assert answer == by_version[answer["decided_by"]["version"]][i]
    assert answered(text, "native") == len(seen)
