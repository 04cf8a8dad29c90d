"""What drift tracking costs /v1/score: ``Drift.observe`` per request against the request's own work.

    python bench/drift_overhead.py [--registry data/registry] [--version V] [--rounds 7]

The dev payloads are vectorized and scored by the registry's model beforehand.  A round runs, one
after the other in alternating order: (a) the Python path's work for each payload as /v1/score
does it (``vectorize`` then ``V1Scorer.answer``: the exact kNN search, the model's walk with its
reasons, the JSON answer), (b) the same followed by ``Drift.observe`` of the fresh vector, as the
service will call it, and (c) ``Drift.observe`` alone over the premade vectors (cold in the
cache: an upper bound), the alert checks included (the PSI of both windows every 1024 calls).
Each pass gives its thread's CPU time per request (time preempted on a shared machine is not
in it) and the median wall time of single calls.  (a) leaves out the HTTP parsing and the
socket, so the ratio printed is an upper bound of drift's share of a whole request.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from _common import DEV_DATA, INDEX, dev_entries, machine
from fraudscore.contract.vectorize import vectorize
from fraudscore.models.drift import Drift
from fraudscore.models.registry import DEFAULT_REGISTRY, Registry
from fraudscore.models.scorer import ModelScorer
from fraudscore.scorer import KnnScorer
from fraudscore.service.v1 import V1Scorer


def cpu_per_call(calls: int, run: Any) -> tuple[float, float]:
    """(thread CPU µs per call, median wall µs of single calls) of ``run()``, which returns the
    wall times of its calls in ns."""
    started = time.thread_time_ns()
    walls = run()
    cpu = (time.thread_time_ns() - started) / calls / 1000
    return cpu, statistics.median(walls) / 1000


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--registry", type=Path, default=DEFAULT_REGISTRY)
    parser.add_argument("--version", help="model version (default: the newest model)")
    parser.add_argument("--index", type=Path, default=INDEX)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    registry = Registry(args.registry)
    version = args.version or next(
        v for v in reversed(registry.versions()) if registry.meta(v).get("kind") == "model"
    )
    meta = registry.meta(version)
    model = ModelScorer.from_registry(registry, version)
    knn = KnnScorer.open(args.index)
    knn.index.warm()
    v1 = V1Scorer(knn, "knn", model, model_decides=True)
    payloads = [e["request"] for e in dev_entries(DEV_DATA)]
    vectors = [vectorize(p) for p in payloads]
    scores = model.scores(vectors)
    pairs = list(zip(vectors, scores, strict=True))

    def request_pass() -> list[int]:
        walls = []
        for payload in payloads:
            t0 = time.perf_counter_ns()
            v1.answer(payload, vectorize(payload))
            walls.append(time.perf_counter_ns() - t0)
        return walls

    def request_with_drift_pass() -> list[int]:
        drift = Drift.for_meta(meta)
        observe = drift.observe
        walls = []
        for payload, score in zip(payloads, scores, strict=True):
            t0 = time.perf_counter_ns()
            vector = vectorize(payload)
            v1.answer(payload, vector)
            observe(vector, score)
            walls.append(time.perf_counter_ns() - t0)
        return walls

    def drift_pass() -> list[int]:
        drift = Drift.for_meta(meta)
        observe = drift.observe
        walls = []
        for vector, score in pairs:
            t0 = time.perf_counter_ns()
            observe(vector, score)
            walls.append(time.perf_counter_ns() - t0)
        return walls

    def drift_cpu_pass() -> list[int]:
        """observe alone, untimed per call (the clock reads around each call cost as much as it)."""
        drift = Drift.for_meta(meta)
        observe = drift.observe
        for vector, score in pairs:
            observe(vector, score)
        return [0]

    passes = {
        "request": request_pass,
        "request_with_drift": request_with_drift_pass,
        "observe": drift_pass,
        "observe_untimed": drift_cpu_pass,
    }
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in passes}
    for r in range(args.rounds):
        order = list(passes) if r % 2 == 0 else list(reversed(passes))
        for name in order:  # alternating, so drift in the machine's load hits each pass alike
            results[name].append(cpu_per_call(len(pairs), passes[name]))

    print(machine())
    print(f"{len(pairs)} dev payloads, model {version}, {args.rounds} rounds (medians over rounds)")
    cpu = {name: statistics.median(c for c, _ in rows) for name, rows in results.items()}
    wall = {name: statistics.median(w for _, w in rows) for name, rows in results.items()}
    request, observe, timed = cpu["request"], cpu["observe_untimed"], cpu["observe"]
    print(f"  /v1/score's Python work: {request:.2f} µs CPU per request (median {wall['request']:.2f} µs)")
    print(f"  Drift.observe:           {observe:.3f} µs CPU per request, batches included")
    print(f"    timed one by one:      {timed:.3f} µs CPU (median call {wall['observe']:.3f} µs)")
    print(f"  drift's share: {observe / request:.2%} of the request's CPU (observe alone, its vectors cold)")
    pairs_of_passes = zip(results["request_with_drift"], results["request"], strict=True)
    with_drift = [a - b for (a, _), (b, _) in pairs_of_passes]
    added = statistics.median(with_drift)
    print(f"  the request with observe (its vector hot): {cpu['request_with_drift']:.2f} µs CPU per request;")
    print(f"    added per request, median over rounds: {added:.3f} µs CPU = {added / request:.2%}")


if __name__ == "__main__":
    main()
