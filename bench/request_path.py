"""One scoring request through the service's code, in process: the fast path against the Python path,
and POST /v1/score (the kNN, the model and its reasons in one answer).

    python bench/request_path.py [--repeats 5] [--registry DIR]

Feeds each dev payload, as the bytes of a whole HTTP request, to ``HttpConnection.data_received``
(the service's own connection class, over the in-memory transport of ``service/memory.py`` that
the protocol tests also use), once with the native fast path and once with httptools, orjson and
the Python vectorizer; then to /v1/score, with the registry's model (``--registry``, default
as ``fraudscore serve`` finds it), once answered by Python and once natively (the fast path with
the V1Plan ``fraudscore serve`` gives it; the queue its answers leave for the drift trackers is
drained by Python after each pass, timed apart, per request).  What this leaves
out is the socket: the event loop, the system calls and the wake-ups, which ``http_single.py``
measures with the rest.  Figures are medians over the repeats.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

from _common import DEV_DATA, INDEX, dev_entries, machine, scoring_request
from fraudscore.contract.vectorize import DEFAULT_CONSTANTS
from fraudscore.defaults import SCORE_PATH
from fraudscore.loadtest.results import percentile
from fraudscore.scorer import KnnScorer
from fraudscore.service import v1
from fraudscore.service.memory import MemoryTransport, memory_connection
from fraudscore.service.protocol import HttpConnection, fast_path
from fraudscore.service.state import ServiceConfig, ServiceState

DRAIN_EVERY = 1000  # requests between two drains of the native /v1/score queue (it holds 4,096)


def time_path(conn: HttpConnection, transport: MemoryTransport, requests: list[bytes]) -> list[float]:
    times = []
    for data in requests:
        t0 = time.perf_counter_ns()
        conn.data_received(data)
        times.append((time.perf_counter_ns() - t0) / 1000)
        assert bytes(transport.last[:15]) == b"HTTP/1.1 200 OK", transport.last
    times.sort()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--index", default=str(INDEX))
    parser.add_argument("--registry", type=Path, help="the model registry (default: as `fraudscore serve`)")
    args = parser.parse_args()

    entries = dev_entries(DEV_DATA)
    requests = {
        path: [scoring_request(e["request"], path) for e in entries] for path in (SCORE_PATH, "/v1/score")
    }
    scorer = KnnScorer.open(args.index)
    scorer.index.warm()
    config = ServiceConfig(index_path=scorer.index.path, port=9999)  # never listens
    paths = {}
    for name, fast in (("fast path", True), ("Python path", False)):
        state = ServiceState(config=config, scorer=scorer, constants=DEFAULT_CONSTANTS, ready=True)
        if fast:
            state.fast = fast_path(scorer, DEFAULT_CONSTANTS, config.max_body_bytes)
        paths[name] = memory_connection(state, keep=False)
    v1_scorers = v1.load(v1.resolve_registry(args.registry), scorer)
    state = ServiceState(config=config, scorer=scorer, constants=DEFAULT_CONSTANTS, ready=True, v1=v1_scorers)
    paths["/v1/score"] = memory_connection(state, keep=False)
    # the same answerer, natively: a fast path given its plan (the loop only holds the drain's reader)
    native_v1 = v1.load(v1.resolve_registry(args.registry), scorer)
    state = ServiceState(config=config, scorer=scorer, constants=DEFAULT_CONSTANTS, ready=True, v1=native_v1)
    state.fast = fast_path(scorer, DEFAULT_CONSTANTS, config.max_body_bytes, state.metrics.native)
    native_v1.serve_natively(state.fast, asyncio.new_event_loop())
    paths["/v1/score native"] = memory_connection(state, keep=False)
    drains: list[float] = []

    figures: dict[str, list[tuple[float, float, float]]] = {name: [] for name in paths}
    for _ in range(args.repeats):
        for name, (conn, transport) in paths.items():
            path = requests["/v1/score" if name.startswith("/v1") else SCORE_PATH]
            if name == "/v1/score native":  # drained as the loop would, well before the queue fills
                times, drained = [], 0.0
                for start in range(0, len(path), DRAIN_EVERY):
                    times += time_path(conn, transport, path[start : start + DRAIN_EVERY])
                    t0 = time.perf_counter_ns()
                    native_v1.drain_native()
                    drained += (time.perf_counter_ns() - t0) / 1000
                times.sort()
                drains.append(drained / len(path))
            else:
                times = time_path(conn, transport, path)
            figures[name].append((percentile(times, 50), percentile(times, 90), percentile(times, 99)))

    print(f"machine: {machine()}")
    print(v1_scorers.describe())
    print(f"requests: {len(entries):,} dev payloads x {args.repeats} repeats (medians over repeats)")
    for name, rows in figures.items():
        p50, p90, p99 = (statistics.median(r[i] for r in rows) for i in range(3))
        print(f"{name:17s} data_received (us): median {p50:.1f}  p90 {p90:.1f}  p99 {p99:.1f}")
    print(f"/v1/score native: draining its queue after (us per request): {statistics.median(drains):.1f}")


if __name__ == "__main__":
    main()
