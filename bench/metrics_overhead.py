"""What the metrics cost the fast path, in one process: counting on against counting off.

    python bench/metrics_overhead.py [--rounds 11]

The same dev payloads, as whole HTTP requests, go through ``HttpConnection.data_received`` (over
service/memory.py's transport, as in request_path.py) to two native fast paths that differ only
in whether they count and time what they answer (``FastPath(metrics=...)``: two clock reads
around the search and a few increments).  A round times every payload once through each, one
whole pass after the other, the order alternating from round to round; a pass gives the
median of its per-request wall times (a median: on a shared machine a few requests are
preempted for milliseconds) and the mean of its thread's CPU time per request (preemption is
not in it).  Printed for both: each variant's median over rounds, and the median over rounds
of the difference between the two passes of a round.  The Python path's recording (one
native call per response, two clock reads around its search) cannot be switched off in process:
compare request_path.py's runs of the commits before and after instead.
"""

from __future__ import annotations

import argparse
import statistics
import time

from _common import DEV_DATA, INDEX, dev_entries, machine, scoring_request
from fraudscore.contract.vectorize import DEFAULT_CONSTANTS
from fraudscore.scorer import KnnScorer
from fraudscore.service import responses
from fraudscore.service.memory import MemoryTransport, memory_connection
from fraudscore.service.protocol import HttpConnection, fast_path
from fraudscore.service.state import ServiceConfig, ServiceState


def timed(conn: HttpConnection, data: bytes) -> int:
    start = time.perf_counter_ns()
    conn.data_received(data)
    return time.perf_counter_ns() - start


def one_pass(conn: HttpConnection, transport: MemoryTransport, requests: list[bytes]) -> tuple[float, float]:
    """(median wall time per request, mean CPU time per request), in microseconds.  The CPU time
    is this thread's (CLOCK_THREAD_CPUTIME_ID) over the whole pass: time preempted is not in it."""
    cpu = time.thread_time_ns()
    times = [timed(conn, data) for data in requests]
    cpu = time.thread_time_ns() - cpu
    assert transport.last in responses.SCORES
    return statistics.median(times) / 1000, cpu / len(requests) / 1000


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--index", default=str(INDEX))
    args = parser.parse_args()

    requests = [scoring_request(e["request"]) for e in dev_entries(DEV_DATA)]
    scorer = KnnScorer.open(args.index)
    scorer.index.warm()
    config = ServiceConfig(index_path=scorer.index.path, port=9999)  # never listens
    variants = {}
    for name, counting in (("metrics off", False), ("metrics on", True)):
        state = ServiceState(config=config, scorer=scorer, constants=DEFAULT_CONSTANTS, ready=True)
        metrics = state.metrics.native if counting else None
        state.fast = fast_path(scorer, DEFAULT_CONSTANTS, config.max_body_bytes, metrics)
        variants[name] = memory_connection(state, keep=False)
    for conn, transport in variants.values():  # warm both once
        one_pass(conn, transport, requests)

    figures: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for r in range(args.rounds):
        for name in list(variants) if r % 2 == 0 else list(reversed(variants)):
            figures[name].append(one_pass(*variants[name], requests))

    print(f"machine: {machine()}")
    print(f"requests: {len(requests):,} dev payloads x {args.rounds} rounds, fast path, in process")
    for i, what in enumerate(("wall time per request, median", "CPU time per request, mean")):
        off = [row[i] for row in figures["metrics off"]]
        on = [row[i] for row in figures["metrics on"]]
        diff = statistics.median(b - a for a, b in zip(off, on, strict=True))
        base = statistics.median(off)
        print(
            f"{what} (us): metrics off {base:.3f}, on {statistics.median(on):.3f}; "
            f"cost {diff * 1000:+.0f} ns ({diff / base * 100:+.2f} %)"
        )


if __name__ == "__main__":
    main()
