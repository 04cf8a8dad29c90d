"""The offline commands' work: score a file of payloads, or evaluate against expected answers.

Files are read by ``contract.testdata``: test data in the contract's format, or payloads as a
JSON array or JSON lines, any of them gzip-compressed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from fraudscore.contract import testdata
from fraudscore.contract.vectorize import DEFAULT_CONSTANTS, Constants, vectorize
from fraudscore.errors import PayloadError
from fraudscore.scorer import KnnScorer, Scorer


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


def score_all(scorer: Scorer, payloads: list[Any], constants: Constants = DEFAULT_CONSTANTS) -> list[Scored]:
    """Score many payloads: vectorize each, then score them all in one call."""
    vectors: list[list[float]] = []
    errors: dict[int, str] = {}
    for i, payload in enumerate(payloads):
        try:
            vectors.append(vectorize(payload, constants))
        except PayloadError as exc:
            errors[i] = str(exc)
    scores = iter(scorer.scores(vectors))
    out = []
    for i, payload in enumerate(payloads):
        ident = payload.get("id") if isinstance(payload, dict) else None
        if i in errors:
            out.append(Scored(ident, None, None, errors[i]))
        else:
            score = next(scores)
            out.append(Scored(ident, scorer.approves(score), score))
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


def evaluate(scorer: KnnScorer, document: Any, constants: Constants = DEFAULT_CONSTANTS) -> Evaluation:
    """Compare the kNN's answers with a test-data document's expected ones."""
    entries = testdata.entries(document, "test data")
    result = Evaluation(
        total=len(entries),
        references_sha256=document.get("references_checksum_sha256"),
        index_sha256=scorer.index.sha256,
    )
    for scored, entry in zip(score_all(scorer, [e.request for e in entries], constants), entries, strict=True):
        want_approved, want_score = entry.expected_approved, entry.expected_fraud_score
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
