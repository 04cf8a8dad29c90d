"""Exactness: the pruned search returns what a plain brute force returns, neighbour by neighbour."""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from fraudscore import Index, IndexFormatError, ReferenceDataError, vectorize
from fraudscore.errors import EXIT_INTERRUPTED, ConfigError, FraudscoreError, exit_code
from fraudscore.index import _knn
from fraudscore.index.build import build_index, read_references
from fraudscore.index.search import random_queries
from fraudscore.scorer import KnnScorer

from .budget import not_under_sanitizer, scaled
from .conftest import REFERENCES

N_ORACLE_QUERIES = 500


ORACLE_CACHE = REFERENCES.with_name("references.oracle.npz")  # gitignored, like the index
ORACLE_CHUNK_BYTES = 32 << 20
ORACLE_SAMPLE = 1 << 16  # references whose exact distances bound the rest's (see brute_force)


@dataclass(frozen=True)
class Oracle:
    """The references as read plainly (orjson and NumPy, never our native parser)."""

    columns: np.ndarray  # (14, n) int16: value x 10000, exact for the file's 4-decimal values
    labels: np.ndarray  # (n,) bool, True for fraud


def _read_oracle(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Parse the reference JSON with orjson a slice of records at a time (every '}' closes one:
    records hold no nested objects), so the 3M records never exist as Python objects at once."""
    text = gzip.decompress(path.read_bytes())
    scaled, labels = [], []
    start = text.index(b"[") + 1
    while start < len(text):
        end = text.find(b"}", start + ORACLE_CHUNK_BYTES)
        end = len(text) if end < 0 else end + 1
        body = text[start:end].strip().lstrip(b",").rstrip(b"]")
        records = orjson.loads(b"[" + body + b"]") if body.strip() else []
        values = np.array([r["vector"] for r in records], dtype=np.float64).reshape(-1, 14)
        ints = np.rint(values * 10000).astype(np.int16)
        assert np.array_equal(ints / 10000.0, values), "a value that int16 x 10000 does not hold exactly"
        scaled.append(ints)
        labels.append(np.array([r["label"] == "fraud" for r in records], dtype=bool))
        start = end
    return np.concatenate(scaled), np.concatenate(labels)


@pytest.fixture(scope="session")
def reference_columns() -> Oracle:
    """The NumPy oracle's references, parsed once and then cached under data/ (keyed by the
    references file's SHA-256): 90 MB of int16 instead of 3M parsed records each session."""
    key = hashlib.sha256(REFERENCES.read_bytes()).hexdigest()
    try:
        with np.load(ORACLE_CACHE) as cached:
            if str(cached["key"]) != key:
                raise ValueError("stale")
            scaled, labels = cached["scaled"], cached["labels"]
    except (OSError, ValueError, KeyError):
        scaled, labels = _read_oracle(REFERENCES)
        tmp = ORACLE_CACHE.with_name(ORACLE_CACHE.name + ".tmp.npz")
        np.savez(tmp, key=np.array(key), scaled=scaled, labels=labels)
        os.replace(tmp, ORACLE_CACHE)
    return Oracle(np.ascontiguousarray(scaled.T), labels)


def _distances(columns: np.ndarray, q: list[float]) -> np.ndarray:
    """The contract's distance of every reference (a column) to q: float64, summed dimension by
    dimension in order.  A reference value is k / 10000.0, the double nearest its 4 decimals,
    which is what a JSON parser gives."""
    d: np.ndarray = columns[0] / 10000.0 - q[0]
    d *= d
    for dim in range(1, 14):
        t = columns[dim] / 10000.0 - q[dim]
        t *= t
        d += t
    return d


def brute_force(columns: np.ndarray, q: list[float], k: int = 5) -> list[tuple[int, float]]:
    """The k nearest by that distance, ties to the lower position.

    To skip most of the work without changing a bit of the answer: the k-th best distance among
    the first ORACLE_SAMPLE references bounds the k-th best of all, and a partial sum only grows
    as squares are added (x + y >= x for y >= 0 in floating point too).  So the sum is built one
    dimension at a time and a reference leaves as soon as its partial sum exceeds the bound; the
    survivors' sums are the same operations in the same order as ``_distances``, bit for bit."""
    bound = np.partition(_distances(columns[:, :ORACLE_SAMPLE], q), k - 1)[k - 1]
    rows = np.arange(columns.shape[1])
    partial = np.zeros(len(rows))
    for dim in range(14):
        t = columns[dim] if dim == 0 else columns[dim, rows]
        t = t / 10000.0 - q[dim]
        t *= t
        partial = t if dim == 0 else partial + t  # 0.0 + t == t: the first term is taken as it is
        keep = np.flatnonzero(partial <= bound)
        rows, partial = rows[keep], partial[keep]
    order = np.lexsort((rows, partial))[:k]
    return [(int(rows[i]), float(partial[i])) for i in order]


@not_under_sanitizer
def test_search_equals_numpy_brute_force_on_dev_payloads(
    index: Index, dev_entries: list[dict[str, Any]], reference_columns: Oracle
) -> None:
    columns, labels = reference_columns.columns, reference_columns.labels
    rng = random.Random(2026)
    for entry in rng.sample(dev_entries, N_ORACLE_QUERIES):
        q = vectorize(entry["request"])
        want = brute_force(columns, q)
        got = index.knn(q)
        assert [(n.position, n.distance) for n in got] == want, entry["request"]["id"]
        assert [n.is_fraud for n in got] == [bool(labels[i]) for i, _ in want]
        assert index.fraud_count(q) / 5 == entry["expected_fraud_score"]


@not_under_sanitizer
def test_oracle_pruning_changes_nothing(dev_entries: list[dict[str, Any]], reference_columns: Oracle) -> None:
    """brute_force's early exit against every distance computed in full."""
    columns = reference_columns.columns
    queries = [vectorize(e["request"]) for e in dev_entries[:4]] + random_queries(3, seed=12)
    queries.append([x / 10000 for x in columns[:, 5].tolist()])  # a reference itself: distance 0
    for q in queries:
        d = _distances(columns, q)
        near = np.flatnonzero(d <= np.partition(d, 4)[4])
        plain = [(int(i), float(d[i])) for i in near[np.lexsort((near, d[near]))][:5]]
        assert brute_force(columns, q) == plain, q


@not_under_sanitizer
def test_parser_agrees_with_json(reference_columns: Oracle) -> None:
    vectors, parsed_labels, sha = read_references(REFERENCES, progress=False)
    ints = np.frombuffer(vectors, dtype=np.int16).reshape(-1, 14)
    assert np.array_equal(ints.T, reference_columns.columns)  # the oracle checked its int16 are exact
    assert np.array_equal(np.frombuffer(parsed_labels, dtype=np.uint8).astype(bool), reference_columns.labels)
    assert sha.hex() == "24a1fd588e2598ab62de9ac7ac73408e571589e00da4243d7afc9d0f01878f77"


def test_search_equals_native_brute_force_anywhere(index: Index) -> None:
    for q in random_queries(scaled(40, 4), seed=7, sentinel_share=0.3):
        assert index.knn(q) == index.brute_force(q), q


def test_unrounded_queries_are_exact_too(index: Index) -> None:
    rng = random.Random(3)
    for q in random_queries(scaled(20, 3), seed=11):
        q = [x + rng.uniform(-4e-5, 4e-5) if 0 < x < 1 else x for x in q]
        assert index.knn(q) == index.brute_force(q)


def test_scalar_and_avx2_kernels_agree(index_path: Path, dev_entries: list[dict[str, Any]]) -> None:
    queries = [vectorize(e["request"]) for e in dev_entries[: scaled(300, 60)]] + random_queries(50, seed=5)
    with Index(index_path, kernel="scalar") as scalar:
        assert scalar.kernel == "scalar"
        assert [scalar.knn(q) for q in queries] == [Index.knn(index_for(index_path), q) for q in queries]


_default: dict[Path, Index] = {}


def index_for(path: Path) -> Index:
    if path not in _default:
        _default[path] = Index(path)
    return _default[path]


def test_batch_equals_single(index: Index, dev_entries: list[dict[str, Any]]) -> None:
    queries = [vectorize(e["request"]) for e in dev_entries[: scaled(1000, 200)]]
    assert index.fraud_counts(queries) == [index.fraud_count(q) for q in queries]


def write_references(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps(records))
    return path


def test_ties_go_to_the_lower_position(tmp_path: Path) -> None:
    base = [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0, 1, 0, 0.5, 0.5]
    records = []
    for i in range(40):  # pairs at exactly the same distance from base, either side of it
        offset = (i // 2 + 1) / 100
        v = list(base)
        v[0] = round(0.5 + offset if i % 2 else 0.5 - offset, 4)
        records.append({"vector": v, "label": "fraud" if i % 2 else "legit"})
    refs = write_references(tmp_path / "refs.json", records[::-1])  # higher index first in the file
    build_index(refs, tmp_path / "i.fsidx", leaf_size=8, fanout_levels=1, progress=False)
    with Index(tmp_path / "i.fsidx") as idx:
        got = idx.knn(base)
        assert got == idx.brute_force(base)
        positions = [n.position for n in got]
        assert positions[:2] == sorted(positions[:2])  # the tied pair, lower position first
        for a, b in itertools.pairwise(got):
            assert (a.distance, a.position) < (b.distance, b.position)


def test_small_file_round_trip(tmp_path: Path) -> None:
    rng = random.Random(1)
    records = [{"vector": v, "label": rng.choice(["fraud", "legit"])} for v in random_queries(3000, seed=9)]
    refs = write_references(tmp_path / "refs.json", records)
    report = build_index(refs, tmp_path / "i.fsidx", progress=False)
    assert report.n_points == 3000
    assert report.n_fraud == sum(r["label"] == "fraud" for r in records)
    with Index(tmp_path / "i.fsidx") as idx:
        for q in random_queries(30, seed=4):
            assert idx.knn(q) == idx.brute_force(q)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[{"vector":[0,0,0,0,0,0,0,0,0,0,0,0,0,0],"label":"maybe"}]', "label"),
        ('[{"vector":[0.00001,0,0,0,0,0,0,0,0,0,0,0,0,0],"label":"fraud"}]', "more than 4 decimals"),
        ('[{"vector":[0,0,0],"label":"fraud"}]', "14 numbers"),
        ('[{"vector":[2,0,0,0,0,0,0,0,0,0,0,0,0,0],"label":"fraud"}]', r"outside \[-1, 1\]"),
        ('[{"vector":[0,0,0,0,0,0,0,0,0,0,0,0,0,0],"label":"fraud"}', "missing closing"),
        ('[{"vector":[0,0,0,0,0,0,0,0,0,0,0,0,0,0],"label":"fraud"},{"vec', "truncated"),
        ('{"vector":[]}', "JSON array"),
        ("[]", "no reference vectors"),
    ],
)
def test_bad_reference_files(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "r.json").write_text(text)
    with pytest.raises(ReferenceDataError, match=message):
        build_index(tmp_path / "r.json", tmp_path / "i.fsidx", progress=False)


def test_binary_dimension_must_be_binary(tmp_path: Path) -> None:
    v = [0.1] * 14
    with pytest.raises(ReferenceDataError, match="dimension 9 must be 0 or 1") as err:
        build_index(
            write_references(tmp_path / "r.json", [{"vector": v, "label": "fraud"}]),
            tmp_path / "i.fsidx",
            progress=False,
        )
    assert isinstance(err.value.__cause__, ValueError)  # the native error, kept as the cause


def test_corrupt_index_files(tmp_path: Path, index_path: Path) -> None:
    (tmp_path / "junk").write_bytes(b"not an index" * 1000)
    with pytest.raises(IndexFormatError, match="bad magic"):
        Index(tmp_path / "junk")
    head = index_path.read_bytes()[: 1 << 20]
    (tmp_path / "cut").write_bytes(head)
    with pytest.raises(IndexFormatError, match="truncated"):
        Index(tmp_path / "cut")
    with pytest.raises(IndexFormatError, match="cannot map"):
        Index(tmp_path / "missing")
    shifted = memoryview(bytearray(b"\0" + index_path.read_bytes()))[1:]  # the right bytes, misaligned
    with pytest.raises(ValueError, match="8-byte aligned"):
        _knn.Index(shifted)


def test_bad_queries(index: Index) -> None:
    with pytest.raises(ValueError, match="14 numbers"):
        index.fraud_count([0.1] * 13)
    with pytest.raises(ValueError, match="outside"):
        index.fraud_count([float("nan")] * 14)
    with pytest.raises(TypeError):
        index.fraud_count(["a"] * 14)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="kernel"):
        _knn.Index(index._map, "neon")


def test_worked_example_neighbours(index: Index, example_payloads: list[dict[str, Any]]) -> None:
    nearest = index.knn(vectorize(example_payloads[0]))
    assert nearest[0].position == 2_120_963
    assert round(nearest[0].distance ** 0.5, 4) == 0.0058
    assert not any(n.is_fraud for n in nearest)


@not_under_sanitizer
def test_checksum_names_the_file(index: Index, index_path: Path) -> None:
    data = index_path.read_bytes()
    stored = int.from_bytes(data[_knn.CHECKSUM_OFFSET : _knn.CHECKSUM_OFFSET + 8], "little")
    assert index.checksum == f"{stored:016x}" == f"{_knn.checksum(data[_knn.CHECKSUM_OFFSET + 8 :]):016x}"
    assert index.describe()["checksum"] == f"xxh64:{index.checksum}"
    assert KnnScorer(index).id.version == index.checksum
    info = subprocess.run(
        [sys.executable, "-m", "fraudscore.cli", "index", "info", "--index", str(index_path)],
        capture_output=True,
        check=True,
    )
    assert orjson.loads(info.stdout)["checksum"] == f"xxh64:{index.checksum}"


def test_queries_from_any_iterable(index: Index) -> None:
    """A query may be any iterable of 14 numbers; a wrong count is a ValueError that counts what
    was given (the native code once sized the caller's object instead: a generator aborted)."""
    q = random_queries(1, seed=3)[0]
    want = index.knn(q)
    assert index.fraud_count(x for x in q) == index.fraud_count(q)
    assert index.knn(iter(q)) == index.knn(tuple(q)) == want
    assert index.brute_force(x for x in q) == want
    assert index.search_stats(x for x in q) == index.search_stats(q)
    makers: list[Callable[[list[float]], Iterable[float]]] = [lambda v: (x for x in v), iter, tuple, list]
    for wrong in (q[:13], [*q, 0.0], []):
        for make in makers:
            for method in (index.fraud_count, index.knn, index.search_stats, index.brute_force):
                with pytest.raises(ValueError, match=f"14 numbers, got {len(wrong)}$"):
                    method(make(wrong))
    with pytest.raises(TypeError, match="sequence of 14 numbers"):
        index.fraud_count(5)  # type: ignore[arg-type]


def run_build(references: Path, out: Path) -> subprocess.CompletedProcess[str]:
    """`fraudscore index build` in a real process."""
    argv = ["-m", "fraudscore.cli", "index", "build", "--references", str(references), "--out", str(out)]
    return subprocess.run(
        [sys.executable, *argv, "--no-progress"], capture_output=True, text=True, timeout=120
    )


def assert_one_line_error(
    proc: subprocess.CompletedProcess[str], error: FraudscoreError, *names: Path
) -> None:
    assert proc.returncode == exit_code(error), proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    for name in names:
        assert str(name) in proc.stderr, proc.stderr


@not_under_sanitizer
def test_build_checks_its_output_before_parsing(tmp_path: Path) -> None:
    """The references do not even exist: the output's error comes first, so it was checked first."""
    missing = tmp_path / "no-references.json.gz"
    (tmp_path / "a-dir").mkdir()
    (tmp_path / "a-file").write_text("")
    for out, why in [
        (tmp_path / "a-dir", "it is a directory"),
        (tmp_path / "a-file" / "i.fsidx", "cannot write the index to"),
        (Path("/proc/version/i.fsidx"), "cannot write the index to"),
    ]:
        proc = run_build(missing, out)
        assert_one_line_error(proc, ConfigError(""), out)
        assert why in proc.stderr, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-dir", "a-file"]
    assert list((tmp_path / "a-dir").iterdir()) == []


def _damaged_gzips(data: bytes) -> dict[type[Exception], bytes]:
    """A gzip of data damaged three ways, each raising its own exception in gzip."""
    packed = gzip.compress(data, mtime=0)
    found: dict[type[Exception], bytes] = {EOFError: packed[: len(packed) // 2]}
    crc = bytearray(packed)
    crc[-8] ^= 0xFF  # the trailer's CRC-32
    found[gzip.BadGzipFile] = bytes(crc)
    for at in range(20, len(packed) - 8):  # a byte of the deflate stream that zlib itself rejects
        damaged = bytearray(packed)
        damaged[at] ^= 0xA5
        try:
            gzip.decompress(bytes(damaged))
        except zlib.error:
            found[zlib.error] = bytes(damaged)
            break
        except (OSError, EOFError):
            continue
    for error, blob in found.items():
        with pytest.raises(error):
            gzip.decompress(blob)
    return found


@not_under_sanitizer
def test_build_of_a_damaged_gzip_is_a_reference_error(tmp_path: Path) -> None:
    records = [{"vector": v, "label": "legit"} for v in random_queries(2000, seed=2)]
    cases = _damaged_gzips(json.dumps(records).encode())
    assert set(cases) == {EOFError, gzip.BadGzipFile, zlib.error}
    out = tmp_path / "i.fsidx"
    for error, blob in cases.items():
        refs = tmp_path / f"refs-{error.__name__}.json.gz"
        refs.write_bytes(blob)
        proc = run_build(refs, out)
        assert_one_line_error(proc, ReferenceDataError(""), refs)
        assert "cannot decompress" in proc.stderr, (error, proc.stderr)
        assert not out.exists() and not out.with_name(out.name + ".tmp").exists()


@not_under_sanitizer
def test_interrupted_build_leaves_no_temporary_file(tmp_path: Path) -> None:
    out = tmp_path / "i.fsidx"
    tmp = out.with_name(out.name + ".tmp")
    argv = ["-m", "fraudscore.cli", "index", "build", "--references", str(REFERENCES), "--out", str(out)]
    proc = subprocess.Popen([sys.executable, *argv, "--no-progress"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not tmp.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert tmp.exists(), "the build did not start its output"
        proc.send_signal(signal.SIGINT)  # while it parses the 3M references
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_oracle_reads_in_slices_what_a_plain_parse_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(8)
    records = [{"vector": v, "label": rng.choice(["fraud", "legit"])} for v in random_queries(500, seed=6)]
    path = tmp_path / "refs.json.gz"
    path.write_bytes(gzip.compress(json.dumps(records, indent=rng.choice([None, 1])).encode()))
    monkeypatch.setattr(sys.modules[__name__], "ORACLE_CHUNK_BYTES", 997)  # many slices, cut anywhere
    scaled, labels = _read_oracle(path)
    assert np.array_equal(scaled / 10000.0, np.array([r["vector"] for r in records]))
    assert labels.tolist() == [r["label"] == "fraud" for r in records]
