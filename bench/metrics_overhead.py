"""What the metrics cost the fast path, in one process: counting on against counting off.

    python bench/metrics_overhead.py [--rounds 11]

The same dev payloads, as whole HTTP requests, go through ``HttpConnection.data_received`` (over
service/memory.py's transport, as in request_path.py) to two native fast paths that differ only
in whether they count and time what they answer (``FastPath(metrics=...)``: two clock reads
around the search, one at the start, and a few increments).  Rounds alternate which goes first;
each round times all the payloads in one loop per variant (no timer per request), so a figure is
the mean time per request of that round.  Printed: the median over rounds of each, and of the
per-round difference.  The Python path's recording (one native call per response, and the
search's two clock reads) cannot be switched off in process: compare request_path.py's runs of
the commits before and after instead.
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


def mean_us(conn: HttpConnection, transport: MemoryTransport, requests: list[bytes]) -> float:
    start = time.perf_counter_ns()
    for data in requests:
        conn.data_received(data)
    elapsed = time.perf_counter_ns() - start
    assert transport.last in responses.SCORES
    return elapsed / len(requests) / 1000


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
    for conn, transport in variants.values():  # warm both once: caches, branch predictors
        mean_us(conn, transport, requests)

    figures: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            figures[name].append(mean_us(*variants[name], requests))
    off, on = figures["metrics off"], figures["metrics on"]
    diffs = [b - a for a, b in zip(off, on, strict=True)]

    print(f"machine: {machine()}")
    print(f"requests: {len(requests):,} dev payloads x {args.rounds} rounds, fast path, in process")
    for name, rows in figures.items():
        print(
            f"{name:12s} mean per request (us): median over rounds {statistics.median(rows):.3f}  "
            f"min {min(rows):.3f}  max {max(rows):.3f}"
        )
    base = statistics.median(off)
    diff = statistics.median(diffs)
    print(
        f"cost of the metrics: median per-round difference {diff * 1000:+.0f} ns per request "
        f"({diff / base * 100:+.2f} % of {base:.3f} us)"
    )


if __name__ == "__main__":
    main()
