"""Requests through the service's code for callgrind to count instructions: the load-proof measure.

    valgrind --tool=callgrind python bench/request_instructions.py {fast|python} N
    valgrind --tool=callgrind --collect-atstart=no --toggle-collect=FastPath_answer \\
        python bench/request_instructions.py fast N

Sends the first N of 1,000 dev payloads, as whole HTTP requests, to ``HttpConnection
.data_received`` over service/memory.py's transport, with the native fast path (``fast``) or
without it (``python``).  The 1,000 requests are built whatever N is, so the instructions per
request are (total with N = 1000 - total with N = 0) / 1000.  Run it with PYTHONHASHSEED=0, on
two builds that share one ``_knn`` binary, to compare them (BENCHMARKS.md, "Metrics").
"""

from __future__ import annotations

import argparse

from _common import DEV_DATA, INDEX, dev_entries, scoring_request
from fraudscore.contract.vectorize import DEFAULT_CONSTANTS
from fraudscore.scorer import KnnScorer
from fraudscore.service.memory import memory_connection
from fraudscore.service.protocol import fast_path
from fraudscore.service.state import ServiceConfig, ServiceState

PAYLOADS = 1000


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("path", choices=["fast", "python"])
    parser.add_argument("n", type=int, help=f"requests to send, at most {PAYLOADS}")
    parser.add_argument("--index", default=str(INDEX))
    args = parser.parse_args()

    requests = [scoring_request(e["request"]) for e in dev_entries(DEV_DATA)[:PAYLOADS]]
    scorer = KnnScorer.open(args.index)
    config = ServiceConfig(index_path=scorer.index.path, port=9999)  # never listens
    state = ServiceState(config=config, scorer=scorer, constants=DEFAULT_CONSTANTS, ready=True)
    if args.path == "fast":
        state.fast = fast_path(scorer, DEFAULT_CONSTANTS, config.max_body_bytes, state.metrics.native)
    conn, _ = memory_connection(state, keep=False)
    for data in requests[: args.n]:
        conn.data_received(data)


if __name__ == "__main__":
    main()
