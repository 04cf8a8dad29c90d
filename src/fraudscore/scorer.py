"""The scoring seam: every caller that scores transactions goes through a ``Scorer``.

A scorer takes contract vectors (``contract.vectorize``) and gives each a fraud score in
[0, 1]; a transaction is approved when its score is below the scorer's ``threshold``.  Scoring
is batch-first (``scores``: one call for many vectors, the way offline commands and stream
workers score) with a single-vector fast call (``score``: the way the service scores).

The exact k-nearest-neighbour search is the first implementation (``KnnScorer``): its score is
the share of frauds among the 5 nearest references, so it also exposes that count, which the
service uses to pick one of six prebuilt answers.  The native fast path reaches the same search
through the capsule that ``index._knn`` exports (``knn_api.h``), not through Python.

>>> decision(2), decision(3)
((True, 0.4), (False, 0.6))
"""

from __future__ import annotations

import abc
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Self

from fraudscore.contract.vectorize import DEFAULT_CONSTANTS, Constants, vectorize
from fraudscore.index.search import Index, K

APPROVAL_THRESHOLD = 0.6  # the contract: approved when fewer than 3 of the 5 neighbours are frauds


def decision(frauds: int) -> tuple[bool, float]:
    """(approved, fraud_score) for a number of frauds among the K nearest neighbours."""
    score = frauds / K
    return score < APPROVAL_THRESHOLD, score


@dataclass(frozen=True)
class ScorerId:
    """Which scorer decided: its kind (``knn``, ``model``), its name and its version."""

    kind: str
    name: str
    version: str


class Scorer(abc.ABC):
    """Vectors in, fraud scores out.  Implementations are thread-safe for concurrent reads."""

    id: ScorerId
    threshold: float

    @abc.abstractmethod
    def scores(self, vectors: Sequence[Sequence[float]]) -> list[float]:
        """The fraud score of each vector, in order, in one call."""

    def score(self, vector: Sequence[float]) -> float:
        """The fraud score of one vector (implementations override it with a faster call)."""
        return self.scores([vector])[0]

    def approves(self, score: float) -> bool:
        return score < self.threshold

    def close(self) -> None:  # noqa: B027 - most scorers hold nothing to release
        """Release what the scorer holds; it must not be used after."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class KnnScorer(Scorer):
    """The contract's scorer: frauds among the exact 5 nearest references, over 5."""

    threshold = APPROVAL_THRESHOLD

    def __init__(self, index: Index) -> None:
        self.index = index
        self.id = ScorerId("knn", "knn", index.checksum)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> KnnScorer:
        return cls(Index(path))

    # the counts are the scorer's own currency: the score is count / K, exactly
    def fraud_count(self, vector: Sequence[float]) -> int:
        """Frauds among the 5 nearest references of one vector (the service's hot path)."""
        return self.index.fraud_count(vector)

    def fraud_counts(self, vectors: Sequence[Sequence[float]]) -> list[int]:
        """``fraud_count`` of many vectors in one native call, without the GIL."""
        return self.index.fraud_counts(vectors)

    def score(self, vector: Sequence[float]) -> float:
        return self.index.fraud_count(vector) / K

    def scores(self, vectors: Sequence[Sequence[float]]) -> list[float]:
        return [count / K for count in self.index.fraud_counts(vectors)]

    def close(self) -> None:
        self.index.close()


def score_payload(
    scorer: Scorer, payload: Any, constants: Constants = DEFAULT_CONSTANTS
) -> tuple[bool, float]:
    """(approved, fraud_score) for one decoded payload; PayloadError when it cannot be scored."""
    score = scorer.score(vectorize(payload, constants))
    return scorer.approves(score), score
