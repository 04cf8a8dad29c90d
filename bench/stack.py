"""The whole stack under the contract's load test, scored, with each process's peak memory and CPU.

    python bench/stack.py [--lb builtin|nginx|haproxy] [--outer] [--target 900] [--runs 1]

Starts `fraudscore stack` (each process in its own cgroup with the compose file's limits; with
--outer, `--no-limits` inside one cgroup of 1 CPU / 350 MB instead), runs `fraudscore loadtest
--cycle` (the contract's 1 -> 900 req/s ramp over 120 s on the dev payloads, reused once they
run out so the ramp reaches its target), and reads the cgroups when the stack stops.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
from pathlib import Path
from typing import Any

from _common import ROOT, fraudscore, free_port, loadtest, machine
from fraudscore.stack.cgroups import Cgroup, CgroupManager
from fraudscore.stack.limits import DEFAULT_STACK
from fraudscore.stack.runner import wait_ready


def run_once(lb: str, outer: bool, target: float, duration: float, out: Path) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = fraudscore("stack", "--port", str(port), "--lb", lb)
    manager: CgroupManager | None = None
    outer_cg: Cgroup | None = None
    if outer:
        manager = CgroupManager()
        outer_cg = manager.create_outer(DEFAULT_STACK)
        argv.append("--no-limits")
    stack = subprocess.Popen(argv, stderr=subprocess.PIPE, preexec_fn=outer_cg.enter if outer_cg else None)
    try:
        wait_ready(url, timeout=60)
        result = loadtest(url, target, duration, out)
    finally:
        stack.send_signal(signal.SIGTERM)
        _, err = stack.communicate(timeout=60)
    log = err.decode()
    processes = [line.split("stack.runner: ", 1)[1] for line in log.splitlines() if "peak memory" in line]
    result["processes"] = processes
    if outer_cg is not None and manager is not None:
        peak = outer_cg.peak_memory_bytes()
        cpu = outer_cg.cpu_seconds()
        result["outer"] = {"peak_memory_mib": (peak or 0) / 2**20, "cpu_seconds": cpu}
        manager.cleanup(kill=True)
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lb", choices=["builtin", "nginx", "haproxy"], default="builtin")
    parser.add_argument("--outer", action="store_true", help="--no-limits inside one 1 CPU / 350 MB cgroup")
    parser.add_argument("--target", type=float, default=900.0, help="req/s at the end of the ramp")
    parser.add_argument("--duration", type=float, default=120.0)
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    for i in range(args.runs):
        name = f"stack-{args.lb}{'-outer' if args.outer else ''}-{args.target:g}-run{i + 1}"
        result = run_once(args.lb, args.outer, args.target, args.duration, ROOT / "bench" / "results" / name)
        lat = result["latency_ms"]
        print(
            f"{name}: requests {result['requests']}, p50 {lat['p50']:.3f} p90 {lat['p90']:.3f} "
            f"p99 {lat['p99']:.3f} max {lat['max']:.2f} ms; counts {result['counts']}; "
            f"score {result['score']['final']:.2f}"
        )
        for line in result["processes"]:
            print(f"    {line}")
        if "outer" in result:
            print(
                f"    outer cgroup: peak {result['outer']['peak_memory_mib']:.1f} MiB, "
                f"CPU {result['outer']['cpu_seconds']:.1f} s"
            )


if __name__ == "__main__":
    main()
