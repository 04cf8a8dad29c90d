"""The whole stack under the contract's load test, scored, with each process's peak memory and CPU.

    python bench/stack.py [--lb builtin|nginx|haproxy] [--outer] [--target 900] [--runs 1] [--kill-at S]
                          [--no-chart] [--native-loop | --no-native-loop] [--path /v1/score]
                          [--registry DIR]

Starts `fraudscore stack` (each process in its own cgroup with the compose file's limits; with
--outer, `--no-limits` inside one cgroup of 1 CPU / 350 MB instead), runs `fraudscore loadtest
--cycle` (the contract's 1 -> 900 req/s ramp over 120 s on the dev payloads, reused once they
run out so the ramp reaches its target), and reads the cgroups when the stack stops.  With
--kill-at S, api1 is killed (SIGKILL) S seconds into the run: the failed requests are counted
as the run's HTTP errors, and the stack's log says when api1 was back.  With --no-chart, k6 keeps
no per-request samples (less of its CPU beside the stack) and draws no chart.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import threading
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from _common import (
    ROOT,
    Observer,
    cpu_counters,
    fraudscore,
    free_port,
    loadtest,
    machine,
    outer_cgroup,
    outer_figures,
    outer_line,
    run_line,
)
from fraudscore.defaults import SCORE_PATH
from fraudscore.loadtest.profile import DURATION_S, TARGET_RATE
from fraudscore.stack.cgroups import Cgroup, CgroupManager
from fraudscore.stack.runner import wait_ready


def stack_processes(stack_pid: int) -> dict[str, int]:
    """The stack's children by name: each instance by its socket's name, and "lb"."""
    children = subprocess.run(["pgrep", "-P", str(stack_pid)], capture_output=True, text=True).stdout.split()
    found = {}
    for pid in map(int, children):
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"serve" in argv:
            sock = next((a for a in argv if a.endswith(b".sock")), b"")
            found[Path(sock.decode()).stem or f"serve-{pid}"] = pid
        else:
            found["lb"] = pid
    return found


def kill_instance(stack_pid: int, name: str) -> None:
    """SIGKILL the stack's child that serves ``name`` (its socket is named after it)."""
    pid = stack_processes(stack_pid).get(name)
    if pid is not None:
        os.kill(pid, signal.SIGKILL)
        print(f"    killed {name} (pid {pid})")


def run_once(
    lb: str,
    outer: bool,
    target: float,
    duration: float,
    out: Path,
    kill_at: float | None = None,
    chart: bool = True,
    observe: Observer | None = None,
    native_loop: bool | None = None,
    path: str = SCORE_PATH,
    registry: str | None = None,
) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # INFO: the runner's restart messages and its per-process report are read back from the log
    argv = fraudscore("stack", "--port", str(port), "--lb", lb, log_level="INFO")
    if native_loop is not None:  # else the stack's default
        argv.append("--native-loop" if native_loop else "--no-native-loop")
    if registry is not None:  # else the stack's default: data/registry when it exists
        argv += ["--registry", registry]
    manager: CgroupManager | None = None
    outer_cg: Cgroup | None = None
    if outer:
        manager, outer_cg = outer_cgroup()
        argv.append("--no-limits")
    # the stack's log goes to a file: a pipe read only at the end would fill during the run and
    # block every process of the stack on its next log line
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "stack.log"
    with open(log_path, "wb") as log_file:
        stack = subprocess.Popen(argv, stderr=log_file, preexec_fn=outer_cg.enter if outer_cg else None)
    killer = None
    try:
        wait_ready(url, timeout=60)
        before = cpu_counters(outer_cg) if outer_cg is not None else {}
        outer_during: dict[str, float] = {}
        if kill_at is not None:
            killer = threading.Timer(kill_at, kill_instance, (stack.pid, "api1"))
            killer.start()
        with observe(stack_processes(stack.pid)) if observe else nullcontext():
            result = loadtest(url, target, duration, out, chart=chart, path=path)
        if outer_cg is not None:  # before the stack stops: its shutdown is not the load's
            outer_during = outer_figures(outer_cg, result["requests"], before)
    finally:
        if killer is not None:
            killer.cancel()
        stack.send_signal(signal.SIGTERM)
        stack.wait(timeout=60)
    log = log_path.read_text()
    processes = [
        line.split("stack.runner: ", 1)[1]
        for line in log.splitlines()
        if "stack.runner: " in line and ("peak memory" in line or "exited" in line or "is back" in line)
    ]
    result["processes"] = processes
    if outer_cg is not None and manager is not None:
        result["outer"] = outer_during
        manager.cleanup(kill=True)
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lb", choices=["builtin", "nginx", "haproxy"], default="builtin")
    parser.add_argument("--outer", action="store_true", help="--no-limits inside one 1 CPU / 350 MB cgroup")
    parser.add_argument("--target", type=float, default=TARGET_RATE, help="req/s at the end of the ramp")
    parser.add_argument("--duration", type=float, default=DURATION_S)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--kill-at", type=float, metavar="S", help="SIGKILL api1 S seconds into the run")
    parser.add_argument("--no-chart", action="store_true", help="k6 without per-request samples")
    parser.add_argument(
        "--native-loop",
        action=argparse.BooleanOptionalAction,
        help="`fraudscore stack --native-loop` or --no-native-loop (default: the stack's default)",
    )
    parser.add_argument("--path", default=SCORE_PATH, help="the endpoint k6 posts to (default: %(default)s)")
    parser.add_argument("--registry", help="the instances' model registry (default: the stack's)")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    for i in range(args.runs):
        kill = "-kill" if args.kill_at is not None else ""
        nochart = "-nochart" if args.no_chart else ""
        native = {None: "", True: "-native", False: "-nonative"}[args.native_loop]
        outer = "-outer" if args.outer else ""
        route = "-v1" if args.path != SCORE_PATH else ""
        name = f"stack-{args.lb}{outer}{native}{route}{kill}{nochart}-{args.target:g}-run{i + 1}"
        out = ROOT / "bench" / "results" / name
        result = run_once(
            args.lb,
            args.outer,
            args.target,
            args.duration,
            out,
            args.kill_at,
            chart=not args.no_chart,
            native_loop=args.native_loop,
            path=args.path,
            registry=args.registry,
        )
        print(run_line(name, result))
        for line in result["processes"]:
            print(f"    {line}")
        if "outer" in result:
            print(f"    {outer_line(result['outer'])}")


if __name__ == "__main__":
    main()
