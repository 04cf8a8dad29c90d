"""The offline commands' work: score a file of payloads, or evaluate against expected answers.

Files are read by ``contract.testdata``: test data in the contract's format, or payloads as a
JSON array or JSON lines, any of them gzip-compressed.  A record that cannot be scored is that
record's error, reported with its position in the file, and never the batch's: the rest are
scored all the same.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fraudscore.contract import testdata
from fraudscore.contract.testdata import Record
from fraudscore.contract.vectorize import DEFAULT_CONSTANTS, Constants, vectorize
from fraudscore.errors import BadInputError, Category, DataFileError, FraudscoreError, InternalError
from fraudscore.scorer import KnnScorer, Scorer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Scored:
    """One payload's outcome: (approved, score), or the reason it could not be scored and the
    category of that reason (BAD_INPUT for the payload's fault, INTERNAL for ours)."""

    id: Any
    approved: bool | None
    fraud_score: float | None
    error: str | None = None
    where: str | None = None  # the record's position in its file: "line 3", "[2]", "entries[2]"
    category: Category | None = None

    def as_json(self) -> dict[str, Any]:
        if self.error is not None:
            return {"id": self.id, "at": self.where, "error": self.error}
        return {"id": self.id, "approved": self.approved, "fraud_score": self.fraud_score}


def vector_of(record: Record, constants: Constants = DEFAULT_CONSTANTS) -> list[float] | tuple[str, Category]:
    """The record's vector, or why it has none."""
    if record.error is not None:
        return record.error, Category.BAD_INPUT
    try:
        return vectorize(record.value, constants)
    except BadInputError as exc:
        return str(exc), exc.category
    except Exception as exc:  # a bug met on one record: that record's error, not the batch's
        log.debug("internal error on %s", record.where, exc_info=True)
        return f"internal error: {type(exc).__name__}: {exc}", Category.INTERNAL


def score_records(
    scorer: Scorer, records: Sequence[Record], constants: Constants = DEFAULT_CONSTANTS
) -> list[Scored]:
    """Score many records: vectorize each, then score the good ones in one call."""
    outcomes = [vector_of(record, constants) for record in records]
    scores = iter(scorer.scores([v for v in outcomes if isinstance(v, list)]))
    out = []
    for record, outcome in zip(records, outcomes, strict=True):
        ident = record.value.get("id") if isinstance(record.value, dict) else None
        if isinstance(outcome, tuple):
            error, category = outcome
            out.append(Scored(ident, None, None, error, record.where, category))
        else:
            score = next(scores)
            out.append(Scored(ident, scorer.approves(score), score, where=record.where))
    return out


def score_all(scorer: Scorer, payloads: list[Any], constants: Constants = DEFAULT_CONSTANTS) -> list[Scored]:
    """Score many payloads (decoded JSON values), each known by its index: ``[i]``."""
    return score_records(scorer, [Record(f"[{i}]", p) for i, p in enumerate(payloads)], constants)


def failure(source: str | Path, failed: Sequence[Scored], total: int, noun: str) -> FraudscoreError:
    """The one error for a batch with records that could not be scored: it names the file, how
    many, and the first; it is a bug (INTERNAL) if any failed through one, else BAD_INPUT."""
    first = failed[0]
    message = (
        f"{testdata.display_name(source)}: {len(failed)} of {total} {noun} could not be scored "
        f"(the first, at {first.where}: {first.error})"
    )
    if any(s.category is Category.INTERNAL for s in failed):
        return InternalError(message)
    return DataFileError(message)


@dataclass
class Evaluation:
    """tp/tn/fp/fn (positive = fraud, i.e. not approved), every payload whose score differs, and
    every entry that could not be scored."""

    total: int = 0
    tp: int = 0
    tn: int = 0
    fp: int = 0
    fn: int = 0
    score_differs: list[dict[str, Any]] = field(default_factory=list)
    unscored: list[Scored] = field(default_factory=list)
    references_sha256: str | None = None
    index_sha256: str | None = None

    @property
    def errors(self) -> int:
        return len(self.unscored)

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
            "unscored": [s.as_json() for s in self.unscored],
            "references_match": (
                None if self.references_sha256 is None else self.references_sha256 == self.index_sha256
            ),
        }


def evaluate(
    scorer: KnnScorer,
    document: Any,
    constants: Constants = DEFAULT_CONSTANTS,
    source: str | Path = "test data",
) -> Evaluation:
    """Compare the kNN's answers with a test-data document's expected ones; ``source`` names the
    document in errors (DataFileError if it is not test data at all)."""
    good, bad = testdata.split_entries(document, source)
    checksum = document.get("references_checksum_sha256")
    result = Evaluation(
        total=len(good) + len(bad),
        references_sha256=checksum if isinstance(checksum, str) else None,
        index_sha256=scorer.index.sha256,
    )
    result.unscored += [Scored(None, None, None, b.error, b.where, Category.BAD_INPUT) for b in bad]
    records = [Record(where, entry.request) for where, entry in good]
    for scored, (_, entry) in zip(score_records(scorer, records, constants), good, strict=True):
        if scored.error is not None:
            result.unscored.append(scored)
            continue
        want_approved, want_score = entry.expected_approved, entry.expected_fraud_score
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
    result.unscored.sort(key=_entry_index)  # in file order: the bad entries and the unscorable ones
    return result


def _entry_index(scored: Scored) -> int:
    """i of an entry's position, ``entries[i]``."""
    where = scored.where or "entries[0]"
    return int(where[where.index("[") + 1 : -1])
