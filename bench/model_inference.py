"""Single-row inference of a registry model from Python: LightGBM's own predict and the native
evaluator (models/_trees.c), with and without reasons.  Median and p99 per row.

    python bench/model_inference.py [--registry data/registry] [--version V] [--repeats 3]

Rows are the dev payloads' vectors (made beforehand, so this is inference alone, through its
Python call), each timed on its own; LightGBM's rows are a subset (it is much slower).  The
figures printed are the medians over repeats.  Thread CPU time is printed beside wall time:
on a shared machine it is the steadier of the two.
"""

from __future__ import annotations

import argparse
import statistics
import time
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from _common import DEV_DATA, dev_entries, machine
from fraudscore.contract.vectorize import vectorize
from fraudscore.loadtest.results import percentile
from fraudscore.models.registry import DEFAULT_REGISTRY, MODEL_FILE, Registry
from fraudscore.models.trees import load_forest


def per_row(call: Callable[[Any], Any], rows: list[Any], repeats: int) -> tuple[float, float, float]:
    """(median µs, p99 µs, thread-CPU µs per row), medians over repeats."""
    medians, p99s, cpu = [], [], []
    for _ in range(repeats):
        times = []
        cpu_started = time.thread_time_ns()
        for row in rows:
            t0 = time.perf_counter_ns()
            call(row)
            times.append((time.perf_counter_ns() - t0) / 1000)
        cpu.append((time.thread_time_ns() - cpu_started) / 1000 / len(rows))
        times.sort()
        medians.append(percentile(times, 50))
        p99s.append(percentile(times, 99))
    return statistics.median(medians), statistics.median(p99s), statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--registry", type=Path, default=DEFAULT_REGISTRY)
    parser.add_argument("--version", help="default: the newest model version")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lightgbm-rows", type=int, default=2000)
    args = parser.parse_args()

    import lightgbm as lgb

    registry = Registry(args.registry)
    models = [v for v in registry.versions() if registry.meta(v).get("kind") == "model"]
    version = args.version or (models[-1] if models else None)
    if version is None:
        raise SystemExit(f"no model in {args.registry}: train one with `fraudscore model train`")
    path = registry.version_dir(version) / MODEL_FILE
    _, forest = load_forest(path)
    booster = lgb.Booster(model_file=str(path))
    vectors = [vectorize(e["request"]) for e in dev_entries(DEV_DATA)]
    arrays = [np.array([v]) for v in vectors[: args.lightgbm_rows]]

    results = {
        "native predict": per_row(forest.predict, vectors, args.repeats),
        "native explain (probability + 14 reasons)": per_row(forest.explain, vectors, args.repeats),
        # one thread: LightGBM's OpenMP team costs far more than one row on a shared machine
        "LightGBM predict": per_row(lambda a: booster.predict(a, num_threads=1), arrays, args.repeats),
        "LightGBM predict, pred_contrib (SHAP)": per_row(
            lambda a: booster.predict(a, pred_contrib=True, num_threads=1), arrays[:500], args.repeats
        ),
    }
    flat = array("d", [x for v in vectors for x in v])
    batch, batch_cpu = [], []
    for _ in range(args.repeats):
        started, cpu_started = time.perf_counter(), time.thread_time()
        forest.predict_many(flat)
        batch.append((time.perf_counter() - started) / len(vectors) * 1e6)
        batch_cpu.append((time.thread_time() - cpu_started) / len(vectors) * 1e6)
    want = booster.predict(np.array(vectors))
    got = np.frombuffer(forest.predict_many(flat))

    print(f"machine: {machine()}")
    print(f"model: {version} ({forest.n_trees} trees, {forest.n_nodes} nodes), LightGBM {lgb.__version__}")
    print(f"rows: {len(vectors):,} dev payloads' vectors ({len(arrays):,} for LightGBM) x {args.repeats}")
    for name, (median, p99, cpu) in results.items():
        print(f"{name:<44} median {median:8.2f} us  p99 {p99:8.2f} us  cpu {cpu:8.2f} us/row")
    print(
        f"{'native predict_many (GIL released)':<44} {statistics.median(batch):8.2f} us/row, "
        f"cpu {statistics.median(batch_cpu):.2f} us/row"
    )
    print(f"max |native - LightGBM| over {len(vectors):,} rows: {np.max(np.abs(got - want)):.3g}")


if __name__ == "__main__":
    main()
