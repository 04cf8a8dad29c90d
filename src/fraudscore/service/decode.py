"""A request body turned into what scoring needs, or into the 400 that says why it cannot be.

Both scoring routes (``POST /fraud-score`` and ``POST /v1/score``) read their body through
``read_payload`` and refuse a vector the index cannot search through ``unsearchable``, so the
same bad input gets the same answer from either.
"""

from __future__ import annotations

from typing import Any

import orjson

from fraudscore.contract.vectorize import Constants, vectorize
from fraudscore.errors import PayloadError
from fraudscore.service import responses


def read_payload(body: bytes, constants: Constants) -> tuple[Any, list[float]] | bytes:
    """(the decoded payload, its vector), or a 400 response naming what is wrong with the body."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return responses.error(400, f"malformed JSON: {exc}")
    try:
        return payload, vectorize(payload, constants)
    except PayloadError as exc:
        return responses.error(400, str(exc))


def unsearchable(exc: ValueError) -> bytes:
    """The 400 for a vector the index refuses (out of its range): still the client's input."""
    return responses.error(400, f"cannot score this transaction: {exc}")
