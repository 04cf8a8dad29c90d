"""The scoring seam's contract, applied to every Scorer implementation.

A new scorer (a model, a remote one) joins by adding a factory to ``SCORERS``: every test here
then runs against it too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fraudscore.contract.vectorize import vectorize
from fraudscore.index.search import random_queries
from fraudscore.scorer import KnnScorer, Scorer, score_payload
from tests.models_support import small_model_scorer

SCORERS: dict[str, Callable[[Path], Scorer]] = {
    "knn": KnnScorer.open,
    "model": small_model_scorer,
}


@pytest.fixture(scope="module", params=sorted(SCORERS))
def scorer(request: pytest.FixtureRequest, index_path: Path) -> Iterator[Scorer]:
    with SCORERS[request.param](index_path) as s:
        yield s


def test_batch_equals_single(scorer: Scorer) -> None:
    queries = random_queries(300, seed=7)
    assert scorer.scores(queries) == [scorer.score(q) for q in queries]


def test_scores_are_probabilities_and_decide_by_threshold(scorer: Scorer) -> None:
    scores = scorer.scores(random_queries(300, seed=8))
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert len(set(scores)) > 1  # it tells transactions apart
    for s in scores:
        assert scorer.approves(s) is (s < scorer.threshold)


def test_empty_batch(scorer: Scorer) -> None:
    assert scorer.scores([]) == []


def test_identity(scorer: Scorer) -> None:
    assert scorer.id.kind and scorer.id.name and scorer.id.version


@pytest.mark.parametrize("bad", [[0.1] * 13, [0.1] * 15, [float("nan")] * 14])
def test_bad_vectors_are_value_errors(scorer: Scorer, bad: list[float]) -> None:
    with pytest.raises(ValueError):
        scorer.score(bad)
    with pytest.raises(ValueError):
        scorer.scores([[0.0] * 14, bad])


def test_score_payload(scorer: Scorer, example_payloads: list[dict[str, Any]]) -> None:
    for payload in example_payloads:
        score = scorer.score(vectorize(payload))
        assert score_payload(scorer, payload) == (scorer.approves(score), score)


def test_knn_score_is_its_fraud_count(index_path: Path) -> None:
    with KnnScorer.open(index_path) as knn:
        queries = random_queries(200, seed=9)
        assert knn.scores(queries) == [c / 5 for c in knn.fraud_counts(queries)]
        assert [knn.fraud_count(q) for q in queries] == knn.fraud_counts(queries)
