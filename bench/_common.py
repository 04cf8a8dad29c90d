"""What the benchmark scripts share: the dev payloads, a description of the machine, the outer
cgroup that `--outer` runs put everything under, and the lines that report a run."""

from __future__ import annotations

import gzip
import json
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from fraudscore.defaults import SCORE_PATH
from fraudscore.loadtest.profile import TARGET_RATE
from fraudscore.stack.cgroups import Cgroup, CgroupManager, V1Cgroup, V2Cgroup
from fraudscore.stack.limits import DEFAULT_STACK

ROOT = Path(__file__).resolve().parent.parent
DEV_DATA = Path(os.environ.get("FRAUDSCORE_TEST_DATA", ROOT.parent / "shared" / "data" / "dev-data.json.gz"))
INDEX = ROOT / "data" / "references.fsidx"


Observer = Callable[[dict[str, int]], AbstractContextManager[object]]
"""Called with a harness's server processes (name -> pid) as its load test begins; what it
returns is entered for the load test's length (``bench/tail.py`` watches the processes meanwhile)."""


def scoring_request(payload: Any, path: str = SCORE_PATH) -> bytes:
    """One whole POST request to path, compact JSON body, headers as a load tester sends."""
    body = json.dumps(payload, separators=(",", ":")).encode()
    head = b"POST %s HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n" % path.encode()
    return head + b"Content-Length: %d\r\n\r\n" % len(body) + body


def dev_entries(path: Path = DEV_DATA) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = json.loads(gzip.decompress(path.read_bytes()))["entries"]
    return entries


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    system = f"{platform.system()} {platform.release()}"
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, {system}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def cli(command: str, *args: str, log_level: str = "WARNING") -> list[str]:
    """The argv of `fraudscore COMMAND ARGS`, with this Python."""
    return [sys.executable, "-m", "fraudscore.cli", "--log-level", log_level, command, *args]


def fraudscore(command: str, *args: str, log_level: str = "WARNING") -> list[str]:
    """The argv of `fraudscore COMMAND ARGS` with the bench's index, on the test address."""
    return cli(command, "--index", str(INDEX), "--host", "127.0.0.1", *args, log_level=log_level)


def proc_status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def cpu_seconds(pid: int) -> float:
    parts = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(parts[11]) + int(parts[12])  # utime + stime
    return ticks / 100.0


def loadtest(
    url: str, target: float, duration: float, out: Path, *, chart: bool = True, path: str = SCORE_PATH
) -> dict[str, Any]:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "fraudscore.cli",
            "loadtest",
            "--url",
            url,
            "--path",
            path,
            "--data",
            str(DEV_DATA),
            "--rate-multiplier",
            f"{target / TARGET_RATE:.6f}",
            "--duration",
            str(duration),
            "--cycle",
            "--out",
            str(out),
            *([] if chart else ["--no-chart"]),
        ],
        check=True,
    )
    result: dict[str, Any] = json.loads((out / "result.json").read_text())
    return result


def outer_cgroup() -> tuple[CgroupManager, Cgroup]:
    """A cgroup with the whole stack's limits (1 CPU / 350 MB): what runs inside shares that one
    ceiling, as the stack does in `bench/stack.py --outer`.  ``manager.cleanup(kill=True)`` removes it."""
    manager = CgroupManager()
    return manager, manager.create_outer(DEFAULT_STACK)


def cpu_stat(cgroup: Cgroup) -> dict[str, int]:
    """The cgroup's cpu.stat (nr_periods, nr_throttled, and throttled_time in ns on v1 or
    throttled_usec on v2): how often the CFS quota held its processes back."""
    if isinstance(cgroup, V1Cgroup):
        path = cgroup.cpu_dir / "cpu.stat"
    elif isinstance(cgroup, V2Cgroup):
        path = cgroup.directory / "cpu.stat"
    else:  # pragma: no cover - the two versions are the only kinds
        return {}
    stat = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(" ")
        stat[key] = int(value)
    return stat


def cpu_counters(cgroup: Cgroup) -> dict[str, float]:
    """The cgroup's cumulative CPU and throttling counters, to take differences over a load test."""
    stat = cpu_stat(cgroup)
    return {
        "cpu_seconds": cgroup.cpu_seconds() or 0.0,
        "throttled_seconds": cgroup.throttled_seconds() or 0.0,
        "nr_periods": stat.get("nr_periods", 0),
        "nr_throttled": stat.get("nr_throttled", 0),
    }


def outer_figures(cgroup: Cgroup, requests: int, before: dict[str, float]) -> dict[str, float]:
    """What the outer cgroup accounted during the load test (``before``: ``cpu_counters`` taken as
    it began, so start-up is left out): CPU in total and per request, CFS throttling; and the peak
    memory since the cgroup was made.  Read before the cgroup is removed."""
    now = cpu_counters(cgroup)
    figures = {key: now[key] - before[key] for key in now}
    figures["cpu_us_per_request"] = figures["cpu_seconds"] / requests * 1e6 if requests else 0.0
    figures["peak_memory_mib"] = (cgroup.peak_memory_bytes() or 0) / 2**20
    return figures


def run_line(name: str, result: dict[str, Any]) -> str:
    """One run's k6 figures, as every harness prints them."""
    lat = result["latency_ms"]
    return (
        f"{name}: requests {result['requests']}, p50 {lat['p50']:.3f} p90 {lat['p90']:.3f} "
        f"p99 {lat['p99']:.3f} max {lat['max']:.2f} ms; counts {result['counts']}; "
        f"score {result['score']['final']:.2f}"
    )


def outer_line(outer: dict[str, float]) -> str:
    """The outer cgroup's figures (``outer_figures``) in one line."""
    return (
        f"outer cgroup: peak {outer['peak_memory_mib']:.1f} MiB; "
        f"during the load: CPU {outer['cpu_seconds']:.1f} s "
        f"({outer['cpu_us_per_request']:.0f} us per request), throttled {outer['throttled_seconds']:.2f} s "
        f"in {outer['nr_throttled']:.0f} of {outer['nr_periods']:.0f} periods"
    )
