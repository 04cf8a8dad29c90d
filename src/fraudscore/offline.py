"""The offline commands' work: score a file of payloads, or evaluate against expected answers.

Test data is the contract's format, ``{"stats": ..., "entries": [{"request", "expected_approved",
"expected_fraud_score"}]}``, as ``.json`` or ``.json.gz``.  Payload files may also be a JSON
array of payloads or JSON lines.
"""

from __future__ import annotations

import gzip
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from fraudscore.contract.vectorize import DEFAULT_CONSTANTS, Constants, vectorize
from fraudscore.errors import DataFileError, PayloadError
from fraudscore.index.search import Index
from fraudscore.scoring import decision


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


def iter_payloads(document: Any) -> Iterator[Any]:
    """Payloads from a test-data document, an array of payloads, or a single payload."""
    if isinstance(document, dict) and isinstance(document.get("entries"), list):
        for entry in document["entries"]:
            yield entry.get("request") if isinstance(entry, dict) else entry
    elif isinstance(document, list):
        yield from document
    else:
        yield document


@dataclass(frozen=True)
class Scored:
    """One payload's outcome: (approved, score), or the reason it could not be scored."""

    id: Any
    approved: bool | None
    fraud_score: float | None
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        if self.error is not None:
            return {"id": self.id, "error": self.error}
        return {"id": self.id, "approved": self.approved, "fraud_score": self.fraud_score}


def score_all(index: Index, payloads: list[Any], constants: Constants = DEFAULT_CONSTANTS) -> list[Scored]:
    """Score many payloads: vectorize each, then search them all in one native call."""
    vectors: list[list[float]] = []
    errors: dict[int, str] = {}
    for i, payload in enumerate(payloads):
        try:
            vectors.append(vectorize(payload, constants))
        except PayloadError as exc:
            errors[i] = str(exc)
    counts = iter(index.fraud_counts(vectors))
    out = []
    for i, payload in enumerate(payloads):
        ident = payload.get("id") if isinstance(payload, dict) else None
        if i in errors:
            out.append(Scored(ident, None, None, errors[i]))
        else:
            approved, score = decision(next(counts))
            out.append(Scored(ident, approved, score))
    return out


@dataclass
class Evaluation:
    """tp/tn/fp/fn (positive = fraud, i.e. not approved) and every payload whose score differs."""

    total: int = 0
    tp: int = 0
    tn: int = 0
    fp: int = 0
    fn: int = 0
    errors: int = 0
    score_differs: list[dict[str, Any]] = field(default_factory=list)
    references_sha256: str | None = None
    index_sha256: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "tp": self.tp,
            "tn": self.tn,
            "fp": self.fp,
            "fn": self.fn,
            "errors": self.errors,
            "score_differs": len(self.score_differs),
            "differing": self.score_differs,
            "references_match": (
                None if self.references_sha256 is None else self.references_sha256 == self.index_sha256
            ),
        }


def evaluate(index: Index, document: Any, constants: Constants = DEFAULT_CONSTANTS) -> Evaluation:
    """Compare the index's answers with a test-data document's expected ones."""
    if not isinstance(document, dict) or not isinstance(document.get("entries"), list):
        raise DataFileError('test data must be an object with an "entries" array')
    entries = document["entries"]
    try:
        expected = [(bool(e["expected_approved"]), float(e["expected_fraud_score"])) for e in entries]
    except (KeyError, TypeError, ValueError) as exc:
        raise DataFileError(f"each entry needs expected_approved and expected_fraud_score: {exc!r}") from exc
    result = Evaluation(
        total=len(entries),
        references_sha256=document.get("references_checksum_sha256"),
        index_sha256=index.sha256,
    )
    for scored, (want_approved, want_score), _entry in zip(
        score_all(index, [e.get("request") for e in entries], constants), expected, entries, strict=True
    ):
        if scored.error is not None:
            result.errors += 1
            result.score_differs.append({"id": scored.id, "error": scored.error})
            continue
        fraud, said_fraud = not want_approved, not scored.approved
        result.tp += fraud and said_fraud
        result.tn += not fraud and not said_fraud
        result.fp += not fraud and said_fraud
        result.fn += fraud and not said_fraud
        assert scored.fraud_score is not None
        if abs(scored.fraud_score - want_score) > 1e-9:
            result.score_differs.append(
                {"id": scored.id, "expected_fraud_score": want_score, "fraud_score": scored.fraud_score}
            )
    return result
