"""bench/floor/floor.c, the floor the benchmarks compare against: real sockets, the real balancer.

The floor must be a correct HTTP/1.1 server for k6, or its figures would not be the floor: one
answer per request, pipelined requests in order, a request split across reads answered only once
whole, and the same through `fraudscore balance` handing it connections by SCM_RIGHTS.
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fraudscore.stack.runner import wait_ready

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "bench" / "floor" / "floor.c"
ANSWER = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 35\r\n\r\n"
    b'{"approved":true,"fraud_score":0.0}'
)
BODY = b'{"id":"x","transaction":{"amount":1}}'
REQUEST = b"POST /fraud-score HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is needed to build the floor")


@pytest.fixture(scope="module")
def binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("floor") / "floor"
    subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(out), str(SOURCE)], check=True)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def stop(proc: subprocess.Popen[bytes]) -> str:
    """SIGTERM, and what the process wrote to stderr (the floor's counts)."""
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=10)
    return (err or b"").decode()


@pytest.fixture
def direct(binary: Path) -> Iterator[int]:
    port = free_port()
    proc = subprocess.Popen([str(binary), "--port", str(port)], stderr=subprocess.PIPE)
    try:
        wait_ready(f"http://127.0.0.1:{port}", timeout=10)
        yield port
    finally:
        stop(proc)


def read_answers(sock: socket.socket, count: int) -> bytes:
    data = b""
    sock.settimeout(5)
    while data.count(b"HTTP/1.1") < count or not data.endswith(b"}"):
        chunk = sock.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data


def test_pipelined_requests_get_one_answer_each_in_order(direct: int) -> None:
    with socket.create_connection(("127.0.0.1", direct)) as s:
        s.sendall(REQUEST * 3)
        assert read_answers(s, 3) == ANSWER * 3


def test_a_request_split_across_reads_is_answered_once_whole(direct: int) -> None:
    with socket.create_connection(("127.0.0.1", direct)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(REQUEST[:30])  # inside the head
        time.sleep(0.05)
        s.sendall(REQUEST[30:-5])  # the head and part of the body
        time.sleep(0.1)
        s.settimeout(0.2)
        with pytest.raises(TimeoutError):
            s.recv(100)
        s.sendall(REQUEST[-5:])
        assert read_answers(s, 1) == ANSWER


def test_connection_close_is_honoured(direct: int) -> None:
    with socket.create_connection(("127.0.0.1", direct)) as s:
        s.sendall(b"GET /ready HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert read_answers(s, 1) == ANSWER
        assert s.recv(100) == b""


def test_through_the_balancer_both_floors_serve(binary: Path, tmp_path: Path) -> None:
    sockets = [tmp_path / "a.sock", tmp_path / "b.sock"]
    floors = [subprocess.Popen([str(binary), "--handoff", str(s)], stderr=subprocess.PIPE) for s in sockets]
    port = free_port()
    balancer = None
    try:
        deadline = time.monotonic() + 10
        while not all(s.exists() for s in sockets):
            assert time.monotonic() < deadline, "the floors never listened"
            time.sleep(0.01)
        upstreams = [a for s in sockets for a in ("--upstream", str(s))]
        argv = [sys.executable, "-m", "fraudscore.cli", "balance", "--host", "127.0.0.1", "--port", str(port)]
        balancer = subprocess.Popen([*argv, *upstreams], stderr=subprocess.DEVNULL)
        wait_ready(f"http://127.0.0.1:{port}", timeout=10)  # one connection, to a.sock
        for _ in range(4):  # round-robin: b, a, b, a
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(REQUEST * 2)
                assert read_answers(s, 2) == ANSWER * 2
    finally:
        if balancer is not None:
            stop(balancer)
        logs = [stop(f) for f in floors]
    counts = [re.search(r"requests (\d+) connections (\d+)", log) for log in logs]
    assert all(counts), logs
    assert [(int(m[1]), int(m[2])) for m in counts if m] == [(5, 3), (4, 2)]
