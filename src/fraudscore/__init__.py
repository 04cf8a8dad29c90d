"""fraudscore: exact k-nearest-neighbour card-fraud scoring, served in about a millisecond.

The public API is small::

    from fraudscore import KnnScorer, vectorize, score_payload
    scorer = KnnScorer.open("data/references.fsidx")
    vector = vectorize(payload)                    # the contract's 14 dimensions
    approved, fraud_score = score_payload(scorer, payload)

Names are imported on first use, so a process that needs only a part (the load balancer needs
no index) does not load the native core or read the contract's files.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fraudscore.contract.vectorize import Constants, vectorize
    from fraudscore.errors import (
        BadInputError,
        Category,
        ConfigError,
        DataFileError,
        FraudscoreError,
        IndexFormatError,
        PayloadError,
        ReferenceDataError,
        TransientError,
    )
    from fraudscore.index.search import Index, Neighbour
    from fraudscore.scorer import APPROVAL_THRESHOLD, KnnScorer, Scorer, ScorerId, decision, score_payload

_EXPORTS = {
    "Constants": "fraudscore.contract.vectorize",
    "vectorize": "fraudscore.contract.vectorize",
    "BadInputError": "fraudscore.errors",
    "Category": "fraudscore.errors",
    "ConfigError": "fraudscore.errors",
    "DataFileError": "fraudscore.errors",
    "FraudscoreError": "fraudscore.errors",
    "IndexFormatError": "fraudscore.errors",
    "PayloadError": "fraudscore.errors",
    "ReferenceDataError": "fraudscore.errors",
    "TransientError": "fraudscore.errors",
    "Index": "fraudscore.index.search",
    "Neighbour": "fraudscore.index.search",
    "APPROVAL_THRESHOLD": "fraudscore.scorer",
    "KnnScorer": "fraudscore.scorer",
    "Scorer": "fraudscore.scorer",
    "ScorerId": "fraudscore.scorer",
    "decision": "fraudscore.scorer",
    "score_payload": "fraudscore.scorer",
}
__all__ = [
    "APPROVAL_THRESHOLD",
    "BadInputError",
    "Category",
    "ConfigError",
    "Constants",
    "DataFileError",
    "FraudscoreError",
    "Index",
    "IndexFormatError",
    "KnnScorer",
    "Neighbour",
    "PayloadError",
    "ReferenceDataError",
    "Scorer",
    "ScorerId",
    "TransientError",
    "decision",
    "score_payload",
    "vectorize",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fraudscore' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return [*globals(), *__all__]
