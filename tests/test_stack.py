"""The stack: the built-in balancer's handover, round-robin, faults, shutdown, and each --lb."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fraudscore.errors import Category
from fraudscore.stack import proxies
from fraudscore.stack.cgroups import CgroupManager
from fraudscore.stack.limits import DEFAULT_STACK
from fraudscore.stack.runner import BACKOFF_FIRST, RESTART_LIMIT, RESTART_WINDOW, StackConfig

from .conftest import Server, free_port
from .test_cli import error_line


class FakeInstance:
    """A real unix socket that takes handed-over descriptors, as an instance does, and keeps them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.received: list[socket.socket] = []
        self.channel_open = threading.Event()
        self._channel: socket.socket | None = None
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        channel, _ = self._listener.accept()
        self._channel = channel
        self.channel_open.set()
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(channel, 16, 16)
            except OSError:
                return
            if not data:
                return
            self.received += [socket.socket(fileno=fd) for fd in fds]

    def die(self) -> None:
        """Go away as a killed instance does: the channel to the balancer and the listener close
        (the socket file stays behind, so reconnecting is refused)."""
        assert self.channel_open.wait(5), "the balancer never connected"
        assert self._channel is not None
        # shutdown, not only close: the thread blocked in recv_fds keeps a closed descriptor's
        # socket alive, and the balancer would go on handing connections to it
        self._channel.shutdown(socket.SHUT_RDWR)
        self._thread.join(5)
        assert not self._thread.is_alive()
        self._channel.close()
        self._listener.close()


@pytest.fixture
def balancer(tmp_path: Path) -> Iterator[tuple[int, list[FakeInstance], subprocess.Popen[bytes]]]:
    instances = [FakeInstance(tmp_path / f"api{i}.sock") for i in (1, 2)]
    port = free_port()
    upstreams = [a for inst in instances for a in ("--upstream", str(inst.path))]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fraudscore.cli",
            "balance",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *upstreams,
        ],
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.02)
    yield port, instances, proc
    proc.terminate()
    proc.wait(timeout=10)


def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_round_robin_is_even(balancer: tuple[int, list[FakeInstance], subprocess.Popen[bytes]]) -> None:
    port, instances, _ = balancer
    wait_for(lambda: sum(len(i.received) for i in instances) == 1)  # the fixture's own probe
    before = [len(i.received) for i in instances]
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(40)]
    wait_for(lambda: sum(len(i.received) for i in instances) == 41)
    assert [len(i.received) - b for i, b in zip(instances, before, strict=True)] == [20, 20]
    for c in clients:
        c.close()


def test_balancer_never_reads_the_payload(
    balancer: tuple[int, list[FakeInstance], subprocess.Popen[bytes]],
) -> None:
    port, instances, _ = balancer
    request = b'POST /fraud-score HTTP/1.1\r\nContent-Length: 11\r\n\r\n{"id":"x"}\n'
    wait_for(lambda: sum(len(i.received) for i in instances) == 1)  # the fixture's own probe
    client = socket.create_connection(("127.0.0.1", port))
    client.sendall(request)
    wait_for(lambda: sum(len(i.received) for i in instances) == 2)
    handed = instances[1].received[0]  # round-robin: the probe went to the first, this to the second
    handed.settimeout(2)
    got = b""
    while len(got) < len(request):
        got += handed.recv(4096)
    assert got == request  # every byte the client sent is still there for the instance
    handed.sendall(b"answered by the instance")  # and the instance answers on the same connection
    assert client.recv(100) == b"answered by the instance"
    client.close()


def test_a_dead_instance_is_skipped_at_once(
    balancer: tuple[int, list[FakeInstance], subprocess.Popen[bytes]],
) -> None:
    port, (live, dead), _ = balancer
    wait_for(lambda: len(live.received) + len(dead.received) == 1)  # the fixture's own probe
    assert len(live.received) == 1  # round-robin: the next connection is the dead one's turn
    dead.die()
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(10)]
    # none is lost: the first, handed to the dead instance first, goes on to the live one
    wait_for(lambda: len(live.received) == 11)
    assert dead.received == []
    # and each handed socket is its client's connection
    for i, client in enumerate(clients):
        client.sendall(b"client %d" % i)
    got = []
    for handed in live.received[1:]:
        handed.settimeout(5)
        got.append(handed.recv(100))
    assert sorted(got) == sorted(b"client %d" % i for i in range(10))
    for c in clients:
        c.close()


def test_the_balancer_loads_no_scoring_code() -> None:
    """The balancer's 20 MiB hold no index, no native core, no contract constants, no event loop."""
    code = "import sys, fraudscore.stack.balancer; print(' '.join(sorted(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    modules = loaded.split()
    assert "fraudscore.service.handoff" in modules  # the handover message's one definition
    heavy = [
        m for m in modules if m.startswith(("fraudscore.index", "fraudscore.contract", "fraudscore.scorer"))
    ]
    assert heavy == []
    assert "asyncio" not in modules and "numpy" not in modules


# -- the real stack ---------------------------------------------------------------------------


class Stack(Server):
    """`fraudscore stack` on a free port, ready; ``kill`` also reaches the runner's children."""

    command = "stack"
    ready_timeout = 60.0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                for pid in self.children():
                    os.kill(pid, signal.SIGKILL)
                self.proc.kill()
                self.proc.wait()

    def children(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def stop_log(self) -> str:
        code, log = self.stop()
        assert code == 0, log
        return log


def score(url: str, payload: dict[str, Any]) -> int:
    import http.client

    host, port = url.removeprefix("http://").split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=5)
    c.request("POST", "/fraud-score", body=json.dumps(payload))
    status = c.getresponse().status
    c.close()
    return status


def instance_pids(stack: Stack) -> dict[str, int]:
    pids = {}
    for pid in stack.children():
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        for arg in cmd:
            if arg.endswith(b".sock") and b"--upstream" not in cmd:
                pids[Path(arg.decode()).stem] = pid
    return pids


def gone(pid: int) -> bool:
    """Reaped.  Not merely a zombie leader: its other threads may still hold its sockets open."""
    return not Path(f"/proc/{pid}").exists()


def read_until(stack: Stack, text: bytes) -> bytes:
    """The stack's stderr up to the line that holds ``text`` (which the stack is bound to log)."""
    assert stack.proc.stderr is not None
    seen = b""
    while text not in seen:
        line = stack.proc.stderr.readline()
        assert line, f"the stack ended without saying {text!r}: {seen.decode()}"
        seen += line
    return seen


def test_runner_limits_are_the_compose_numbers() -> None:
    assert StackConfig(index=Path("x")).stack_limits == DEFAULT_STACK


@pytest.fixture
def start_stack(index_path: Path) -> Iterator[Any]:
    """Starts stacks for a test; whatever the test does, every one is stopped afterwards."""
    started: list[Stack] = []

    def start(*extra: str) -> Stack:
        stack = Stack(index_path, *extra)
        started.append(stack)
        return stack

    yield start
    for stack in started:
        stack.kill()


def test_stack_serves_restarts_and_stops_cleanly(
    start_stack: Any, example_payloads: list[dict[str, Any]]
) -> None:
    stack = start_stack()
    for payload in example_payloads[:10]:
        assert score(stack.url, payload) == 200
    pids = instance_pids(stack)
    assert set(pids) == {"api1", "api2"}
    os.kill(pids["api1"], signal.SIGKILL)
    wait_for(lambda: gone(pids["api1"]))
    # once it is dead, new connections go to the live instance: none fails
    failures = sum(score(stack.url, p) != 200 for p in example_payloads[:20])
    assert failures == 0
    before = read_until(stack, b"api1 is back")  # restarted, after the first backoff, and ready
    assert b"api1 was killed by signal 9 (no error message): restarting it in 0.1 s" in before
    assert instance_pids(stack).get("api1") not in (None, pids["api1"])
    for payload in example_payloads[:10]:
        assert score(stack.url, payload) == 200
    log = stack.stop_log()
    assert "restarts 1" in log
    assert not [p for p in pids.values() if Path(f"/proc/{p}").exists()]
    if CgroupManager.available():
        assert "peak memory" in log
        leftovers = list(Path("/sys/fs/cgroup/memory").rglob(f"fraudscore-{stack.proc.pid}"))
        assert leftovers == []


def test_sigterm_finishes_in_flight_requests(
    start_stack: Any, example_payloads: list[dict[str, Any]]
) -> None:
    stack = start_stack()
    body = json.dumps(example_payloads[0]).encode()
    s = socket.create_connection(("127.0.0.1", stack.port))
    s.sendall(b"POST /fraud-score HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:20])
    time.sleep(0.2)
    stack.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    s.sendall(body[20:])
    s.settimeout(10)
    assert s.recv(4096).startswith(b"HTTP/1.1 200 OK")
    _, err = stack.proc.communicate(timeout=60)
    assert stack.proc.returncode == 0, err.decode()


def test_sigterm_while_starting_stops_what_was_started(index_path: Path) -> None:
    argv = [sys.executable, "-m", "fraudscore.cli", "stack", "--index", str(index_path)]
    proc = subprocess.Popen([*argv, "--port", str(free_port())], stderr=subprocess.PIPE)
    try:
        # the first instance is starting: the balancer is not up yet, let alone "stack up"
        wait_for(lambda: bool(subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True).stdout))
        children = [
            int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True).stdout.split()
        ]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    log = err.decode()
    assert proc.returncode == 0, log
    assert "stack up" not in log and "stopped before" in log
    assert [pid for pid in children if not gone(pid)] == []


@pytest.mark.parametrize("lb", ["nginx", "haproxy"])
def test_external_balancers(lb: str, start_stack: Any, example_payloads: list[dict[str, Any]]) -> None:
    if (proxies.find_nginx() if lb == "nginx" else proxies.find_haproxy()) is None:
        pytest.skip(f"{lb} is not installed (apt-get install {lb})")
    stack = start_stack("--lb", lb)
    assert all(score(stack.url, p) == 200 for p in example_payloads[:20])
    log = stack.stop_log()  # exit 0
    # stopped in order and reported, whether or not the runner had logged "stack up" yet: the
    # balancer can answer /ready a moment before the runner sees it do so
    for name in ("api1", "api2", "lb"):
        assert f"{name}: peak RSS" in log, log


# -- a stack that cannot start, or cannot stay up, gives up with one line ----------------------


def run_stack(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    argv = [sys.executable, "-m", "fraudscore.cli", "stack", "--host", "127.0.0.1", "--no-limits", *args]
    return subprocess.run(argv, capture_output=True, timeout=timeout)


class Answers200(http.server.BaseHTTPRequestHandler):
    """Whatever holds the port answers /ready: the stack must not take that for its balancer."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.mark.parametrize("holder", ["a listening socket", "an HTTP server"])
def test_a_taken_port_ends_the_stack_with_the_balancers_error(holder: str, index_path: Path) -> None:
    port = free_port()
    if holder == "a listening socket":
        taken = socket.create_server(("127.0.0.1", port))
        when, close = f"before :{port} was ready", taken.close
    else:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Answers200)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        when, close = "right after it started", server.shutdown
    try:
        result = run_stack("--index", str(index_path), "--port", str(port))
    finally:
        close()
    line = error_line(result, Category.BAD_CONFIG)
    assert line == (
        f"fraudscore stack: lb exited with 4 {when}: fraudscore balance: Address already in use "
        f"(while attempting to bind on address ('127.0.0.1', {port}))"
    )
    assert b"stack up" not in result.stderr and b"restarting" not in result.stderr
    assert b"api1: peak RSS" in result.stderr  # stopped in order and reported


def test_an_instance_that_cannot_start_ends_the_stack_with_its_error(tmp_path: Path) -> None:
    damaged = tmp_path / "damaged.fsidx"
    damaged.write_bytes(b"not an index at all")
    result = run_stack("--index", str(damaged), "--port", str(free_port()))
    line = error_line(result, Category.BAD_CONFIG)
    said = "fraudscore stack: api1 exited with 3 before it was ready: fraudscore serve: "
    assert line.startswith(f"{said}{damaged}")


def balancer_pid(stack: Stack) -> int | None:
    for pid in stack.children():
        with contextlib.suppress(OSError):
            if b"balance" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                return pid
    return None


def test_a_process_that_keeps_dying_is_restarted_with_backoff_then_given_up(start_stack: Any) -> None:
    stack = start_stack()
    before = read_until(stack, b"stack up")  # past the start-up grace: from now on deaths are restarted
    kills: list[float] = []
    pid = balancer_pid(stack)
    while pid is not None and len(kills) <= RESTART_LIMIT + 1:  # bounded: a runner that never gives up fails
        os.kill(pid, signal.SIGKILL)
        kills.append(time.monotonic())
        dead = pid
        wait_for(lambda: stack.proc.poll() is not None or balancer_pid(stack) not in (None, dead), timeout=30)  # noqa: B023
        pid = balancer_pid(stack)
    _, err = stack.proc.communicate(timeout=60)
    err = before + err
    result = subprocess.CompletedProcess(stack.proc.args, stack.proc.returncode, b"", err)
    line = error_line(result, Category.BAD_CONFIG)
    assert len(kills) == RESTART_LIMIT + 1, err.decode()
    assert line == (
        f"fraudscore stack: lb died {RESTART_LIMIT + 1} times within {RESTART_WINDOW:.0f} s; "
        "giving up: the last time it was killed by signal 9 (no error message)"
    )
    # each restart waited twice as long as the one before
    said = rb"lb was killed by signal 9 \(no error message\): restarting it in ([\d.]+) s"
    delays = [float(d) for d in re.findall(said, err)]
    assert delays == [round(BACKOFF_FIRST * 2**i, 1) for i in range(RESTART_LIMIT)]
    assert b"api1: peak RSS" in err  # and the stack was stopped in order
