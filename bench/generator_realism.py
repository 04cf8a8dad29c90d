"""How much the generator's events look like the contract's references, through the stream's features.

Generates a run's events as ``fraudscore generate`` does (``runs.population_events``), derives
each event's payload with the replay oracle (the workers' features, without Redis), vectorizes
and scores them with the exact kNN, and prints: the share of legitimate events approved, the
share of injected frauds declined, and each dimension's mean for the generated legitimate
events beside the references' legitimate and fraudulent means.

    .venv/bin/python bench/generator_realism.py --events 20000 --customers 2000 --warmup 20000
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

from fraudscore.contract.vectorize import vectorize
from fraudscore.scorer import KnnScorer
from fraudscore.stream.replay import Replay

DIMS = (
    "amount", "installments", "amount/avg", "hour", "weekday", "minutes_since_last", "km_from_last",
    "km_from_home", "tx_count_24h", "is_online", "card_present", "unknown_merchant", "mcc_risk",
    "merchant_avg",
)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=30000)
    parser.add_argument("--customers", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--warmup",
        type=int,
        default=0,
        help="events applied first and not measured: customers with a history",
    )
    parser.add_argument("--index", type=Path, default=Path("data/references.fsidx"))
    parser.add_argument("--references", type=Path, default=Path("data/references.json.gz"))
    args = parser.parse_args()

    from fraudscore.stream.runs import population_events

    state = Replay(1)
    vectors, truth = [], []
    events = population_events(args.customers, args.seed, 0.02, "r", args.warmup + args.events)
    for n, (event, fraud) in enumerate(events):
        payload = state.apply(event)
        if n >= args.warmup:
            vectors.append(vectorize(payload))
            truth.append(fraud)
    with KnnScorer.open(args.index) as scorer:
        scores = scorer.scores(vectors)
        approved = [scorer.approves(s) for s in scores]
    legit = [a for a, f in zip(approved, truth, strict=True) if not f]
    frauds = [a for a, f in zip(approved, truth, strict=True) if f]
    print(f"{len(vectors)} events after {args.warmup}, {args.customers} customers, seed {args.seed}")
    print(f"legitimate approved: {100 * sum(legit) / max(1, len(legit)):.1f} % of {len(legit)}")
    declined = len(frauds) - sum(frauds)
    print(f"frauds declined: {100 * declined / max(1, len(frauds)):.1f} % of {len(frauds)}")
    with gzip.open(args.references) as f:
        refs = json.loads(f.read())[::30]
    means: dict[str, list[float]] = {}
    for label in ("legit", "fraud"):
        rows = [r["vector"] for r in refs if r["label"] == label]
        means[label] = [sum(r[d] for r in rows) / len(rows) for d in range(len(DIMS))]
    ours = [v for v, f in zip(vectors, truth, strict=True) if not f]
    print(f"{'dimension':20} {'generated legit':>15} {'refs legit':>10} {'refs fraud':>10}")
    for d, name in enumerate(DIMS):
        mean = sum(v[d] for v in ours) / max(1, len(ours))
        print(f"{name:20} {mean:15.3f} {means['legit'][d]:10.3f} {means['fraud'][d]:10.3f}")


if __name__ == "__main__":
    main()
