"""One stream worker's throughput: events/s from the partition streams to one result each.

    python bench/stream_throughput.py [--events 30000] [--partitions 8] [--batch 100]

Starts a private redis-server (unix socket, no persistence), publishes generated events, then
runs one worker in this process until every event has its result.  It prints events/s, the
worker's CPU time per event, and Redis's own time per call of each function (INFO commandstats).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from _common import INDEX, machine
from fraudscore.scorer import KnnScorer
from fraudscore.stream.generate import generate, raw
from fraudscore.stream.produce import publish
from fraudscore.stream.worker import Worker, WorkerConfig, connect, prepare


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=30_000)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--index", type=Path, default=INDEX)
    args = parser.parse_args()

    directory = Path(tempfile.mkdtemp(prefix="fs-bench-"))
    sock = directory / "redis.sock"
    server = subprocess.Popen(
        ["redis-server", "--port", "0", "--unixsocket", str(sock), "--dir", str(directory), "--save", ""],
        stdout=subprocess.DEVNULL,
    )
    try:
        client = connect(f"unix://{sock}")
        for _ in range(200):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        prepare(client, args.partitions)
        raws = [raw(e) for e in generate(args.events, customers=max(100, args.events // 50), seed=1)]
        publish(client, raws, args.partitions)
        client.config_resetstat()

        config = WorkerConfig(partitions=args.partitions, batch=args.batch, claim_idle_ms=600_000)
        with KnnScorer.open(args.index) as scorer:
            worker = Worker(client, scorer, config)
            worker.housekeep()  # takes every partition: it is alone
            start, cpu = time.perf_counter(), time.process_time()
            while worker.processed < args.events:
                worker.step_all(list(worker.owned.values()))
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        functions = client.info("commandstats").get("cmdstat_fcall", {})
        print(machine())
        print(
            f"{args.events} events, {args.partitions} partitions, batch {args.batch}: {elapsed:.2f} s, "
            f"{args.events / elapsed:,.0f} events/s; worker CPU {cpu / args.events * 1e6:.0f} us/event"
        )
        if functions:
            print(
                f"redis: {functions['calls']} FCALLs, {functions['usec_per_call']:.1f} us each, "
                f"{functions['usec'] / args.events:.0f} us of Redis time per event"
            )
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
