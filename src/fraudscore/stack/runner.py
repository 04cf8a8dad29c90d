"""`fraudscore stack`: the contract's topology (a balancer and N instances) as local processes.

Each process runs in its own cgroup with the limits of ``limits.py`` (the numbers the compose
file is generated from) where cgroups are writable; ``--no-limits`` skips that, for running the
whole stack inside one outer limit.  The runner waits for every instance's ``/ready``, restarts
any process that dies, and on SIGINT/SIGTERM (even one that arrives while it is starting)
stops in order: the balancer first (no new connections), then the instances (they finish what
they have begun), then removes its cgroups and socket files.

A process that dies while the stack starts, or a balancer that dies within ``STARTUP_GRACE`` of
its start (a busy port can look ready: whatever holds it may answer ``/ready``), is not
restarted: the runner gives up with that process's own last error line.  One that dies later
is restarted after a delay that doubles with each death, and more than ``RESTART_LIMIT`` deaths
in ``RESTART_WINDOW`` seconds make the runner give up the same way.  Each child's stderr passes
through the runner: its log records as they are, anything else as a warning naming the process.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Literal

from fraudscore.defaults import LOG_RECORD, PORT
from fraudscore.errors import StackError, StackStopped
from fraudscore.stack import proxies
from fraudscore.stack.cgroups import Cgroup, CgroupManager
from fraudscore.stack.limits import ServiceLimits, StackLimits, scaled

log = logging.getLogger(__name__)

Balancer = Literal["builtin", "nginx", "haproxy"]
READY_TIMEOUT = 30.0
# A process still up this long after its start has started: its death is then restarted.  Long
# enough for the balancer's Python to start under its 0.1 CPU quota (about 1.7 s) and bind.
STARTUP_GRACE = 3.0
# More deaths of one process than this within the window: something is wrong, stop trying.
RESTART_LIMIT, RESTART_WINDOW = 5, 60.0
# The delay before restarting: the first, doubled with each death in the window, up to the last.
BACKOFF_FIRST, BACKOFF_MAX = 0.1, 5.0
STDERR_TAIL_LINES = 5


def wait_ready(
    url: str,
    *,
    timeout: float = READY_TIMEOUT,
    process: subprocess.Popen[bytes] | None = None,
    stopping: Callable[[], bool] | None = None,
) -> float:
    """Seconds until GET {url}/ready answers 200; StackError if ``process`` exits or time runs out,
    StackStopped as soon as ``stopping()`` is true."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if stopping is not None and stopping():
            raise StackStopped(f"stopped before {url} was ready")
        if process is not None and process.poll() is not None:
            raise StackError(f"the process exited with {process.returncode} before {url} was ready")
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/ready", timeout=1) as r:
            if r.status == 200:
                return time.monotonic() - start
        time.sleep(0.02)
    raise StackError(f"{url} not ready in {timeout:.0f} s")


def probe(path: Path, *, handoff: bool, timeout: float = 1.0) -> bool:
    """Whether the instance behind ``path`` answers GET /ready with 200.

    For a handoff socket, one end of a socket pair is handed over like any client connection,
    so readiness is checked on the very path real connections take.
    """
    request = b"GET /ready HTTP/1.1\r\nHost: stack\r\nConnection: close\r\n\r\n"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as ctl:
            ctl.settimeout(timeout)
            ctl.connect(str(path))
            if handoff:
                ours, theirs = socket.socketpair()
                with ours, theirs:
                    socket.send_fds(ctl, [b"c"], [theirs.fileno()])
                    theirs.close()
                    return _ask(ours, request, timeout)
            return _ask(ctl, request, timeout)
    except OSError:
        return False


def _ask(sock: socket.socket, request: bytes, timeout: float) -> bool:
    sock.settimeout(timeout)
    sock.sendall(request)
    answer = sock.recv(4096)
    return answer.startswith(b"HTTP/1.1 200")


def _error_line(line: bytes) -> bytes:
    """The error in a child's stderr line: a line that is not a log record (the command's own
    one-line error), or the message of an ERROR log record; b"" for anything else."""
    record = LOG_RECORD.match(line)
    if record is None:
        return line.strip()
    if record.group(1) in (b"ERROR", b"CRITICAL"):
        return line[record.end() :].strip()
    return b""


@dataclass
class Process:
    """One process of the stack: how to start it, its cgroup, the running child, and its deaths."""

    name: str
    argv: list[str]
    limits: ServiceLimits
    socket: Path | None = None  # an instance's socket
    cgroup: Cgroup | None = None
    child: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    peak_rss_kib: int = 0
    started_at: float = 0.0
    deaths: list[float] = field(default_factory=list)  # when it was found dead, within the window
    restart_at: float | None = None  # when a dead process is due to start again
    _tail: deque[bytes] = field(default_factory=lambda: deque(maxlen=STDERR_TAIL_LINES))
    _relay: threading.Thread | None = None

    def start(self) -> None:
        preexec = self.cgroup.enter if self.cgroup is not None else None
        self._tail.clear()
        self.child = subprocess.Popen(self.argv, preexec_fn=preexec, stderr=subprocess.PIPE)
        self.started_at = time.monotonic()
        self.restart_at = None
        self._relay = threading.Thread(
            target=self._pass_stderr, args=(self.child,), name=f"{self.name}-stderr", daemon=True
        )
        self._relay.start()

    def _pass_stderr(self, child: subprocess.Popen[bytes]) -> None:
        """The child's stderr, line by line, to ours; the last lines kept for its error."""
        assert child.stderr is not None
        with child.stderr:
            for line in child.stderr:
                self._tail.append(line.rstrip())
                if LOG_RECORD.match(line):
                    sys.stderr.buffer.write(line)
                    sys.stderr.buffer.flush()
                elif line.strip():
                    log.warning("%s: %s", self.name, line.decode(errors="replace").rstrip())

    def exit_reason(self, when: str = "") -> str:
        """How the dead child ended (and ``when``), with its own last error line: its output is
        read to the end first."""
        assert self.child is not None and self.child.returncode is not None
        if self._relay is not None:
            self._relay.join(timeout=1.0)  # a grandchild holding the pipe must not hold us
        code = self.child.returncode
        how = f"was killed by signal {-code}" if code < 0 else f"exited with {code}"
        how += f" {when}" if when else ""
        errors = [_error_line(x) for x in self._tail]
        last = next((x for x in reversed(errors) if x), b"").decode(errors="replace")
        return f"{how}: {last}" if last else f"{how} (no error message)"

    def sample(self) -> None:
        """Keep the peak RSS seen in /proc: it counts the mapped index, which a cgroup may not."""
        if self.child is None or self.child.poll() is not None:
            return
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{self.child.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.peak_rss_kib = max(self.peak_rss_kib, int(line.split()[1]))

    def stop(self, timeout: float) -> None:
        if self.child is None:
            return
        if self.child.poll() is None:
            self.child.terminate()
            try:
                self.child.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0f s: killing it", self.name, timeout)
                self.child.kill()
                self.child.wait()


@dataclass
class StackConfig:
    index: Path
    port: int = PORT
    instances: int = 2
    balancer: Balancer = "builtin"
    registry: Path | None = None  # passed on to every instance's --registry
    limits: bool = True
    host: str = "0.0.0.0"
    log_level: str = "INFO"
    workdir: Path | None = None
    metrics_port: int | None = None  # instance i serves GET /metrics on 127.0.0.1:metrics_port + i
    # the instances' --native-loop / --no-native-loop (handed-over connections: builtin only); None:
    # their default
    native_loop: bool | None = None
    stack_limits: StackLimits = field(init=False)

    def __post_init__(self) -> None:
        self.stack_limits = scaled(self.instances)


class Stack:
    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.workdir = config.workdir or Path(tempfile.mkdtemp(prefix="fraudscore-stack-"))
        self._own_workdir = config.workdir is None
        self.cgroups: CgroupManager | None = None
        self.instances: list[Process] = []
        self.balancer: Process | None = None
        self._stopping = False

    # -- starting ---------------------------------------------------------------------------

    def _fraudscore(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "fraudscore.cli", "--log-level", self.config.log_level, *args]

    def _instance(self, limits: ServiceLimits, i: int) -> Process:
        sock = self.workdir / f"{limits.name}.sock"
        mode = "--handoff" if self.config.balancer == "builtin" else "--uds"
        argv = self._fraudscore("serve", "--index", str(self.config.index), mode, str(sock))
        if self.config.registry is not None:
            argv += ["--registry", str(self.config.registry)]
        if self.config.metrics_port is not None:
            # each instance its own scrape target (service/metrics.py says why, not an aggregate)
            argv += ["--metrics-port", str(self.config.metrics_port + i)]
        if self.config.native_loop is not None and self.config.balancer == "builtin":
            argv.append("--native-loop" if self.config.native_loop else "--no-native-loop")
        return Process(limits.name, argv, limits, socket=sock)

    def _balancer(self, limits: ServiceLimits) -> Process:
        sockets = [str(p.socket) for p in self.instances]
        port = self.config.port
        if self.config.balancer == "nginx":
            argv = proxies.nginx_command(self.workdir / "nginx", sockets, port=port)
        elif self.config.balancer == "haproxy":
            argv = proxies.haproxy_command(self.workdir / "haproxy", sockets, port=port)
        else:
            upstreams = [a for s in sockets for a in ("--upstream", s)]
            argv = self._fraudscore("balance", "--host", self.config.host, "--port", str(port), *upstreams)
        return Process(limits.name, argv, limits)

    def start(self) -> None:
        cfg = self.config
        limits = cfg.stack_limits
        self.workdir.mkdir(parents=True, exist_ok=True)
        if cfg.limits:
            reason = CgroupManager.unavailable_reason()
            if reason is None:
                self.cgroups = CgroupManager()
            else:
                log.warning("cgroups unavailable, running without limits: %s", reason)
        self.instances = [self._instance(api, i) for i, api in enumerate(limits.apis)]
        self.balancer = self._balancer(limits.balancer)
        for proc in [*self.instances, self.balancer]:
            if self.cgroups is not None:
                proc.cgroup = self.cgroups.create(proc.limits)
        started = time.monotonic()
        for proc in self.instances:
            proc.start()
        for proc in self.instances:
            self._wait_ready(proc)
        if cfg.metrics_port is not None:  # each instance serves them from its start: say where
            for i, proc in enumerate(self.instances):
                log.info("%s metrics: http://127.0.0.1:%d/metrics", proc.name, cfg.metrics_port + i)
        self.balancer.start()
        assert self.balancer.child is not None
        host = "127.0.0.1" if cfg.host in ("0.0.0.0", "") else cfg.host
        try:
            wait_ready(f"http://{host}:{cfg.port}", process=self.balancer.child, stopping=self.stopping)
        except StackStopped:
            raise
        except StackError:
            if self.balancer.child.poll() is None:
                raise
            raise self._failed(self.balancer, f"before :{cfg.port} was ready") from None
        self._hold_through_grace()
        log.info(
            "stack up in %.1f s: %s balancer on :%d, %d instances%s",
            time.monotonic() - started,
            cfg.balancer,
            cfg.port,
            len(self.instances),
            (
                ", limits "
                + ", ".join(f"{s.name} {s.cpus:g} CPU/{s.memory_mib} MiB" for s in limits.services)
                if self.cgroups
                else ", no limits"
            ),
        )

    def _wait_ready(self, proc: Process) -> None:
        assert proc.socket is not None and proc.child is not None
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self._stopping:
                raise StackStopped(f"stopped before {proc.name} was ready")
            if proc.child.poll() is not None:
                raise self._failed(proc, "before it was ready")
            if probe(proc.socket, handoff=self.config.balancer == "builtin"):
                return
            time.sleep(0.02)
        raise StackError(f"{proc.name} not ready in {READY_TIMEOUT:.0f} s")

    def _failed(self, proc: Process, when: str) -> StackError:
        """The error that ends a start: the process's own last words."""
        return StackError(f"{proc.name} {proc.exit_reason(when)}")

    def _hold_through_grace(self) -> None:
        """Wait until the balancer has been up ``STARTUP_GRACE`` seconds: if it dies by then it
        failed to start, even though something answered for it (a port already taken).  The
        instances need no grace: each answered on its own socket, so they did start."""
        assert self.balancer is not None and self.balancer.child is not None
        until = self.balancer.started_at + STARTUP_GRACE
        while time.monotonic() < until:
            if self._stopping:
                raise StackStopped("stopped while starting")
            if self.balancer.child.poll() is not None:
                raise self._failed(self.balancer, "right after it started")
            time.sleep(0.02)

    # -- running ----------------------------------------------------------------------------

    def catch_signals(self) -> None:
        """SIGINT and SIGTERM ask for an orderly stop from now on, start-up included: dying on
        the default action would leave the children running."""

        def stop(signum: int, frame: FrameType | None) -> None:
            self._stopping = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)

    def stopping(self) -> bool:
        return self._stopping

    def watch(self) -> None:
        """Restart what dies, with backoff, until SIGINT or SIGTERM (``catch_signals``); StackError
        when one process dies more than ``RESTART_LIMIT`` times in ``RESTART_WINDOW`` seconds."""
        while not self._stopping:
            for proc in self.processes:
                proc.sample()
                if self._stopping or proc.child is None or proc.child.poll() is None:
                    continue
                now = time.monotonic()
                if proc.restart_at is None:
                    self._schedule_restart(proc, now)
                elif now >= proc.restart_at:
                    self._restart(proc)
            time.sleep(0.05)

    def _schedule_restart(self, proc: Process, now: float) -> None:
        """A death seen: count it, give up if it is one too many, else set the restart's time."""
        proc.deaths = [t for t in proc.deaths if now - t < RESTART_WINDOW] + [now]
        reason = proc.exit_reason()
        if len(proc.deaths) > RESTART_LIMIT:
            raise StackError(
                f"{proc.name} died {len(proc.deaths)} times within {RESTART_WINDOW:.0f} s; "
                f"giving up: the last time it {reason}"
            )
        delay = min(BACKOFF_FIRST * 2 ** (len(proc.deaths) - 1), BACKOFF_MAX)
        log.warning("%s %s: restarting it in %.1f s", proc.name, reason, delay)
        proc.restart_at = now + delay

    @property
    def processes(self) -> list[Process]:
        return [*self.instances, *([self.balancer] if self.balancer else [])]

    def _restart(self, proc: Process) -> None:
        proc.restarts += 1
        proc.start()
        if proc.socket is not None:
            try:
                self._wait_ready(proc)
            except StackStopped:
                return
            except StackError as exc:
                if proc.child is not None and proc.child.poll() is None:
                    log.error("%s", exc)  # alive, not ready in time
                return  # or dead again: watch() counts the death and says why
        log.info("%s is back", proc.name)

    # -- stopping ---------------------------------------------------------------------------

    def stop(self, timeout: float = 15.0) -> dict[str, dict[str, float | int | None]]:
        """Balancer first, then the instances; returns each process's peak memory and CPU."""
        report: dict[str, dict[str, float | int | None]] = {}
        if self.balancer is not None:
            self.balancer.stop(timeout)
        for proc in self.instances:
            proc.stop(timeout)
        for proc in self.processes:
            cg = proc.cgroup
            report[proc.name] = {
                # the cgroup's peak leaves out index pages another cgroup faulted in first: show RSS too
                "peak_rss_bytes": proc.peak_rss_kib * 1024,
                "peak_memory_bytes": cg.peak_memory_bytes() if cg else proc.peak_rss_kib * 1024,
                "memory_limit_bytes": proc.limits.memory_bytes if cg else None,
                "cpu_seconds": cg.cpu_seconds() if cg else None,
                "throttled_seconds": cg.throttled_seconds() if cg else None,
                "restarts": proc.restarts,
            }
        if self.cgroups is not None:
            self.cgroups.cleanup(kill=True)
        for proc in self.instances:
            if proc.socket is not None:
                with contextlib.suppress(FileNotFoundError):
                    proc.socket.unlink()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return report


def run(config: StackConfig) -> dict[str, dict[str, float | int | None]]:
    stack = Stack(config)
    stack.catch_signals()
    try:
        stack.start()
        stack.watch()
    except StackStopped as exc:
        log.info("%s", exc)
    finally:
        report = stack.stop()
        for name, r in report.items():
            peak = r["peak_memory_bytes"]
            rss = r["peak_rss_bytes"]
            cpu = r["cpu_seconds"]
            throttled = r["throttled_seconds"]
            log.info(
                "%s: peak RSS %s, peak memory %s, CPU %s (throttled %s), restarts %s",
                name,
                f"{rss / 2**20:.1f} MiB" if isinstance(rss, int) else "?",
                f"{peak / 2**20:.1f} MiB" if isinstance(peak, int) else "?",
                f"{cpu:.1f} s" if isinstance(cpu, float) else "?",
                f"{throttled:.2f} s" if isinstance(throttled, float) else "?",
                r["restarts"],
            )
    return report
