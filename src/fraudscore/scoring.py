"""From neighbours to the contract's answer: fraud_score = frauds among the 5 / 5, approved below 0.6."""

from __future__ import annotations

from typing import Any

from fraudscore.contract.vectorize import DEFAULT_CONSTANTS, Constants, vectorize
from fraudscore.index.search import Index, K

APPROVAL_THRESHOLD = 0.6


def decision(frauds: int) -> tuple[bool, float]:
    """(approved, fraud_score) for a number of frauds among the K neighbours.

    >>> decision(2), decision(3)
    ((True, 0.4), (False, 0.6))
    """
    score = frauds / K
    return score < APPROVAL_THRESHOLD, score


def score_payload(index: Index, payload: Any, constants: Constants = DEFAULT_CONSTANTS) -> tuple[bool, float]:
    """The contract's answer for one decoded payload; raises PayloadError when it cannot be scored."""
    return decision(index.fraud_count(vectorize(payload, constants)))
