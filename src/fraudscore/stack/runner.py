"""`fraudscore stack`: the contract's topology (a balancer and N instances) as local processes.

Each process runs in its own cgroup with the limits of ``limits.py`` (the numbers the compose
file is generated from) where cgroups are writable; ``--no-limits`` skips that, for running the
whole stack inside one outer limit.  The runner waits for every instance's ``/ready``, restarts
any process that dies, and on SIGINT/SIGTERM (even one that arrives while it is starting)
stops in order: the balancer first (no new connections), then the instances (they finish what
they have begun), then removes its cgroups and socket files.
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
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Literal

from fraudscore.defaults import PORT
from fraudscore.errors import StackError, StackStopped
from fraudscore.stack import proxies
from fraudscore.stack.cgroups import Cgroup, CgroupManager
from fraudscore.stack.limits import ServiceLimits, StackLimits, scaled

log = logging.getLogger(__name__)

Balancer = Literal["builtin", "nginx", "haproxy"]
READY_TIMEOUT = 30.0


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


@dataclass
class Process:
    """One process of the stack: how to start it, its cgroup, and the running child."""

    name: str
    argv: list[str]
    limits: ServiceLimits
    socket: Path | None = None  # an instance's socket
    cgroup: Cgroup | None = None
    child: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    peak_rss_kib: int = 0

    def start(self) -> None:
        preexec = self.cgroup.enter if self.cgroup is not None else None
        self.child = subprocess.Popen(self.argv, preexec_fn=preexec)

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
    limits: bool = True
    host: str = "0.0.0.0"
    log_level: str = "INFO"
    workdir: Path | None = None
    metrics_port: int | None = None  # instance i serves GET /metrics on 127.0.0.1:metrics_port + i
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
        if self.config.metrics_port is not None:
            # each instance its own scrape target (service/metrics.py says why, not an aggregate)
            argv += ["--metrics-port", str(self.config.metrics_port + i)]
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
        self.balancer.start()
        assert self.balancer.child is not None
        host = "127.0.0.1" if cfg.host in ("0.0.0.0", "") else cfg.host
        wait_ready(f"http://{host}:{cfg.port}", process=self.balancer.child, stopping=self.stopping)
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
        if cfg.metrics_port is not None:
            for i, proc in enumerate(self.instances):
                log.info("%s metrics: http://127.0.0.1:%d/metrics", proc.name, cfg.metrics_port + i)

    def _wait_ready(self, proc: Process) -> None:
        assert proc.socket is not None and proc.child is not None
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self._stopping:
                raise StackStopped(f"stopped before {proc.name} was ready")
            if proc.child.poll() is not None:
                raise StackError(f"{proc.name} exited with {proc.child.returncode} before it was ready")
            if probe(proc.socket, handoff=self.config.balancer == "builtin"):
                return
            time.sleep(0.02)
        raise StackError(f"{proc.name} not ready in {READY_TIMEOUT:.0f} s")

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
        """Restart what dies, until SIGINT or SIGTERM (``catch_signals``)."""
        while not self._stopping:
            for proc in self.processes:
                proc.sample()
                if proc.child is not None and proc.child.poll() is not None and not self._stopping:
                    self._restart(proc)
            time.sleep(0.05)

    @property
    def processes(self) -> list[Process]:
        return [*self.instances, *([self.balancer] if self.balancer else [])]

    def _restart(self, proc: Process) -> None:
        assert proc.child is not None
        log.warning("%s exited with %s: restarting it", proc.name, proc.child.returncode)
        proc.restarts += 1
        proc.start()
        if proc.socket is not None:
            try:
                self._wait_ready(proc)
            except StackStopped:
                return
            except StackError as exc:
                log.error("%s", exc)
                return
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
