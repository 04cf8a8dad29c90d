"""The drift acceptance of the lifecycle issue, measured: which series alert, and after how many
requests, on the dev payloads as they are and with their amounts x3.

    python bench/drift_alerts.py [--registry data/registry] [--version V] [--factor 3]

Each pass feeds one fresh ``Drift`` (the tracker a serving instance keeps per version, with its
defaults: count and time windows, PSI > 0.2) the 20,000 dev payloads' vectors and the model's
probabilities, in the file's order, and checks the alerts every 256 requests, as a scrape
would.  It prints, per series, the largest PSI seen on the count window and the request at
which the series first alerted.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from _common import DEV_DATA, dev_entries, machine
from fraudscore.contract.testdata import amounts_scaled
from fraudscore.contract.vectorize import vectorize
from fraudscore.models.drift import SERIES, Drift
from fraudscore.models.registry import DEFAULT_REGISTRY, Registry
from fraudscore.models.scorer import ModelScorer

CHECK_EVERY = 256


def run(
    drift: Drift, vectors: list[list[float]], scores: list[float]
) -> tuple[dict[str, int], dict[str, float]]:
    """(first alert's request number per series, largest count-window PSI per series)."""
    first: dict[str, int] = {}
    largest: dict[str, float] = dict.fromkeys(SERIES, 0.0)
    for i, (vector, score) in enumerate(zip(vectors, scores, strict=True), 1):
        drift.observe(vector, score)
        if i % CHECK_EVERY == 0 or i == len(vectors):
            snap = drift.snapshot()
            for name in snap["alerts"]:
                first.setdefault(name, i)
            for name, entry in snap["series"].items():
                psi = entry["psi"]["count"]
                if psi is not None:
                    largest[name] = max(largest[name], psi)
    return first, largest


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--registry", type=Path, default=DEFAULT_REGISTRY)
    parser.add_argument(
        "--version", help="model version (default: the production version, else the newest model)"
    )
    parser.add_argument("--factor", type=float, default=3.0, help="the amounts' multiplier (default: 3)")
    args = parser.parse_args()
    registry = Registry(args.registry)
    models = [v for v in registry.versions() if registry.meta(v).get("kind") == "model"]
    production = registry.production()
    version = args.version or (production if production in models else models[-1])
    meta = registry.meta(version)
    scorer = ModelScorer.from_registry(registry, version)
    payloads: list[Any] = [entry["request"] for entry in dev_entries()]
    print(f"machine: {machine()}; {version}; {len(payloads)} payloads of {DEV_DATA.name}")
    for label, batch in (
        ("as they are", payloads),
        (f"amounts x{args.factor:g}", [amounts_scaled(p, args.factor) for p in payloads]),
    ):
        vectors = [vectorize(p) for p in batch]
        first, largest = run(Drift.for_meta(meta), vectors, scorer.scores(vectors))
        print(f"\n{label}: alerts {first or 'none'}")
        print("| series | largest PSI (count window) | first alert at request |")
        print("|---|---|---|")
        for name in SERIES:
            print(f"| {name} | {largest[name]:.3f} | {first.get(name, '-')} |")


if __name__ == "__main__":
    main()
