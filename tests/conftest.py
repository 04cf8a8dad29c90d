"""Shared fixtures: the real index, the contract's dev data, and a real server process."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fraudscore.errors import IndexFormatError
from fraudscore.index.build import build_index
from fraudscore.index.search import Index
from fraudscore.stack.runner import probe, wait_ready

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"
REFERENCES = DATA / "references.json.gz"
INDEX_PATH = DATA / "references.fsidx"
# the contract's dev data: $FRAUDSCORE_TEST_DATA, else ../shared beside the clone (README, "Test data")
DEV_DATA = Path(
    os.environ.get("FRAUDSCORE_TEST_DATA") or ROOT.parent / "shared" / "data" / "dev-data.json.gz"
)


@pytest.fixture(scope="session")
def index_path() -> Path:
    """The repository's index, (re)built from the bundled references when missing or stale."""
    try:
        Index(INDEX_PATH).close()
    except IndexFormatError:
        build_index(REFERENCES, INDEX_PATH, progress=False)
    return INDEX_PATH


@pytest.fixture(scope="session")
def index(index_path: Path) -> Iterator[Index]:
    with Index(index_path) as idx:
        yield idx


@pytest.fixture(scope="session")
def dev_entries() -> list[dict[str, Any]]:
    if not DEV_DATA.exists():
        pytest.skip(f"the contract's dev data is not at {DEV_DATA}")
    entries: list[dict[str, Any]] = json.loads(gzip.decompress(DEV_DATA.read_bytes()))["entries"]
    return entries


@pytest.fixture(scope="session")
def example_payloads() -> list[dict[str, Any]]:
    payloads: list[dict[str, Any]] = json.loads((DATA / "example-payloads.json").read_text())
    return payloads


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Server:
    """`fraudscore COMMAND --index … --host 127.0.0.1 --port <free>`, started and ready."""

    command = "serve"
    ready_timeout = 20.0

    def __init__(self, index_path: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "fraudscore.cli", self.command, "--index", str(index_path)]
        self.proc = subprocess.Popen(
            [*argv, "--host", "127.0.0.1", "--port", str(self.port), *extra],
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            self.ready_seconds = wait_ready(self.url, process=self.proc, timeout=self.ready_timeout)
        except BaseException:
            self.kill()
            raise

    def stop(self) -> tuple[int, str]:
        self.proc.terminate()
        try:
            _, err = self.proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            try:
                _, err = self.proc.communicate(timeout=15)
            except subprocess.TimeoutExpired:  # fail, not hang: what it started outlived it, holding the pipe
                raise AssertionError(f"`fraudscore {self.command}` left processes behind") from None
        return self.proc.returncode, err.decode()

    def kill(self) -> None:
        """Leave nothing running, whatever state the process is in."""
        if self.proc.poll() is None:
            self.stop()


class HandoffServer(Server):
    """`fraudscore serve --handoff SOCK …` behind `fraudscore balance --upstream SOCK --port <free>`:
    connections reach the instance as they do in the stack, handed over by the balancer."""

    def __init__(self, index_path: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dir = Path(tempfile.mkdtemp(prefix="fs-handoff-"))
        self.socket = self.dir / "api.sock"
        self.balancer: subprocess.Popen[bytes] | None = None
        argv = [sys.executable, "-m", "fraudscore.cli"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        started = time.monotonic()
        self.proc = subprocess.Popen(
            [*argv, "serve", "--index", str(index_path), "--handoff", str(self.socket), *extra],
            stderr=subprocess.PIPE,
            env=env,
        )
        try:
            while not probe(self.socket, handoff=True):
                assert self.proc.poll() is None, "the instance exited before it was ready"
                assert time.monotonic() - started < self.ready_timeout, "the instance was not ready in time"
                time.sleep(0.02)
            self.ready_seconds = time.monotonic() - started
            self.balancer = subprocess.Popen(
                [
                    *argv,
                    "balance",
                    "--upstream",
                    str(self.socket),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                ],
                stderr=subprocess.DEVNULL,
                env=env,
            )
            wait_ready(self.url, process=self.balancer, timeout=self.ready_timeout)
        except BaseException:
            self.kill()
            raise

    def stop(self) -> tuple[int, str]:
        """The stack's order: the balancer first (no new connections), then the instance."""
        if self.balancer is not None and self.balancer.poll() is None:
            self.balancer.terminate()
            try:
                self.balancer.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.balancer.kill()
                self.balancer.wait()
        try:
            return super().stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


# the server modes every HTTP behaviour test runs against
SERVER_MODES = ["fast path", "python path", "native loop"]


def start_server(index_path: Path, mode: str, *extra: str) -> Server:
    """A server of ``mode`` (one of SERVER_MODES) with these further flags."""
    if mode == "native loop":
        return HandoffServer(index_path, "--native-loop", *extra)
    return Server(index_path, *extra, *(("--no-fast-path",) if mode == "python path" else ()))


def check_native_loop_log(log: str) -> None:
    """The native loop served and answered: a loop that moved every connection to Python, or was
    never used, cannot pass unnoticed."""
    answered = re.search(r"the native loop answered (\d+) requests", log)
    assert answered is not None and int(answered.group(1)) > 0, log


@pytest.fixture(scope="module", params=SERVER_MODES)
def server(index_path: Path, request: pytest.FixtureRequest) -> Iterator[Server]:
    """Every HTTP test runs against each answerer: the native fast path (with httptools for what
    it declines), httptools alone, and the native loop behind the balancer (moving to Python
    whatever the fast path declines).  They must not differ in anything a client can see."""
    fast = request.param != "python path"
    srv = start_server(index_path, request.param, "--request-timeout", "1", "--max-body-bytes", "16384")
    yield srv
    # one ordinary scoring request, whatever tests were selected: the fast-path server must answer
    # it the fast way, so a fast path that declines everything cannot pass unnoticed
    answer = ordinary_exchange(srv.port)
    code, log = srv.stop()
    assert answer.startswith(b"HTTP/1.1 200 OK") and b'"fraud_score"' in answer, (answer, log)
    assert code == 0, log
    assert "Traceback" not in log, log
    answered = re.search(r"the fast path answered (\d+) requests", log)
    if fast:
        assert answered is not None and int(answered.group(1)) > 0, log
        if request.param == "native loop":
            check_native_loop_log(log)
    else:
        assert answered is None and "fast path off" in log, log


def ordinary_exchange(port: int) -> bytes:
    """A scoring request as a load tester sends it (compact JSON, one write), and its answer."""
    payload = json.loads((DATA / "example-payloads.json").read_text())[0]
    body = json.dumps(payload, separators=(",", ":")).encode()
    request = b"POST /fraud-score HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
    request += b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request)
        answer = b""
        while b"}" not in answer and (chunk := s.recv(4096)):
            answer += chunk
    return answer
