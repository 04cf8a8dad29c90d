"""The streaming pipeline's throughput and latency, with Redis, the producer and the workers here.

    python bench/stream_throughput.py [--workers 1] [--duration 60] [--rate 0] [--runs 1]
                                      [--partitions 8] [--batch 500]

Starts a private redis-server (unix socket, no persistence), a producer process and ``--workers``
real ``fraudscore worker`` processes, all on this machine's cores.  The producer publishes generated
events (``stream.generate``), each with a new id and later times than the last pass's:

- ``--rate 0`` (the default): as fast as the workers take them, keeping a backlog of at most
  ``--backlog`` events.  After ``--warmup`` seconds it measures, over ``--duration`` seconds,
  results written per second and the CPU time (utime + stime, /proc/<pid>/stat) that each
  process used per result: the workers (summed), Redis and the producer.
- ``--rate R``: R events per second, paced.  It reports the same, and the enqueue-to-scored
  latency of every result written in the window (p50, p95, p99, max): each result's
  ``scored_at`` minus its ``enqueued_at`` (the events entry's id time), both whole ms, so the
  percentiles are over all samples of all workers at once.

With ``--runs N`` it repeats the whole measurement N times (a fresh Redis each time) and prints
each run and the medians.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import redis

from _common import INDEX, machine
from fraudscore.stream.generate import generate, raw
from fraudscore.stream.keys import GROUP, PartitionKeys
from fraudscore.stream.produce import publish
from fraudscore.stream.worker import Client, connect, prepare, wait_until_answering

POOL = 100_000  # events the producer generates once, then publishes again and again
TICKS = os.sysconf("SC_CLK_TCK")
CORES = os.cpu_count() or 1


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process so far (its threads included), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def results_written(client: Client, partitions: int) -> int:
    """Results ever written (XINFO STREAM's entries-added: capped streams still count them all)."""
    total = 0
    for i in range(partitions):
        with contextlib.suppress(redis.ResponseError):  # no such stream before the first result
            total += int(client.xinfo_stream(PartitionKeys(i).results)["entries-added"])
    return total


def produce(url: str, partitions: int, rate: float, backlog: int, duration: float) -> None:
    """The producer process: publish events, paced at ``rate`` or kept ``backlog`` ahead.

    It generates a pool of ``POOL`` events once, then publishes it over and over, each pass with
    new event ids and its times moved past the previous pass's, so the stream never repeats and
    the customers' windows keep moving; what it costs per event is then serializing and XADD.
    """
    client = connect(url)
    pool = generate(POOL, customers=POOL // 25, merchants=300, seed=1)
    span = pool[-1].time_ms - pool[0].time_ms + 1000
    start = time.monotonic()
    sent = 0
    while time.monotonic() - start < duration:
        if rate > 0:
            due = int((time.monotonic() - start) * rate) - sent
        else:
            due = backlog - (sent - results_written(client, partitions))
            due = min(due, 2000) if due >= 1000 else 0
        if due <= 0:
            time.sleep(0.002 if rate > 0 else 0.05)
            continue
        batch = []
        for n in range(sent, sent + due):
            passes, i = divmod(n, POOL)
            e = pool[i]
            batch.append(raw(e._replace(event_id=f"ev-{n:010d}", time_ms=e.time_ms + passes * span)))
        publish(client, batch, partitions, chunk=500)
        sent += due


def _ms(iso: bytes) -> int:
    return int(datetime.fromisoformat(iso.decode()).timestamp() * 1000)


def latencies(client: Any, partitions: int, since_ms: int, until_ms: int) -> list[int]:
    """enqueue-to-scored ms of every result written between the two moments."""
    found: list[int] = []
    for i in range(partitions):
        for _, fields in client.xrange(PartitionKeys(i).results, f"{since_ms}", f"{until_ms}"):
            found.append(_ms(fields[b"scored_at"]) - _ms(fields[b"enqueued_at"]))
    return found


@dataclass
class Run:
    rate: float  # results per second
    worker_us: float  # CPU per result, all workers together
    redis_us: float
    producer_us: float
    busy: float  # share of the machine's CPU time in use (all processes, /proc/stat)
    latency: list[int]


def machine_busy() -> tuple[int, int]:
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def one_run(args: argparse.Namespace) -> Run:
    directory = Path(tempfile.mkdtemp(prefix="fs-bench-"))
    sock = directory / "redis.sock"
    url = f"unix://{sock}"
    server = subprocess.Popen(
        ["redis-server", "--port", "0", "--unixsocket", str(sock), "--dir", str(directory), "--save", ""],
        stdout=subprocess.DEVNULL,
    )
    procs: list[subprocess.Popen[bytes]] = []
    try:
        client = connect(url)
        wait_until_answering(client, 10.0)
        prepare(client, args.partitions)
        total = args.warmup + args.duration + 5
        producer = subprocess.Popen(
            [
                *(sys.executable, __file__, "--produce", url, "--partitions", str(args.partitions)),
                *("--rate", str(args.rate), "--backlog", str(args.backlog), "--duration", str(total)),
            ]
        )
        procs.append(producer)
        worker_argv = [sys.executable, "-m", "fraudscore.cli", "--log-level", "WARNING", "worker"]
        worker_argv += ["--redis", url, "--partitions", str(args.partitions), "--batch", str(args.batch)]
        worker_argv += ["--index", str(args.index)]
        env = os.environ | ({"PYTHONPATH": str(args.worker_src)} if args.worker_src else {})
        workers = [subprocess.Popen(worker_argv, env=env) for _ in range(args.workers)]
        procs += workers
        time.sleep(args.warmup)

        pids = {"redis": [server.pid], "producer": [producer.pid], "workers": [w.pid for w in workers]}
        cpu0 = {k: sum(cpu_seconds(p) for p in v) for k, v in pids.items()}
        busy0, all0 = machine_busy()
        done0, t0, wall0 = results_written(client, args.partitions), time.monotonic(), int(time.time() * 1000)
        time.sleep(args.duration)
        done1, t1, wall1 = results_written(client, args.partitions), time.monotonic(), int(time.time() * 1000)
        busy1, all1 = machine_busy()
        cpu1 = {k: sum(cpu_seconds(p) for p in v) for k, v in pids.items()}
        done = max(1, done1 - done0)
        per = {k: (cpu1[k] - cpu0[k]) / done * 1e6 for k in pids}
        samples = latencies(client, args.partitions, wall0, wall1) if args.rate > 0 else []
        return Run(
            done / (t1 - t0),
            per["workers"],
            per["redis"],
            per["producer"],
            (busy1 - busy0) / max(1, all1 - all0),
            samples,
        )
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)
        server.terminate()
        server.wait()
        shutil.rmtree(directory, ignore_errors=True)


def ceiling(run: Run) -> float:
    """Results/s if these processes had every core to themselves: all CPU over CPU per result."""
    return CORES * 1e6 / (run.worker_us + run.redis_us + run.producer_us)


def phases(args: argparse.Namespace) -> None:
    """Redis's CPU per event in each phase (read, apply, results), one worker in this process.

    The phases run one after the other, never overlapped, so each one's share of Redis's CPU
    time (/proc/<pid>/stat) is its own.
    """
    from fraudscore.scorer import KnnScorer
    from fraudscore.stream.events import iso_ms
    from fraudscore.stream.worker import Worker, WorkerConfig, _Calls, apply_call

    directory = Path(tempfile.mkdtemp(prefix="fs-bench-"))
    sock = directory / "redis.sock"
    server = subprocess.Popen(
        ["redis-server", "--port", "0", "--unixsocket", str(sock), "--dir", str(directory), "--save", ""],
        stdout=subprocess.DEVNULL,
    )
    try:
        client = connect(f"unix://{sock}")
        wait_until_answering(client, 10.0)
        prepare(client, args.partitions)
        events = generate(args.events, customers=max(100, args.events // 25), merchants=300, seed=1)
        publish(client, [raw(e) for e in events], args.partitions)
        config = WorkerConfig(partitions=args.partitions, batch=args.batch, claim_idle_ms=600_000)
        spent = dict.fromkeys(("read", "apply", "results"), 0.0)
        with KnnScorer.open(args.index) as scorer:
            worker = Worker(client, scorer, config)
            worker.housekeep()  # alone: it takes every partition
            parts = list(worker.owned.values())
            done = 0
            while done < args.events:
                cpu = cpu_seconds(server.pid)
                calls = _Calls(client)
                for part in parts:
                    keys = part.keys
                    calls.send(
                        ["fs_read", 2, keys.lease, keys.events, worker.token, GROUP, worker.token, args.batch]
                    )
                replies = calls.receive()
                spent["read"] += cpu_seconds(server.pid) - cpu
                batches = [worker._sort(p, r[0][1], {}) for p, r in zip(parts, replies, strict=True) if r]

                cpu = cpu_seconds(server.pid)
                calls = _Calls(client)
                for b in batches:
                    calls.send(apply_call(b.part.keys, worker.token, [e for _, e, _ in b.events], config))
                for b, reply in zip(batches, calls.receive(), strict=True):
                    b.pres = reply
                spent["apply"] += cpu_seconds(server.pid) - cpu

                vectors: list[list[float]] = []
                for b in batches:
                    worker._payloads(b, vectors)
                scores = worker._decide([e.customer_id for b in batches for _, e, _ in b.scored], vectors)
                finish = []
                at = 0
                for b in batches:
                    finish += worker._finish(
                        b, scores[at : at + len(b.scored)], iso_ms(int(time.time() * 1000))
                    )
                    at += len(b.scored)
                cpu = cpu_seconds(server.pid)
                calls = _Calls(client)
                for call in finish:
                    calls.send(call)
                calls.receive()
                spent["results"] += cpu_seconds(server.pid) - cpu
                done += sum(len(b.scored) for b in batches)
        print(machine())
        print(f"load average {os.getloadavg()[0]:.2f}; {args.events} events, batch {args.batch}")
        print(
            "Redis CPU per event: "
            + ", ".join(f"{name} {seconds / args.events * 1e6:.1f} us" for name, seconds in spent.items())
            + f"; total {sum(spent.values()) / args.events * 1e6:.1f} us"
        )
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(directory, ignore_errors=True)


def percentile(sorted_values: list[int], q: float) -> int:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds measured")
    parser.add_argument("--warmup", type=float, default=8.0, help="seconds before measuring")
    parser.add_argument("--rate", type=float, default=0.0, help="events/s, paced; 0: as fast as possible")
    parser.add_argument("--backlog", type=int, default=50_000)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--index", type=Path, default=INDEX)
    parser.add_argument(
        "--worker-src", type=Path, help="run the workers from this source tree (another version's src/)"
    )
    parser.add_argument("--phases", action="store_true", help="Redis CPU per event of each phase, alone")
    parser.add_argument("--events", type=int, default=40_000, help="with --phases")
    parser.add_argument("--produce", metavar="URL", help=argparse.SUPPRESS)  # the producer process
    args = parser.parse_args()
    if args.phases:
        phases(args)
        return
    if args.produce:
        produce(args.produce, args.partitions, args.rate, args.backlog, args.duration)
        return

    print(machine())
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    mode = f"paced at {args.rate:,.0f} events/s" if args.rate > 0 else "as fast as possible"
    print(
        f"{args.workers} worker(s), {args.partitions} partitions, batch {args.batch}, {mode}, "
        f"{args.duration:.0f} s measured after {args.warmup:.0f} s"
    )
    runs = []
    for n in range(args.runs):
        run = one_run(args)
        runs.append(run)
        line = (
            f"run {n + 1}: {run.rate:,.0f} results/s; CPU per result: workers {run.worker_us:.0f} us, "
            f"redis {run.redis_us:.0f} us, producer {run.producer_us:.0f} us; machine busy {run.busy:.0%}; "
            f"load {os.getloadavg()[0]:.2f}; ceiling on {CORES} idle cores {ceiling(run):,.0f}/s"
        )
        if run.latency:
            lat = sorted(run.latency)
            line += (
                f"; enqueue->scored ms p50 {percentile(lat, 0.5)}, p95 {percentile(lat, 0.95)}, "
                f"p99 {percentile(lat, 0.99)}, max {lat[-1]} ({len(lat)} results)"
            )
        print(line, flush=True)
    if args.runs > 1:
        med = statistics.median
        line = (
            f"median of {args.runs}: {med(r.rate for r in runs):,.0f} results/s; workers "
            f"{med(r.worker_us for r in runs):.0f} us, redis {med(r.redis_us for r in runs):.0f} us, "
            f"producer {med(r.producer_us for r in runs):.0f} us per result; "
            f"ceiling {med(ceiling(r) for r in runs):,.0f}/s"
        )
        if runs[0].latency:
            line += f"; p99 {med(percentile(sorted(r.latency), 0.99) for r in runs):.0f} ms"
        print(line)


if __name__ == "__main__":
    main()
