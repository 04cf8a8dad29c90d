"""The machine's floor: a minimal C server answering a constant, under the stack's own harness.

    python bench/floor.py [--direct] [--target 900] [--duration 120] [--runs 1] [--no-chart]

Compiles ``bench/floor/floor.c`` (into ``bench/floor/build/``, when the source is newer), then
runs what `bench/stack.py --outer` runs, with the floor in place of each instance: one cgroup of
1 CPU / 350 MB around the servers, and beside it `fraudscore loadtest --cycle` (the contract's
1 -> 900 req/s ramp over 120 s; ``--target`` scales it).  By default that is the stack's
topology, `fraudscore balance` handing connections to two floor servers by SCM_RIGHTS; with
``--direct``, one floor server on the TCP port and no balancer.

Every answer is the same `{"approved":true,"fraud_score":0.0}`, so k6's counts show every
fraud as a false negative and the score's detection part means nothing here: only latency,
HTTP errors and CPU do.  Printed: k6's percentiles, the cgroup's CPU per request and CFS
throttling during the load, and each floor server's reads, writes and epoll waits per request.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from _common import (
    ROOT,
    Observer,
    cli,
    cpu_counters,
    free_port,
    loadtest,
    machine,
    outer_cgroup,
    outer_figures,
    outer_line,
    run_line,
)
from fraudscore.loadtest.profile import DURATION_S, TARGET_RATE
from fraudscore.stack.runner import wait_ready

SOURCE = ROOT / "bench" / "floor" / "floor.c"
BINARY = ROOT / "bench" / "floor" / "build" / "floor"
INSTANCES = 2  # as the stack's topology
# what a floor server prints when it stops
COUNTS = re.compile(r"floor: requests (\d+) connections (\d+) reads (\d+) writes (\d+) epoll_waits (\d+)")


def build() -> Path:
    """The floor's binary, compiled again when the source is newer."""
    if not BINARY.exists() or BINARY.stat().st_mtime < SOURCE.stat().st_mtime:
        BINARY.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(BINARY), str(SOURCE)], check=True
        )
    return BINARY


def wait_for(path: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear in {timeout:.0f} s")
        time.sleep(0.01)


def floor_counts(log: str) -> list[dict[str, int]]:
    """Each floor server's counts, from the lines they print when they stop."""
    keys = ("requests", "connections", "reads", "writes", "epoll_waits")
    return [dict(zip(keys, map(int, m.groups()), strict=True)) for m in COUNTS.finditer(log)]


def run_once(
    direct: bool, target: float, duration: float, out: Path, chart: bool, observe: Observer | None = None
) -> dict[str, Any]:
    binary = build()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "floor.log"
    manager, outer = outer_cgroup()
    processes: list[subprocess.Popen[bytes]] = []
    figures: dict[str, float] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="fraudscore-floor-") as tmp, open(log_path, "wb") as log:
            if direct:
                argv = [[str(binary), "--port", str(port)]]
            else:
                sockets = [Path(tmp) / f"floor{i + 1}.sock" for i in range(INSTANCES)]
                argv = [[str(binary), "--handoff", str(s)] for s in sockets]
            for args in argv:
                processes.append(subprocess.Popen(args, stderr=log, preexec_fn=outer.enter))
            if not direct:
                for s in sockets:
                    wait_for(s)
                upstreams = [a for s in sockets for a in ("--upstream", str(s))]
                balance = cli(
                    "balance", "--host", "127.0.0.1", "--port", str(port), *upstreams, log_level="INFO"
                )
                processes.append(subprocess.Popen(balance, stderr=log, preexec_fn=outer.enter))
            wait_ready(url, timeout=30)
            before = cpu_counters(outer)
            names = ["floor"] if direct else [f"floor{i + 1}" for i in range(INSTANCES)] + ["lb"]
            with (
                observe(dict(zip(names, (p.pid for p in processes), strict=True)))
                if observe
                else nullcontext()
            ):
                result = loadtest(url, target, duration, out, chart=chart)
            figures = outer_figures(outer, result["requests"], before)
            # the balancer first, as the stack stops: then the servers print their counts
            for proc in reversed(processes):
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=15)
    finally:
        for proc in processes:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        manager.cleanup(kill=True)
    result["outer"] = figures
    result["floors"] = floor_counts(log_path.read_text())
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def floor_line(counts: dict[str, int]) -> str:
    n = counts["requests"] or 1
    return (
        f"floor server: {counts['requests']} requests on {counts['connections']} connections; per request "
        f"{counts['reads'] / n:.2f} reads, {counts['writes'] / n:.2f} writes, "
        f"{counts['epoll_waits'] / n:.2f} epoll waits"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--direct", action="store_true", help="one floor server on the port, no balancer")
    parser.add_argument("--target", type=float, default=TARGET_RATE, help="req/s at the end of the ramp")
    parser.add_argument("--duration", type=float, default=DURATION_S)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--no-chart", action="store_true", help="k6 without per-request samples")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    for i in range(args.runs):
        topology = "direct" if args.direct else "builtin"
        nochart = "-nochart" if args.no_chart else ""
        name = f"floor-{topology}-outer{nochart}-{args.target:g}-run{i + 1}"
        out = ROOT / "bench" / "results" / name
        result = run_once(args.direct, args.target, args.duration, out, chart=not args.no_chart)
        print(run_line(name, result))
        for counts in result["floors"]:
            print(f"    {floor_line(counts)}")
        print(f"    {outer_line(result['outer'])}")


if __name__ == "__main__":
    main()
