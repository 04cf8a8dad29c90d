"""fraudscore: exact k-nearest-neighbour card-fraud scoring, served in about a millisecond.

The public API is small::

    from fraudscore import Index, vectorize, score_payload
    index = Index("data/references.fsidx")
    vector = vectorize(payload)                # the contract's 14 dimensions
    approved, fraud_score = score_payload(index, payload)
"""

from __future__ import annotations

from fraudscore.contract.vectorize import Constants, vectorize
from fraudscore.errors import (
    DataFileError,
    FraudscoreError,
    IndexFormatError,
    PayloadError,
    ReferenceDataError,
)
from fraudscore.index.search import Index, Neighbour
from fraudscore.scoring import APPROVAL_THRESHOLD, decision, score_payload

__all__ = [
    "APPROVAL_THRESHOLD",
    "Constants",
    "DataFileError",
    "FraudscoreError",
    "Index",
    "IndexFormatError",
    "Neighbour",
    "PayloadError",
    "ReferenceDataError",
    "decision",
    "score_payload",
    "vectorize",
]
__version__ = "0.1.0"
