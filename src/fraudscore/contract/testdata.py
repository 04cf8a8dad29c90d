"""The contract's data files as documents: JSON (or JSON lines, or gzip of either), and the
test-data format, ``{"stats": …, "entries": [{"request", "expected_approved",
"expected_fraud_score"}]}``.  One reader for every command that takes such a file.

Every error names the file and, where there is one, the position in it: a line and column
for JSON, ``entries[i]`` for an entry of the test data, ``[i]`` for an item of an array.

>>> entries({"entries": [{"request": {"id": "tx-1"}, "expected_approved": False,
...                       "expected_fraud_score": 0.8}]}, "example")
[Entry(request={'id': 'tx-1'}, expected_approved=False, expected_fraud_score=0.8)]
"""

from __future__ import annotations

import gzip
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from fraudscore.errors import DataFileError

GZIP_MAGIC = b"\x1f\x8b"


def display_name(path: str | Path) -> str:
    """How messages name a file: ``-`` is stdin."""
    return "stdin" if str(path) == "-" else str(path)


def read_bytes(path: str | Path) -> bytes:
    """A file's bytes (stdin for ``-``), gunzipped when gzip-compressed; DataFileError naming
    the file when it cannot be read or its gzip data is damaged."""
    name = display_name(path)
    try:
        raw = sys.stdin.buffer.read() if str(path) == "-" else Path(path).read_bytes()
    except OSError as exc:
        raise DataFileError(f"cannot read {name}: {exc.strerror or exc}") from exc
    if raw[:2] == GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
            raise DataFileError(f"{name}: damaged gzip data ({exc})") from exc
    if not raw.strip():
        raise DataFileError(f"{name} is empty")
    return raw


@dataclass(frozen=True)
class Line:
    """One line of a JSON-lines file: its number in the file, and its value or why it has none."""

    number: int
    value: Any = None
    error: str | None = None


def _parse(raw: bytes, name: str) -> Any | list[Line]:
    """The document in ``raw``, or, for JSON lines, its lines (a list of ``Line``).

    It is JSON lines when the whole is not one JSON value but its first line is; otherwise a
    document that does not parse is reported at its line and column in the file.
    """
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        whole = exc
    lines = raw.split(b"\n")
    first = next(i for i, line in enumerate(lines) if line.strip())
    try:
        orjson.loads(lines[first])
    except orjson.JSONDecodeError:
        raise DataFileError(
            f"{name}: not JSON at line {whole.lineno} column {whole.colno}: {whole.msg}"
        ) from None
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(Line(i + 1, orjson.loads(line)))
        except orjson.JSONDecodeError as exc:
            out.append(Line(i + 1, error=f"not JSON at column {exc.colno}: {exc.msg}"))
    return out


def read_json(path: str | Path) -> Any:
    """A JSON document from a file (gzip-compressed or not), or from stdin for ``-``.

    JSON lines are read as a list of their values; a line that is not JSON is a DataFileError
    naming its line and column in the file.
    """
    name = display_name(path)
    document = _parse(read_bytes(path), name)
    if isinstance(document, list) and document and all(isinstance(x, Line) for x in document):
        for line in document:
            if line.error is not None:
                raise DataFileError(f"{name}: line {line.number}: {line.error}")
        return [line.value for line in document]
    return document


@dataclass(frozen=True)
class Record:
    """One payload of a file, with where it is (``line 3``, ``[2]``, ``entries[2]``) and, when it
    cannot even be read as JSON, why."""

    where: str
    value: Any = None
    error: str | None = None


def read_records(path: str | Path) -> list[Record]:
    """The payloads of a file: test data's requests, an array's items, JSON lines, or a single
    payload.  A JSON line that does not parse is that record's error, not the file's."""
    name = display_name(path)
    document = _parse(read_bytes(path), name)
    if isinstance(document, list) and document and all(isinstance(x, Line) for x in document):
        return [Record(f"line {line.number}", line.value, line.error) for line in document]
    if isinstance(document, dict) and isinstance(document.get("entries"), list):
        return [
            Record(f"entries[{i}]", entry.get("request") if isinstance(entry, dict) else None)
            for i, entry in enumerate(document["entries"])
        ]
    if isinstance(document, list):
        return [Record(f"[{i}]", item) for i, item in enumerate(document)]
    return [Record("the document", document)]


@dataclass(frozen=True)
class Entry:
    """One line of the test data: a payload and the answer the contract expects for it."""

    request: Any
    expected_approved: bool
    expected_fraud_score: float


def _kind(document: Any) -> str:
    if isinstance(document, dict):
        return "an object without an 'entries' list"
    if isinstance(document, list):
        return "a JSON array (payloads? `fraudscore score` takes those)"
    return f"a JSON {type(document).__name__}"


def split_entries(document: Any, source: str | Path) -> tuple[list[tuple[str, Entry]], list[Record]]:
    """A test-data document's entries that can be used, each with its position, and the ones that
    cannot (as records with the reason); DataFileError naming ``source`` if it is not test data."""
    raw = document.get("entries") if isinstance(document, dict) else None
    if not isinstance(raw, list):
        raise DataFileError(
            f"{display_name(source)} is not the contract's test data "
            f'({{"entries": [{{"request", "expected_approved", "expected_fraud_score"}}]}}): '
            f"it is {_kind(document)}"
        )
    good: list[tuple[str, Entry]] = []
    bad: list[Record] = []
    for i, item in enumerate(raw):
        where = f"entries[{i}]"
        if not isinstance(item, dict) or not {"request", "expected_approved", "expected_fraud_score"} <= set(
            item
        ):
            bad.append(
                Record(where, item, "not an object with request, expected_approved, expected_fraud_score")
            )
            continue
        approved, score = item["expected_approved"], item["expected_fraud_score"]
        if not isinstance(approved, bool):
            bad.append(Record(where, item, "expected_approved must be true or false"))
        elif not isinstance(score, int | float) or isinstance(score, bool):
            bad.append(Record(where, item, "expected_fraud_score must be a number"))
        else:
            good.append((where, Entry(item["request"], approved, float(score))))
    return good, bad


def entries(document: Any, source: str | Path) -> list[Entry]:
    """The entries of a test-data document; DataFileError naming ``source`` and the first bad
    entry if it is not one."""
    good, bad = split_entries(document, source)
    if bad:
        raise DataFileError(f"{display_name(source)}: {bad[0].where}: {bad[0].error}")
    return [entry for _, entry in good]


def load(path: str | Path) -> list[Entry]:
    """The entries of a test-data file, .json or .json.gz."""
    return entries(read_json(path), path)


def amounts_scaled(payload: Any, factor: float) -> Any:
    """``payload`` with its transaction's amount times ``factor``: the drift the lifecycle issue's
    acceptance injects (the dev payloads with amounts x3), for tests and benches alike."""
    transaction = {**payload["transaction"], "amount": payload["transaction"]["amount"] * factor}
    return {**payload, "transaction": transaction}
