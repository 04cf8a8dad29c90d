"""The contract's data files as documents: JSON (or JSON lines, or gzip of either), and the
test-data format, ``{"stats": …, "entries": [{"request", "expected_approved",
"expected_fraud_score"}]}``.  One reader for every command that takes such a file.

>>> entries({"entries": [{"request": {"id": "tx-1"}, "expected_approved": False,
...                       "expected_fraud_score": 0.8}]}, "example")
[Entry(request={'id': 'tx-1'}, expected_approved=False, expected_fraud_score=0.8)]
"""

from __future__ import annotations

import gzip
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from fraudscore.errors import DataFileError


def read_json(path: str | Path) -> Any:
    """A JSON document from a file (gzip-compressed or not), or from stdin for ``-``."""
    try:
        raw = sys.stdin.buffer.read() if str(path) == "-" else Path(path).read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as exc:
        raise DataFileError(f"cannot read {path}: {exc}") from exc
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        # maybe JSON lines
        try:
            return [orjson.loads(line) for line in raw.splitlines() if line.strip()]
        except orjson.JSONDecodeError as exc:
            raise DataFileError(f"{path} is neither JSON nor JSON lines: {exc}") from exc


@dataclass(frozen=True)
class Entry:
    """One line of the test data: a payload and the answer the contract expects for it."""

    request: Any
    expected_approved: bool
    expected_fraud_score: float


def entries(document: Any, source: str | Path) -> list[Entry]:
    """The entries of a test-data document; DataFileError naming ``source`` if it is not one."""
    raw = document.get("entries") if isinstance(document, dict) else None
    if not isinstance(raw, list):
        raise DataFileError(f"{source}: no 'entries' list: not the contract's test-data format")
    out = []
    for i, item in enumerate(raw):
        try:
            request, approved = item["request"], item["expected_approved"]
            score = item["expected_fraud_score"]
        except (TypeError, KeyError):
            raise DataFileError(
                f"{source}: entry {i} is not an object with request, expected_approved, expected_fraud_score"
            ) from None
        valid_score = isinstance(score, int | float) and not isinstance(score, bool)
        if not (isinstance(approved, bool) and valid_score):
            raise DataFileError(f"{source}: entry {i} has a field of the wrong type")
        out.append(Entry(request, approved, float(score)))
    return out


def load(path: str | Path) -> list[Entry]:
    """The entries of a test-data file, .json or .json.gz."""
    return entries(read_json(path), path)
