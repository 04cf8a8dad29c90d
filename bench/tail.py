"""Where the tail comes from: the stack (or the floor) under the contract's ramp, watched from outside.

    python bench/tail.py [--floor] [--target 900] [--duration 120] [--window-at S] [--window S] [--no-chart]

Runs `bench/stack.py --outer` (or, with --floor, `bench/floor.py`: the same harness around the
constant-answer C server) and, while k6 runs, watches the server processes from outside, so no
code of theirs changes.  Needs root and `perf`.

Over the whole load test, per request (k6's count):
- system calls of the servers, by name (``perf stat`` on the syscall tracepoints);
- CPU and run-queue wait of each server's main thread (``/proc/PID/schedstat``: time on the
  CPU, time runnable but waiting for it, timeslices), and its context switches
  (``/proc/PID/status``: voluntary, i.e. it slept, and involuntary, i.e. it was preempted);
- Python garbage collections, by generation (a uprobe on libpython's ``gc_collect_main``);
- CFS throttling of the outer cgroup (``cpu.stat``), as bench/stack.py reports it.

In a window near the ramp's peak (``--window-at``, ``--window`` seconds long), two recordings:
- every scheduler switch on the machine (``perf sched``): the delay from each wake-up to running
  ("sch delay") for the servers' main threads, for k6's threads and for the balancer;
- the servers' reads, writes and epoll waits with timestamps: inside a server, the time from
  entering the read that brings a request to leaving the write of its answer, the time from the
  epoll wait's return to that answer (what is served before it in the same batch), and how many
  events each epoll wait returns.

The recordings cost the traced processes some CPU of their own (perf's ring buffer): the
latency k6 reports in a run of this script is not a clean figure; take the clean ones from
bench/stack.py and bench/floor.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import floor
import stack
from _common import ROOT, machine, outer_line, run_line
from fraudscore.loadtest.profile import DURATION_S, TARGET_RATE

LIBPYTHON = (
    Path(sys.base_prefix) / "lib" / f"libpython{sys.version_info.major}.{sys.version_info.minor}.so.1.0"
)
GC_PROBE_GROUP = "fraudscore_tail"
GC_PROBE = f"{GC_PROBE_GROUP}:gc"
# the syscalls a server's request path may use: uvloop reads and writes, the floor recvs and sends
IO_SYSCALLS = ("read", "recvfrom", "write", "writev", "sendto", "epoll_wait", "epoll_pwait")
READS = {"read", "recvfrom"}
WRITES = {"write", "writev", "sendto"}
EPOLLS = {"epoll_wait", "epoll_pwait"}
# counted over the whole load; the servers' fast path uses only the first few
COUNTED_SYSCALLS = (
    *IO_SYSCALLS,
    "epoll_ctl",
    "recvmsg",
    "sendmsg",
    "accept4",
    "close",
    "futex",
    "ioctl",
    "fcntl",
    "getsockopt",
    "setsockopt",
    "getsockname",
    "getpeername",
    "mmap",
    "munmap",
    "madvise",
    "brk",
    "io_uring_enter",
)
# a loop's epoll timeout that grows by more than this ran a timer (the sweep, due every second)
TIMER_JUMP_MS = 500
SCHED_EVENTS = "sched:sched_switch,sched:sched_wakeup,sched:sched_waking"
SCHEDSTAT_FIELDS = ("cpu_ns", "wait_ns", "timeslices")


# --- reading /proc ---------------------------------------------------------------------------------


def schedstat(pid: int) -> dict[str, int]:
    """The main thread's time on the CPU, time waiting on a run queue (ns), and timeslices run."""
    values = Path(f"/proc/{pid}/schedstat").read_text().split()
    return dict(zip(SCHEDSTAT_FIELDS, map(int, values), strict=True))


def switches(pid: int) -> dict[str, int]:
    """The main thread's context switches: voluntary (it slept) and involuntary (preempted)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"):
            fields[key.split("_")[0]] = int(value)
    return fields


def user_system(pid: int) -> dict[str, int]:
    """The main thread's CPU time in user space and in the kernel, in clock ticks."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return {"user_ticks": int(fields[11]), "system_ticks": int(fields[12])}


def snapshot(pids: dict[str, int]) -> dict[str, dict[str, int]]:
    return {name: {**schedstat(pid), **switches(pid), **user_system(pid)} for name, pid in pids.items()}


# --- perf ------------------------------------------------------------------------------------------


def is_python(pid: int) -> bool:
    return b"python" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]


@contextlib.contextmanager
def gc_probe() -> Iterator[str | None]:
    """A uprobe on libpython's collector, with the generation it collects; removed on leaving."""
    if not LIBPYTHON.exists():
        yield None
        return
    added = subprocess.run(
        ["perf", "probe", "-q", "-x", str(LIBPYTHON), "-a", f"{GC_PROBE}=gc_collect_main generation"],
        capture_output=True,
        text=True,
    )
    if added.returncode != 0:
        print(f"    (no GC probe: {added.stderr.strip().splitlines()[-1:]})")
        yield None
        return
    try:
        yield GC_PROBE
    finally:
        subprocess.run(["perf", "probe", "-q", "-d", f"{GC_PROBE_GROUP}:*"], capture_output=True)


def server_filter(pids: Iterable[int]) -> str:
    """A tracepoint filter for the servers' main threads.

    Events are counted machine-wide (``-a``) and filtered, rather than attached to the processes
    (``-p``): events attached to a task are switched in and out with it at every context switch,
    which cost the floor more CPU per request than its own work did."""
    return " || ".join(f"common_pid == {pid}" for pid in pids)


def filtered(events: Iterable[str], only: str) -> list[str]:
    """perf's arguments for ``events``, each with the filter ``only``."""
    return [a for e in events for a in ("-e", e, "--filter", only)]


def perf_stat_counts(path: Path) -> dict[str, int]:
    """Event -> count from `perf stat -x,` output."""
    counts: dict[str, int] = {}
    for line in path.read_text().splitlines():
        fields = line.split(",")
        if len(fields) >= 3 and fields[0].strip().isdigit():
            counts[fields[2]] = counts.get(fields[2], 0) + int(fields[0])
    return counts


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {
        "n": len(ordered),
        "mean": sum(ordered) / len(ordered),
        "p50": at(0.50),
        "p90": at(0.90),
        "p99": at(0.99),
        "p999": at(0.999),
        "max": ordered[-1],
    }


TIMEHIST_ROW = re.compile(
    r"^\s*[\d.]+\s+\[\d+\]\s+(?P<name>.+?)\[(?P<tid>\d+)(?:/(?P<pid>\d+))?\]\s+"
    r"(?P<wait>[\d.]+)\s+(?P<delay>[\d.]+)\s+(?P<run>[\d.]+)"
)


def sched_delays(data: Path, groups: dict[str, set[int]]) -> dict[str, dict[str, float]]:
    """Wake-up to running ("sch delay", in µs) per group of threads, from `perf sched timehist`."""
    out = subprocess.run(
        ["perf", "sched", "timehist", "-i", str(data)], capture_output=True, text=True
    ).stdout
    delays: dict[str, list[float]] = defaultdict(list)
    for line in out.splitlines():
        m = TIMEHIST_ROW.match(line)
        if not m:
            continue
        tid = int(m["tid"])
        name = m["name"].strip()
        for group, members in groups.items():
            # k6 has exited by now: its threads are known by their name
            if tid in members or (group == "k6" and name == "k6"):
                delays[group].append(float(m["delay"]) * 1000)  # ms -> µs
    return {group: percentiles(values) for group, values in delays.items()}


SCRIPT_ROW = re.compile(
    r"^\s*(?P<tid>\d+)\s+(?P<time>[\d.]+):\s+syscalls:sys_(?P<dir>enter|exit)_(?P<call>\w+):\s*(?P<rest>.*)$"
)


@dataclass
class Pending:
    read_entered: float
    epoll_returned: float


def request_path(data: Path) -> dict[str, Any]:
    """From the servers' syscall trace: per request, read entered -> write left and epoll return ->
    write left (µs); events per epoll wait; and how long the loop runs between two waits, in all
    and in the iterations that ran a timer (the deadline sweep, once a second): those after which
    the wait's timeout jumps up, as the timer is set again for its next time."""
    out = subprocess.run(
        ["perf", "script", "-i", str(data), "-F", "tid,time,event,trace"], capture_output=True, text=True
    ).stdout
    entered: dict[int, tuple[str, float, int]] = {}  # tid -> (call, time, fd)
    epoll_returned: dict[int, float] = {}
    pending: dict[tuple[int, int], Pending] = {}
    read_to_write: list[float] = []
    epoll_to_write: list[float] = []
    batch: list[float] = []
    iteration_began: dict[int, float] = {}  # tid -> when its epoll wait returned
    last_timeout: dict[int, int] = {}  # tid -> its last epoll wait's timeout, ms (-1: none)
    iterations: list[float] = []
    timer_iterations: list[float] = []
    calls: Counter[str] = Counter()
    for line in out.splitlines():
        m = SCRIPT_ROW.match(line)
        if not m:
            continue
        tid, t, call = int(m["tid"]), float(m["time"]) * 1e6, m["call"]
        if m["dir"] == "enter":
            if call in EPOLLS:  # a later read belongs to the wait that returns next, not an earlier one
                epoll_returned.pop(tid, None)
                timeout_match = re.search(r"timeout: 0x([0-9a-f]+)", m["rest"])
                timeout = int(timeout_match[1], 16) if timeout_match else -1
                timeout = -1 if timeout >= 1 << 31 else timeout
                began_iteration = iteration_began.pop(tid, None)
                previous = last_timeout.get(tid, -1)
                if began_iteration is not None:
                    iterations.append(t - began_iteration)
                    if previous >= 0 and timeout > previous + TIMER_JUMP_MS:
                        timer_iterations.append(t - began_iteration)
                last_timeout[tid] = timeout
            fd_match = re.search(r"fd: 0x([0-9a-f]+)", m["rest"])
            entered[tid] = (call, t, int(fd_match[1], 16) if fd_match else -1)
            continue
        ret = int(m["rest"].split()[0], 16)
        ret = ret - (1 << 64) if ret >= 1 << 63 else ret
        began = entered.pop(tid, None)
        if began is None or began[0] != call:
            continue
        calls[call] += 1
        fd = began[2]
        if call in EPOLLS:
            epoll_returned[tid] = t
            batch.append(ret)
            iteration_began[tid] = t
        elif call in READS and ret > 0:
            # a request split over reads counts from its first; perf may lose events under load, so
            # an epoll return not seen (NaN) leaves that request out of the epoll figure
            pending.setdefault((tid, fd), Pending(began[1], epoll_returned.get(tid, math.nan)))
        elif call in WRITES and ret > 0:
            p = pending.pop((tid, fd), None)
            if p is not None:
                read_to_write.append(t - p.read_entered)
                if not math.isnan(p.epoll_returned):
                    epoll_to_write.append(t - p.epoll_returned)
    stats = subprocess.run(
        ["perf", "report", "--stats", "-i", str(data)], capture_output=True, text=True
    ).stdout
    lost = re.search(r"LOST events:\s+(\d+)", stats)
    return {
        "lost_events": int(lost[1]) if lost else 0,
        "calls": dict(calls),
        "read_to_write_us": percentiles(read_to_write),
        "epoll_to_write_us": percentiles(epoll_to_write),
        "events_per_epoll_wait": percentiles(batch),
        "loop_iteration_us": percentiles(iterations),
        "timer_iteration_us": percentiles(timer_iterations),
    }


class Watch:
    """What ``bench/tail.py`` observes while k6 runs; ``report`` holds the figures afterwards."""

    def __init__(self, workdir: Path, window_at: float, window_s: float) -> None:
        self.workdir = workdir
        self.window_at, self.window_s = window_at, window_s
        self.report: dict[str, Any] = {}
        self.started = 0.0
        self.window_threads: dict[str, dict[str, int]] = {}
        self.window_span: tuple[float, float] | None = None

    @contextlib.contextmanager
    def __call__(self, processes: dict[str, int]) -> Iterator[None]:
        servers = {n: p for n, p in processes.items() if n != "lb"}
        only = server_filter(servers.values())
        events = ["raw_syscalls:sys_enter", *(f"syscalls:sys_enter_{c}" for c in COUNTED_SYSCALLS)]
        with gc_probe() as gc_event:
            if gc_event is not None and any(is_python(p) for p in servers.values()):
                events.append(gc_event)
            stat_file = self.workdir / "stat.csv"
            before = snapshot(processes)
            stat = subprocess.Popen(
                ["perf", "stat", "-a", "-x", ",", "-o", str(stat_file), *filtered(events, only)]
            )
            gc_record = None
            if gc_event in events:
                gc_record = subprocess.Popen(
                    [
                        "perf",
                        "record",
                        "-q",
                        "-a",
                        *filtered([str(gc_event)], only),
                        "-o",
                        str(self.workdir / "gc.data"),
                    ],
                    stderr=subprocess.DEVNULL,
                )
            window = threading.Timer(self.window_at, self._record_window, (only, processes))
            window.start()
            self.started = started = time.monotonic()
            try:
                yield
            finally:
                window.cancel()
                window.join()
                after = snapshot(processes)
                for proc in (stat, gc_record):
                    if proc is not None:
                        proc.send_signal(signal.SIGINT)
                        proc.wait()
            self.report["load_seconds"] = time.monotonic() - started
            self.report["counts"] = perf_stat_counts(stat_file)
            self.report["threads"] = {
                name: {key: after[name][key] - before[name][key] for key in after[name]} for name in processes
            }
            if self.window_span is not None:
                self.report["window"] = {"span_s": self.window_span, "threads": self.window_threads}
            if gc_record is not None:
                self.report["gc_by_generation"] = gc_generations(self.workdir / "gc.data")
        threads = {name: {pid} for name, pid in processes.items()}
        sched = self.workdir / "sched.data"
        if sched.exists():
            self.report["sched_delay_us"] = sched_delays(
                sched, {"servers": set(servers.values()), **threads, "k6": set()}
            )
        syscalls = self.workdir / "syscalls.data"
        if syscalls.exists():
            self.report["request_path"] = request_path(syscalls)

    def _record_window(self, only: str, processes: dict[str, int]) -> None:
        # the recordings cost CPU of their own: the threads' figures are also kept for the window
        # alone, so what was counted outside it can be told apart
        window_began = time.monotonic()
        first = snapshot(processes)
        io = [f"syscalls:sys_{d}_{c}" for c in IO_SYSCALLS for d in ("enter", "exit")]
        seconds = str(self.window_s)
        sched = subprocess.Popen(
            [
                "perf",
                "record",
                "-q",
                "-a",
                "-e",
                SCHED_EVENTS,
                "-o",
                str(self.workdir / "sched.data"),
                "--",
                "sleep",
                seconds,
            ],
            stderr=subprocess.DEVNULL,
        )
        io_rec = subprocess.Popen(
            [
                "perf",
                "record",
                "-q",
                "-a",
                *filtered(io, only),
                "-o",
                str(self.workdir / "syscalls.data"),
                "--",
                "sleep",
                seconds,
            ],
            stderr=subprocess.DEVNULL,
        )
        sched.wait()
        io_rec.wait()
        last = snapshot(processes)
        self.window_threads = {name: {k: last[name][k] - first[name][k] for k in last[name]} for name in last}
        self.window_span = (window_began - self.started, time.monotonic() - self.started)


def gc_generations(data: Path) -> dict[str, int]:
    out = subprocess.run(["perf", "script", "-i", str(data)], capture_output=True, text=True).stdout
    return dict(Counter(m[1] for m in re.finditer(r"generation=(\d+)", out)))


# --- reporting ----------------------------------------------------------------------------------------


def spread(p: dict[str, float]) -> str:
    """A distribution from ``percentiles`` in one line."""
    return (
        f"n {p['n']:.0f}, mean {p['mean']:.1f} p50 {p['p50']:.1f} p90 {p['p90']:.1f} "
        f"p99 {p['p99']:.1f} p99.9 {p['p999']:.1f} max {p['max']:.1f}"
    )


def ramp_requests(profile: dict[str, float], begin: float, end: float) -> float:
    """How many requests the linear ramp starts between ``begin`` and ``end`` s into the load."""
    start, target, duration = profile["start_rate"], profile["target_rate"], profile["duration_s"]
    begin, end = max(0.0, begin), min(duration, end)
    return (
        start * (end - begin) + (target - start) * (end**2 - begin**2) / (2 * duration)
        if end > begin
        else 0.0
    )


def thread_line(name: str, d: dict[str, int], n: float) -> str:
    """A thread's counters per request (``n`` requests)."""
    tick = os.sysconf("SC_CLK_TCK") / 1e6  # clock ticks per µs
    return (
        f"{name}: CPU {d['cpu_ns'] / n / 1e3:.1f} us/request (user {d['user_ticks'] / tick / n:.1f}, "
        f"kernel {d['system_ticks'] / tick / n:.1f}), run-queue wait {d['wait_ns'] / n / 1e3:.1f} us/request "
        f"({d['wait_ns'] / max(1, d['timeslices']) / 1e3:.1f} us per timeslice, "
        f"{d['timeslices'] / n:.2f} timeslices/request); context switches per request: "
        f"voluntary {d['voluntary'] / n:.2f}, involuntary {d['nonvoluntary'] / n:.3f}"
    )


def per_request(report: dict[str, Any], result: dict[str, Any]) -> list[str]:
    n = result["requests"] or 1
    lines = []
    counts: dict[str, int] = dict(report.get("counts", {}))
    total = counts.pop("raw_syscalls:sys_enter", 0)
    named = sorted(
        ((c, e.removeprefix("syscalls:sys_enter_")) for e, c in counts.items() if c and "sys_enter_" in e),
        reverse=True,
    )
    lines.append(
        f"syscalls per request (servers, whole load): {total / n:.2f} in all; "
        + ", ".join(f"{name} {c / n:.3f}" for c, name in named[:10])
    )
    threads: dict[str, dict[str, int]] = report.get("threads", {})
    window = report.get("window")
    if window:  # outside the window: the whole load less the window, and the ramp's requests in it
        in_window = ramp_requests(result["profile"], *window["span_s"])
        outside = {
            name: {k: v - window["threads"][name][k] for k, v in d.items()} for name, d in threads.items()
        }
        lines.append(
            f"main threads, per request (the ramp's count: {n - in_window:.0f} outside the recording "
            f"window, {in_window:.0f} in it):"
        )
        groups = [
            ("outside the window", outside, n - in_window),
            ("in the window", window["threads"], in_window),
        ]
    else:
        lines.append("main threads, per request:")
        groups = [("whole load", threads, n)]
    for label, group, count in groups:
        servers = [d for name, d in group.items() if name != "lb"]
        together = {k: sum(d[k] for d in servers) for k in servers[0]} if servers else {}
        if together:
            lines.append("  " + thread_line(f"servers together, {label}", together, count or 1))
        for name, d in group.items():
            lines.append("  " + thread_line(f"{name}, {label}", d, count or 1))
    if "gc_by_generation" in report:
        lines.append(
            f"garbage collections during the load, by generation: {report['gc_by_generation'] or 'none'}"
        )
    for group, p in report.get("sched_delay_us", {}).items():
        if p.get("n"):
            lines.append(f"window, wake-up -> running ({group}), us: {spread(p)}")
    path = report.get("request_path")
    if path:
        for key, label in (
            ("read_to_write_us", "read entered -> answer written, us"),
            ("epoll_to_write_us", "epoll returned -> answer written, us"),
            ("events_per_epoll_wait", "events per epoll wait"),
            ("loop_iteration_us", "epoll returned -> next epoll wait (a loop iteration), us"),
            ("timer_iteration_us", "the same, in the iterations that ran the sweep's timer, us"),
        ):
            p = path[key]
            if p.get("n"):
                lines.append(f"window, {label}: {spread(p)}")
        lines.append(f"window, traced calls: {path['calls']}; perf lost {path['lost_events']} events")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--floor", action="store_true", help="watch bench/floor.py's floor instead of the stack"
    )
    parser.add_argument("--direct", action="store_true", help="with --floor: one floor server, no balancer")
    parser.add_argument("--target", type=float, default=TARGET_RATE, help="req/s at the end of the ramp")
    parser.add_argument("--duration", type=float, default=DURATION_S)
    parser.add_argument(
        "--window-at", type=float, help="seconds into the load (default: 3/4 of the duration)"
    )
    parser.add_argument("--window", type=float, help="seconds recorded (default: 1/8 of the duration)")
    parser.add_argument("--no-chart", action="store_true", help="k6 without per-request samples")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="keep perf's recordings in DIR")
    args = parser.parse_args()
    if shutil.which("perf") is None:
        parser.error("perf is not installed (apt-get install linux-perf)")
    window_at = args.window_at if args.window_at is not None else args.duration * 0.75
    window_s = args.window if args.window is not None else args.duration / 8
    print(f"machine: {machine()}")
    what = ("floor-direct" if args.direct else "floor-builtin") if args.floor else "stack-builtin"
    name = f"tail-{what}-outer{'-nochart' if args.no_chart else ''}-{args.target:g}"
    out = ROOT / "bench" / "results" / name
    with tempfile.TemporaryDirectory(prefix="fraudscore-tail-") as tmp:
        perf_dir = args.keep or Path(tmp)
        perf_dir.mkdir(parents=True, exist_ok=True)
        watch = Watch(perf_dir, window_at, window_s)
        if args.floor:
            result = floor.run_once(
                args.direct, args.target, args.duration, out, not args.no_chart, observe=watch
            )
        else:
            result = stack.run_once(
                "builtin", True, args.target, args.duration, out, chart=not args.no_chart, observe=watch
            )
    result["tail"] = watch.report
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(run_line(name, result))
    print(f"    {outer_line(result['outer'])}")
    for line in per_request(watch.report, result):
        print(f"    {line}")


if __name__ == "__main__":
    main()
