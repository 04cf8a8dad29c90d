"""A registry version behind the scoring seam: ``ModelScorer`` (a trained forest) and
``open_version`` (any version, the exact kNN included).

Loading builds the native evaluator (from forest.bin, or model.txt for older versions): a plain
function, to be called outside any event loop (it reads files and checks the version's stored
predictions).
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from typing import Any

from fraudscore.contract.vectorize import FEATURES
from fraudscore.errors import UsageError
from fraudscore.models import _trees
from fraudscore.models.registry import Registry
from fraudscore.models.trees import rows_buffer
from fraudscore.scorer import KnnScorer, Scorer, ScorerId


class ModelScorer(Scorer):
    """A gradient-boosted forest: the score is LightGBM's probability, computed natively."""

    def __init__(self, forest: _trees.Forest, meta: dict[str, Any]) -> None:
        self.forest = forest
        self.meta = meta
        self.threshold = float(meta["threshold"])
        self.id = ScorerId("model", str(meta["name"]), str(meta["version"]))

    @classmethod
    def from_registry(cls, registry: Registry, version: str) -> ModelScorer:
        """The version, validated (files, schema, stored predictions) and loaded."""
        meta, forest = registry.validated(version)  # the evaluator its check built
        if forest is None:
            raise UsageError(f"{version} is a kNN version, not a model")
        return cls(forest, meta)

    def score(self, vector: Sequence[float]) -> float:
        return self.forest.predict(vector)

    def scores(self, vectors: Sequence[Sequence[float]]) -> list[float]:
        if not vectors:
            return []
        out = array("d")
        out.frombytes(self.forest.predict_many(rows_buffer(vectors, self.forest.n_features)))
        return out.tolist()

    def explain(self, vector: Sequence[float]) -> tuple[float, list[float]]:
        """(probability, one Saabas contribution per feature, in log-odds).

        The contributions add up to the raw score minus ``bias`` (the trees' expected values at
        their roots)."""
        return self.forest.explain(vector)

    @property
    def bias(self) -> float:
        return self.forest.bias

    def reasons(self, vector: Sequence[float], top: int = 3) -> tuple[float, list[dict[str, float | str]]]:
        """(probability, the ``top`` features by |contribution|, largest first)."""
        probability, contributions = self.forest.explain(vector)
        ranked = sorted(range(len(contributions)), key=lambda i: -abs(contributions[i]))[:top]
        return probability, [
            {"feature": FEATURES[i], "value": vector[i], "contribution": contributions[i]} for i in ranked
        ]


def open_version(registry: Registry, version: str | None = None) -> Scorer:
    """The scorer of ``version`` (default: the one in production), validated first."""
    if version is None:
        version = registry.production()
        if version is None:
            raise UsageError(f"{registry.root}: no version in production (see: fraudscore model promote)")
    meta = registry.validate(version)
    if meta.get("kind") == "knn":
        scorer = KnnScorer.open(meta["index"])
        scorer.id = ScorerId("knn", "knn", version)
        return scorer
    return ModelScorer.from_registry(registry, version)
