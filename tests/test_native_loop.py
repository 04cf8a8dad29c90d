"""The native loop in process: ``_fastpath.NativeLoop`` serving real sockets (socket pairs).

Each test hands one end of a socket pair to the loop, as the balancer hands over a client's
connection, and talks through the other end.  No event loop here: what the loop moves to Python is
read back with ``take()``.  These also run under ``make sanitize`` (ASan + UBSan), the loop's
thread included.  The real service behind the real balancer is tests/test_native_loop_stack.py.
"""

from __future__ import annotations

import json
import os
import select
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from fraudscore.contract.vectorize import DEFAULT_CONSTANTS, vectorize
from fraudscore.index.search import Index
from fraudscore.scorer import KnnScorer
from fraudscore.service import responses
from fraudscore.service._fastpath import FastPath, NativeLoop, RequestMetrics
from fraudscore.service.metrics import ROUTES
from fraudscore.service.protocol import fast_path

from .budget import scaled

WAIT = 5.0  # seconds any single answer may take (a generous bound: the machine is shared)


@pytest.fixture
def metrics() -> RequestMetrics:
    return RequestMetrics(tuple(r.encode() for r in ROUTES), responses.SCORES)


@pytest.fixture
def fast(index: Index, metrics: RequestMetrics) -> FastPath:
    return fast_path(KnnScorer(index), DEFAULT_CONSTANTS, 16384, metrics)


@pytest.fixture
def native(fast: FastPath) -> Iterator[NativeLoop]:
    loop = NativeLoop(fast, 60.0)
    loop.start()
    yield loop
    loop.stop()


@pytest.fixture(scope="module")
def bodies(example_payloads: list[dict[str, Any]]) -> list[bytes]:
    return [json.dumps(p, separators=(",", ":")).encode() for p in example_payloads]


def scoring(body: bytes) -> bytes:
    return b"POST /fraud-score HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


def expected(index: Index, body: bytes) -> bytes:
    return responses.SCORES[index.fraud_count(vectorize(json.loads(body)))]


def adopted(native: NativeLoop) -> socket.socket:
    """A connection the loop serves: its client end."""
    client, server = socket.socketpair()
    client.settimeout(WAIT)
    native.adopt(server.detach())
    return client


def read_answer(client: socket.socket) -> bytes:
    """One whole answer (head and Content-Length body)."""
    data = b""
    while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < content_length(data):
        chunk = client.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data


def content_length(data: bytes) -> int:
    for line in data.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def taken(native: NativeLoop, count: int = 1) -> list[tuple[int, bytes]]:
    """What the loop moved to Python, once it has signalled ``count`` connections."""
    out: list[tuple[int, bytes]] = []
    deadline = time.monotonic() + WAIT
    while len(out) < count:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"the loop moved {len(out)} connections, not {count}"
        if select.select([native.migrate_fd], [], [], remaining)[0]:
            out += native.take()
    return out


def closed(client: socket.socket) -> bool:
    """Whether the loop closed its end (within WAIT)."""
    try:
        return client.recv(1) == b""
    except ConnectionResetError:
        return True


def test_ordinary_requests_are_answered_on_one_connection(
    native: NativeLoop, index: Index, bodies: list[bytes], metrics: RequestMetrics
) -> None:
    client = adopted(native)
    rounds = scaled(20, 5)
    for i in range(rounds):
        body = bodies[i % len(bodies)]
        client.sendall(scoring(body))
        assert read_answer(client) == expected(index, body)
    assert native.answered == rounds and native.migrated == 0
    counts = metrics.snapshot()
    assert (0, 0, 200, rounds) in counts["requests"]  # native answerer, /fraud-score, 200
    assert sum(counts["decisions"]) == rounds and counts["declined"] == 0
    client.close()


def test_a_declined_read_moves_the_connection_with_its_bytes(
    native: NativeLoop, index: Index, bodies: list[bytes], metrics: RequestMetrics
) -> None:
    client = adopted(native)
    client.sendall(scoring(bodies[0]))
    assert read_answer(client) == expected(index, bodies[0])
    pipelined = scoring(bodies[1]) + b"GET /ready HTTP/1.1\r\n\r\n"
    client.sendall(pipelined)
    [(fd, saved)] = taken(native)
    assert saved == pipelined  # nothing answered, nothing lost: Python answers both, in order
    # the descriptor is the same connection, and the loop no longer reads it
    with socket.socket(fileno=fd) as moved:
        client.sendall(b"more")
        moved.settimeout(WAIT)
        assert moved.recv(100) == b"more"
        moved.sendall(b"from python")
        assert client.recv(100) == b"from python"
    assert native.migrated == 1 and native.answered == 1
    # Python offers the same bytes to the fast path again and counts the decline there, once
    assert metrics.snapshot()["declined"] == 0
    client.close()


@pytest.mark.parametrize(
    "read",
    [
        pytest.param(lambda body: scoring(body)[:40], id="half a request"),
        pytest.param(lambda body: b"GET /ready HTTP/1.1\r\n\r\n", id="another route"),
        pytest.param(lambda body: b"\x16\x03\x01garbage", id="not HTTP"),
        pytest.param(lambda body: scoring(b"{" + body), id="a bad body"),
    ],
)
def test_what_the_fast_path_declines_goes_to_python(
    native: NativeLoop, bodies: list[bytes], read: Any
) -> None:
    client = adopted(native)
    data = read(bodies[0])
    client.sendall(data)
    [(fd, saved)] = taken(native)
    os.close(fd)
    assert saved == data
    client.close()


def test_connections_are_served_side_by_side(native: NativeLoop, index: Index, bodies: list[bytes]) -> None:
    clients = [adopted(native) for _ in range(scaled(50, 10))]
    for round_ in range(3):
        for i, client in enumerate(clients):
            client.sendall(scoring(bodies[(i + round_) % len(bodies)]))
        for i, client in enumerate(clients):
            assert read_answer(client) == expected(index, bodies[(i + round_) % len(bodies)])
    assert native.answered == 3 * len(clients)
    for client in clients:
        client.close()


def test_a_client_that_leaves_is_closed(native: NativeLoop, bodies: list[bytes]) -> None:
    client = adopted(native)
    client.sendall(scoring(bodies[0]))
    read_answer(client)
    client.close()
    deadline = time.monotonic() + WAIT
    while native.open and time.monotonic() < deadline:
        time.sleep(0.01)
    assert native.open == 0


def test_an_answer_the_socket_cannot_take_at_once_is_finished_later(
    native: NativeLoop, index: Index, bodies: list[bytes]
) -> None:
    """A client that sends request after request without reading: the answers fill the socket,
    the loop waits for room (reading nothing meanwhile), and nothing is lost, doubled or
    reordered: every answer written arrives whole and in order, and the requests not answered
    reach Python as they were sent."""
    client, server = socket.socketpair()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # room for a few dozen answers
    client.settimeout(WAIT)
    native.adopt(server.detach())
    requests = [scoring(bodies[i % len(bodies)]) for i in range(scaled(400, 200))]

    sent = [0]

    def send() -> None:
        for request in requests:
            client.sendall(request)
            sent[0] += 1
            time.sleep(0.0002)  # one request per read, while the loop keeps up

    sender = threading.Thread(target=send)
    sender.start()
    time.sleep(0.5)  # the answers pile up unread, then the client reads them
    # the loop stopped answering with requests waiting: an answer did not fit, and it waits for room
    assert sent[0] > native.answered + 1, (sent[0], native.answered)
    answers = [expected(index, bodies[i % len(bodies)]) for i in range(len(requests))]
    received = b""
    moved: list[tuple[int, bytes]] = []
    deadline = time.monotonic() + 4 * WAIT
    # until the loop answered everything, or moved the connection when it found several requests in one read
    while not moved and len(received) < len(b"".join(answers)):
        assert time.monotonic() < deadline, (native.answered, native.migrated, len(received))
        if select.select([client], [], [], 0.05)[0]:
            received += client.recv(65536)
        if select.select([native.migrate_fd], [], [], 0)[0]:
            moved = native.take()
    answered = native.answered
    want = b"".join(answers[:answered])
    while len(received) < len(want):
        chunk = client.recv(65536)
        assert chunk
        received += chunk
    assert received == want
    if moved:
        [(fd, saved)] = moved
        with socket.socket(fileno=fd) as conn:
            conn.settimeout(WAIT)
            unanswered = b"".join(requests[answered:])
            while len(saved) < len(unanswered):
                chunk = conn.recv(65536)
                assert chunk
                saved += chunk
            assert saved == unanswered
    sender.join()
    client.close()


def test_an_idle_connection_is_closed(fast: FastPath, bodies: list[bytes]) -> None:
    native = NativeLoop(fast, 0.2)
    native.start()
    try:
        client = adopted(native)
        client.sendall(scoring(bodies[0]))
        read_answer(client)
        assert closed(client)  # after 0.2 s idle, at the sweep (about once a second)
        assert native.open == 0
    finally:
        native.stop()


def test_stop_closes_the_connections_it_holds(fast: FastPath, bodies: list[bytes]) -> None:
    native = NativeLoop(fast, 60.0)
    native.start()
    clients = [adopted(native) for _ in range(5)]
    for client in clients:
        client.sendall(scoring(bodies[0]))
        read_answer(client)
    native.stop()
    assert all(closed(client) for client in clients)
    assert native.open == 0
    with socket.socket() as unused, pytest.raises(RuntimeError, match="not running"):
        native.adopt(unused.fileno())
    native.stop()  # twice is fine


def test_the_fast_path_cannot_change_under_a_loop(fast: FastPath, index: Index) -> None:
    native = NativeLoop(fast, 60.0)
    with pytest.raises(RuntimeError, match="cannot be changed"):
        fast.__init__(index.native, {}, {}, 0.5, responses.SCORES, 10)
    del native


def test_bad_arguments(fast: FastPath) -> None:
    with pytest.raises(TypeError):
        NativeLoop("not a fast path", 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="idle_timeout"):
        NativeLoop(fast, 0.0)
    with pytest.raises(RuntimeError, match="not running"):
        NativeLoop(fast, 1.0).adopt(0)
