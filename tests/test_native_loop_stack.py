"""The native loop in the real service: `fraudscore serve --handoff … --native-loop` behind
`fraudscore balance`, over real TCP connections.

Every HTTP behaviour test also runs in this mode (conftest's ``server`` fixture, "native loop");
these check what is the loop's own: exact answers on many payloads, a connection moved to Python in
the middle of its life, the request timeout after a move, and shutdown while the loop holds
connections.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .budget import scaled
from .conftest import HandoffServer, check_native_loop_log

TIMEOUT = 1  # --request-timeout, seconds


@pytest.fixture(scope="module")
def stack(index_path: Path) -> Iterator[HandoffServer]:
    srv = HandoffServer(index_path, "--native-loop", "--request-timeout", str(TIMEOUT))
    yield srv
    code, log = srv.stop()
    assert code == 0 and "Traceback" not in log, log
    check_native_loop_log(log)


def scoring(payload: Any) -> bytes:
    body = json.dumps(payload, separators=(",", ":")).encode()
    return b"POST /fraud-score HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


def expected(entry: dict[str, Any]) -> dict[str, Any]:
    return {"approved": entry["expected_approved"], "fraud_score": entry["expected_fraud_score"]}


def read_answers(sock: socket.socket, count: int) -> list[bytes]:
    """``count`` whole answers, split by their Content-Length."""
    data = b""
    out: list[bytes] = []
    while len(out) < count:
        while b"\r\n\r\n" in data:
            head, _, rest = data.partition(b"\r\n\r\n")
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            if len(rest) < length:
                break
            out.append(head + b"\r\n\r\n" + rest[:length])
            data = rest[length:]
        if len(out) < count:
            chunk = sock.recv(65536)
            assert chunk, f"closed after {out!r} {data!r}"
            data += chunk
    assert data == b"", data
    return out


def body_of(answer: bytes) -> Any:
    return json.loads(answer.partition(b"\r\n\r\n")[2])


def connect(stack: HandoffServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", stack.port), timeout=5)


def test_answers_are_the_contracts(stack: HandoffServer, dev_entries: list[dict[str, Any]]) -> None:
    """A few thousand dev payloads over a few keep-alive connections: every answer exact."""
    entries = dev_entries[: scaled(4000, 400)]
    connections = [connect(stack) for _ in range(4)]
    for i, entry in enumerate(entries):
        sock = connections[i % len(connections)]
        sock.sendall(scoring(entry["request"]))
        [answer] = read_answers(sock, 1)
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer
        assert body_of(answer) == expected(entry), entry
    for sock in connections:
        sock.close()


def test_a_pipelined_read_moves_the_connection_and_is_answered_in_order(
    stack: HandoffServer, dev_entries: list[dict[str, Any]]
) -> None:
    with connect(stack) as sock:
        sock.sendall(scoring(dev_entries[0]["request"]))  # answered by the loop
        assert body_of(read_answers(sock, 1)[0]) == expected(dev_entries[0])
        pipelined = [dev_entries[i] for i in range(1, 4)]
        sock.sendall(b"".join(scoring(e["request"]) for e in pipelined) + b"GET /ready HTTP/1.1\r\n\r\n")
        answers = read_answers(sock, 4)
        assert [body_of(a) for a in answers[:3]] == [expected(e) for e in pipelined]
        assert body_of(answers[3]) == {"status": "ready"}
        # Python serves the connection from now on: ordinary requests too, still kept alive
        for entry in dev_entries[4:8]:
            sock.sendall(scoring(entry["request"]))
            assert body_of(read_answers(sock, 1)[0]) == expected(entry)


def test_a_split_request_moves_the_connection_and_is_answered(
    stack: HandoffServer, dev_entries: list[dict[str, Any]]
) -> None:
    with connect(stack) as sock:
        sock.sendall(scoring(dev_entries[0]["request"]))
        assert body_of(read_answers(sock, 1)[0]) == expected(dev_entries[0])
        request = scoring(dev_entries[1]["request"])
        for piece in (request[:30], request[30:100], request[100:]):
            sock.sendall(piece)
            time.sleep(0.05)  # separate reads
        assert body_of(read_answers(sock, 1)[0]) == expected(dev_entries[1])


def test_half_a_request_then_silence_gets_408(
    stack: HandoffServer, dev_entries: list[dict[str, Any]]
) -> None:
    with connect(stack) as sock:
        sock.sendall(scoring(dev_entries[0]["request"]))
        read_answers(sock, 1)
        sock.sendall(scoring(dev_entries[1]["request"])[:50])
        started = time.monotonic()
        sock.settimeout(TIMEOUT + 5)
        answer = sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert time.monotonic() - started >= TIMEOUT * 0.9  # not before the timeout


def test_shutdown_closes_held_connections_and_finishes_moved_ones(
    index_path: Path, dev_entries: list[dict[str, Any]]
) -> None:
    srv = HandoffServer(index_path, "--native-loop")
    try:
        held = [connect(srv) for _ in range(5)]
        for sock in held:  # each answered once by the loop, then idle there
            sock.sendall(scoring(dev_entries[0]["request"]))
            read_answers(sock, 1)
        # one moved to Python with a request half sent: it is finished, then closed
        moved = connect(srv)
        request = scoring(dev_entries[1]["request"])
        moved.sendall(request[:40])
        time.sleep(0.2)
        srv.proc.terminate()  # the instance alone: the balancer still runs
        time.sleep(0.2)
        moved.sendall(request[40:])
        [answer] = read_answers(moved, 1)
        assert body_of(answer) == expected(dev_entries[1])
        assert moved.recv(1) == b""  # then closed: the server is draining
        for sock in held:
            sock.settimeout(5)
            assert sock.recv(1) == b""  # closed by the loop, with no answer half written
        # let it exit on that one SIGTERM: stop() sends another, and a second signal in the last
        # moments of the shutdown, after the handlers are gone, ends it with -15 (seen on CI)
        srv.proc.wait(15)
    finally:
        code, log = srv.stop()
    assert code == 0, log
    # moved: ours, and the readiness checks (GET /ready) of the fixture and the balancer's wait
    moved_line = r"the native loop answered 5 requests and moved [1-9]\d* connections to Python"
    assert re.search(moved_line, log), log
    assert "stopped" in log and "Traceback" not in log, log


def test_native_loop_without_handoff_is_one_line(index_path: Path) -> None:
    argv = [sys.executable, "-m", "fraudscore.cli", "serve", "--index", str(index_path), "--native-loop"]
    done = subprocess.run([*argv, "--port", "1"], capture_output=True, timeout=60)
    err = done.stderr.decode().strip()
    assert 0 < done.returncode < 128, err
    assert "--native-loop" in err and "--handoff" in err and len(err.splitlines()) == 1, err


def test_on_by_default_for_handed_over_connections(index_path: Path) -> None:
    """`serve --handoff` runs the native loop unless told not to; without the fast path it cannot."""
    for extra, expected_state in (((), "on"), (("--no-native-loop",), "off"), (("--no-fast-path",), "off")):
        srv = HandoffServer(index_path, *extra)
        code, log = srv.stop()
        assert code == 0, log
        assert f"native loop {expected_state}, pid" in log, (extra, log)
