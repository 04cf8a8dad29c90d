"""Search over the 3M references, one thread, one query at a time: median and p99 per query.

    python bench/search.py [--repeats 5] [--kernel avx2|scalar]

Each repeat times every dev payload's search once (vectors made beforehand, so this is the
index alone, through its Python call); the figures printed are the medians over repeats.
"""

from __future__ import annotations

import argparse
import statistics
import time

from _common import DEV_DATA, INDEX, dev_entries, machine
from fraudscore import Index, vectorize
from fraudscore.loadtest.results import percentile  # k6's definition, as every other figure here


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kernel", choices=["avx2", "scalar"])
    parser.add_argument("--index", default=str(INDEX))
    args = parser.parse_args()

    vectors = [vectorize(e["request"]) for e in dev_entries(DEV_DATA)]
    index = Index(args.index, kernel=args.kernel)
    index.warm(vectors[:1000])
    medians: list[float] = []
    p90s: list[float] = []
    p99s: list[float] = []
    maxes: list[float] = []
    batch: list[float] = []
    for _ in range(args.repeats):
        times = []
        for v in vectors:
            t0 = time.perf_counter_ns()
            index.fraud_count(v)
            times.append((time.perf_counter_ns() - t0) / 1000)
        times.sort()
        medians.append(percentile(times, 50))
        p90s.append(percentile(times, 90))
        p99s.append(percentile(times, 99))
        maxes.append(times[-1])
        started = time.perf_counter()
        index.fraud_counts(vectors)
        batch.append((time.perf_counter() - started) / len(vectors) * 1e6)
    stats = [index.search_stats(v) for v in vectors[:5000]]
    work = {k: statistics.median(s[k] for s in stats) for k in ("nodes", "blocks", "exact")}
    print(f"machine: {machine()}")
    print(f"index: {args.index} ({index.n_points:,} references, kernel {index.kernel})")
    print(f"queries: {len(vectors):,} dev payloads x {args.repeats} repeats (medians over repeats)")
    print(
        f"per query (us): median {statistics.median(medians):.1f}  p90 {statistics.median(p90s):.1f}  "
        f"p99 {statistics.median(p99s):.1f}  max {statistics.median(maxes):.1f}"
    )
    print(f"batch (fraud_counts, GIL released): {statistics.median(batch):.1f} us/query")
    print(
        f"work per query (median): {work['nodes']:.0f} tree entries, {work['blocks']:.0f} blocks of 8, "
        f"{work['exact']:.0f} exact distances"
    )


if __name__ == "__main__":
    main()
