"""The generator's rate shapes, measured per second against their targets, by Redis's own clock.

For each shape and peak rate it runs ``fraudscore generate`` (a subprocess, as a user would)
against a private redis-server with no workers, then reads every events stream entry's id:
its time is when Redis took the event.  Each second since the run's start (``started_ms`` in
the run's hash, Redis's clock too) is one bin; its target is the number of events the shape
schedules in that second (``RateShape.due_times``).  Per shape and rate: the median and the
largest relative error over the seconds, and how many seconds are off by more than 5 %.

    .venv/bin/python bench/rate_shapes.py --duration 20 --rates 1000 5000 20000
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import ROOT, cli, machine
from fraudscore.stream.cli import RUN_PERIOD_S
from fraudscore.stream.generate import RUN_SHAPES, RateShape
from fraudscore.stream.keys import PartitionKeys, run_key
from fraudscore.stream.worker import connect, wait_until_answering

PARTITIONS = 8
TOLERANCE = 0.05


def targets(shape: RateShape, seconds: int) -> list[int]:
    """Events due in each whole second of the run."""
    due = list(itertools.takewhile(lambda t: t < seconds, shape.due_times()))
    return [bisect.bisect_left(due, k + 1) - bisect.bisect_left(due, k) for k in range(seconds)]


def achieved(client: Any, started_ms: int, seconds: int) -> tuple[list[int], int]:
    """Events Redis took in each second of the run, and how many fell outside the run's seconds."""
    counts = [0] * seconds
    outside = 0
    for i in range(PARTITIONS):
        low = "-"
        while True:
            page: Any = client.xrange(PartitionKeys(i).events, min=low, count=20000)
            for entry_id, _ in page:
                k = (int(entry_id.split(b"-")[0]) - started_ms) // 1000
                if 0 <= k < seconds:
                    counts[k] += 1
                else:
                    outside += 1
            if len(page) < 20000:
                break
            low = b"(" + page[-1][0]
    return counts, outside


def measure(url: str, shape_name: str, rate: float, seconds: int, seed: int) -> dict[str, Any]:
    client = connect(url)
    client.flushall()
    run_id = f"{shape_name}-{rate:g}"
    argv = cli("generate", "--redis", url, "--partitions", str(PARTITIONS), "--shape", shape_name)
    argv += ["--rate", str(rate), "--duration", str(seconds), "--seed", str(seed), "--run-id", run_id]
    wall = time.monotonic()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    wall = time.monotonic() - wall
    run: Any = client.hgetall(run_key(run_id))
    started_ms = int(run[b"started_ms"])
    got, outside = achieved(client, started_ms, seconds)
    shape = RateShape(shape_name, rate, min(seconds, RUN_PERIOD_S), seed=seed)
    want = targets(shape, seconds)
    errors = [abs(g - w) / w for g, w in zip(got, want, strict=True)]
    client.flushall()
    client.close()
    return {
        "shape": shape_name,
        "rate": rate,
        "seconds": seconds,
        "events": sum(got) + outside,
        "outside": outside,
        "run_s": round((int(run[b"ended_ms"]) - started_ms) / 1000, 3),
        "command_s": round(wall, 3),
        "median_error": statistics.median(errors),
        "max_error": max(errors),
        "seconds_over_5pct": sum(e > TOLERANCE for e in errors),
        "target": want,
        "achieved": got,
    }


def chart(results: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 8), layout="constrained")
    axes = fig.subplots(2, 2).flatten()
    colors = ("tab:blue", "tab:orange", "tab:green", "tab:red")
    for ax, shape_name in zip(axes, RUN_SHAPES, strict=True):
        rows = [r for r in results if r["shape"] == shape_name]
        for r, color in zip(rows, colors, strict=False):
            x = [k + 0.5 for k in range(r["seconds"])]
            ax.plot(x, r["target"], color=color, linestyle="--", linewidth=1)
            ax.plot(x, r["achieved"], color=color, marker=".", linewidth=0, label=f"{r['rate']:g}/s")
        ax.set_yscale("log")
        ax.set_title(f"{shape_name}: achieved (dots) vs target (dashed)")
        ax.set_xlabel("second of the run")
        ax.set_ylabel("events in the second")
        ax.grid(alpha=0.3)
        if rows:
            ax.legend(loc="lower right")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=20)
    parser.add_argument("--rates", type=float, nargs="+", default=[1000.0, 5000.0, 20000.0])
    parser.add_argument("--shapes", nargs="+", default=list(RUN_SHAPES), choices=RUN_SHAPES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "rate_shapes")
    args = parser.parse_args()

    directory = Path(
        tempfile.mkdtemp(prefix="fs-rates-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None)
    )
    sock = directory / "redis.sock"
    server = subprocess.Popen(
        ["redis-server", "--port", "0", "--unixsocket", str(sock), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    url = f"unix://{sock}"
    results = []
    try:
        wait_until_answering(connect(url), 20.0, server)
        print(machine())
        print(
            f"{'shape':9} {'rate/s':>7} {'events':>8} {'median err':>10} {'max err':>8} {'s > 5%':>7} run s"
        )
        for shape_name in args.shapes:
            for rate in args.rates:
                r = measure(url, shape_name, rate, args.duration, args.seed)
                results.append(r)
                print(
                    f"{shape_name:9} {rate:7g} {r['events']:8d} {100 * r['median_error']:9.2f}% "
                    f"{100 * r['max_error']:7.2f}% {r['seconds_over_5pct']:4d}/{r['seconds']} "
                    f"{r['run_s']:6.2f}",
                    flush=True,
                )
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(directory, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"machine": machine(), "runs": results}, indent=1))
    chart(results, args.out / "rate_shapes.png")
    print(f"results: {args.out / 'results.json'}, chart: {args.out / 'rate_shapes.png'}")


if __name__ == "__main__":
    main()
