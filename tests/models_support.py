"""A small trained model for the tests: the first references of the real file, trained once per
test process in a temporary registry (a few seconds), so no test trains on 3M rows."""

from __future__ import annotations

import atexit
import functools
import gzip
import shutil
import tempfile
from pathlib import Path

from fraudscore.models.registry import Registry
from fraudscore.models.scorer import ModelScorer
from fraudscore.models.train import TrainConfig, TrainReport, train

ROOT = Path(__file__).resolve().parent.parent
REFERENCES = ROOT / "data" / "references.json.gz"
INDEX = ROOT / "data" / "references.fsidx"
SMALL_ROWS = 50_000
SMALL_CONFIG = TrainConfig(num_boost_round=60, num_threads=1, agreement_queries=300, check_rows=200)


def write_small_references(out: Path, rows: int = SMALL_ROWS) -> Path:
    """The first ``rows`` records of the real references, as a references.json.gz of their own."""
    separator = b"},{"
    data = b""
    with gzip.open(REFERENCES) as f:
        while data.count(separator) < rows:
            chunk = f.read(1 << 20)
            if not chunk:
                raise AssertionError(f"{REFERENCES} has fewer than {rows} records")
            data += chunk
    cut = -1
    for _ in range(rows):
        cut = data.index(separator, cut + 1)
    out.write_bytes(gzip.compress(data[: cut + 1] + b"]", compresslevel=1))
    return out


@functools.cache
def workspace() -> Path:
    path = Path(tempfile.mkdtemp(prefix="fraudscore-models-"))
    atexit.register(shutil.rmtree, path, True)
    return path


@functools.cache
def small_references() -> Path:
    return write_small_references(workspace() / "small-references.json.gz")


@functools.cache
def small_model() -> tuple[Registry, TrainReport]:
    """A registry holding one small model, trained once per process."""
    registry = Registry(workspace() / "registry")
    report = train(small_references(), registry, config=SMALL_CONFIG, index_path=INDEX, progress=False)
    return registry, report


def small_model_scorer(index_path: Path) -> ModelScorer:
    """SCORERS' factory (test_scorer.py): the small model, whatever the index."""
    registry, report = small_model()
    return ModelScorer.from_registry(registry, report.version)
