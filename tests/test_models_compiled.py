"""forest.bin, the compiled form of a version's model.txt: what a load builds the evaluator from.

Its arrays must be model.txt's, its predictions LightGBM's, a damaged one must be refused like a
damaged model.txt, and a version without one (written before it existed) still loads, from
model.txt."""

from __future__ import annotations

import hashlib
import json
import shutil
import stat
import struct
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import pytest

from fraudscore.errors import ModelFormatError
from fraudscore.index.search import random_queries
from fraudscore.models import trees
from fraudscore.models.live import LiveModels
from fraudscore.models.registry import FOREST_FILE, MODEL_FILE, POINTER, Registry, write_json_atomic
from fraudscore.models.scorer import ModelScorer
from fraudscore.models.trees import compile_forest, load_forest, parse_model, read_compiled
from tests.models_support import small_model

ARRAYS = ("feature", "threshold", "decision", "left", "right", "value", "roots")


@pytest.fixture(scope="module")
def trained(index_path: Path) -> tuple[Registry, str]:
    registry, report = small_model()
    return registry, report.version


def _copy(registry: Registry, version: str, root: Path) -> tuple[Registry, Path]:
    """A writable copy of ``version`` in a registry of its own, to damage."""
    dst = root / "versions" / version
    shutil.copytree(registry.version_dir(version), dst)
    for p in dst.iterdir():
        p.chmod(stat.S_IRUSR | stat.S_IWUSR)
    return Registry(root), dst


def _set_file(path: Path, filename: str, data: bytes) -> None:
    """Replace one of the version's files and record its checksum, as a careful forger would."""
    (path / filename).write_bytes(data)
    meta = json.loads((path / "meta.json").read_text())
    meta["files"][filename] = hashlib.sha256(data).hexdigest()
    (path / "meta.json").write_text(json.dumps(meta))


def _without_forest(path: Path) -> None:
    """The version as it was before forest.bin existed: model.txt alone."""
    (path / FOREST_FILE).unlink()
    meta = json.loads((path / "meta.json").read_text())
    del meta["files"][FOREST_FILE]
    (path / "meta.json").write_text(json.dumps(meta))


def _no_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any parse of model.txt fail, to see whether a load parses it."""

    def refuse(text: str, source: str | Path = "") -> trees.ParsedModel:
        raise AssertionError(f"{source} was parsed")

    monkeypatch.setattr(trees, "parse_model", refuse)


def test_training_writes_forest_bin_with_model_txt_arrays(trained: tuple[Registry, str]) -> None:
    registry, version = trained
    path = registry.version_dir(version)
    meta = registry.meta(version)
    compiled = (path / FOREST_FILE).read_bytes()
    assert meta["files"][FOREST_FILE] == hashlib.sha256(compiled).hexdigest()
    assert not (path / FOREST_FILE).stat().st_mode & stat.S_IWUSR  # immutable like the rest
    text = (path / MODEL_FILE).read_bytes()
    parsed = parse_model(text.decode())
    read = read_compiled(compiled, FOREST_FILE, hashlib.sha256(text).hexdigest())
    for name in ARRAYS:
        assert bytes(getattr(read, name)) == bytes(getattr(parsed, name)), name
    assert (read.feature_names, read.sigmoid, read.n_trees) == (
        parsed.feature_names,
        parsed.sigmoid,
        parsed.n_trees,
    )
    assert compile_forest(read, text) == compiled  # and back


def test_a_load_builds_from_forest_bin_and_predicts_as_lightgbm(
    trained: tuple[Registry, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    registry, version = trained
    model_path = registry.version_dir(version) / MODEL_FILE
    _, from_text = load_forest(model_path)
    _no_parsing(monkeypatch)
    meta, forest = registry.validated(version)
    assert forest is not None and meta["version"] == version
    rows = np.array(random_queries(10_000, seed=5), dtype=np.float64)
    got = np.frombuffer(forest.predict_many(rows.tobytes()))
    assert np.array_equal(got, np.frombuffer(from_text.predict_many(rows.tobytes())))
    want = lgb.Booster(model_file=str(model_path)).predict(rows)
    assert np.max(np.abs(got - want)) <= 1e-6
    assert forest.explain(list(rows[0])) == from_text.explain(list(rows[0]))
    assert forest.bias == from_text.bias


def test_a_version_without_forest_bin_is_parsed_from_model_txt(
    trained: tuple[Registry, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry, path = _copy(*trained, tmp_path)
    version = trained[1]
    _without_forest(path)
    _, forest = registry.validated(version)
    assert forest is not None
    rows = np.array(random_queries(1000, seed=6), dtype=np.float64)
    _, expected = trained[0].validated(version)
    assert expected is not None
    assert forest.predict_many(rows.tobytes()) == expected.predict_many(rows.tobytes())
    _no_parsing(monkeypatch)  # it really is model.txt that this version is built from
    with pytest.raises(AssertionError, match=r"model\.txt was parsed"):
        registry.validated(version)


def _refused(registry: Registry, version: str, match: str) -> None:
    with pytest.raises(ModelFormatError, match=match):
        registry.validate(version)
    with pytest.raises(ModelFormatError, match=match):
        registry.promote(version)
    assert registry.production() is None
    with pytest.raises(ModelFormatError, match=match):
        ModelScorer.from_registry(registry, version)


def test_a_damaged_forest_bin_is_refused(trained: tuple[Registry, str], tmp_path: Path) -> None:
    registry, path = _copy(*trained, tmp_path)
    data = bytearray((path / FOREST_FILE).read_bytes())
    data[-1] ^= 1
    (path / FOREST_FILE).write_bytes(data)
    _refused(registry, trained[1], f"{FOREST_FILE} does not match its checksum")


def test_a_missing_forest_bin_is_refused(trained: tuple[Registry, str], tmp_path: Path) -> None:
    registry, path = _copy(*trained, tmp_path)
    (path / FOREST_FILE).unlink()
    _refused(registry, trained[1], f"cannot read {FOREST_FILE}")


def _leaf_offset(data: bytes) -> int:
    """Where the value of the first leaf lies in a forest.bin."""
    n_nodes, names_len = struct.unpack_from("<I", data, 20)[0], struct.unpack_from("<I", data, 64)[0]
    start = 72 + (names_len + 7) // 8 * 8
    features = np.frombuffer(data, dtype="<i4", count=n_nodes, offset=start + 16 * n_nodes)
    leaf = int(np.argmax(features < 0))
    return int(start + 8 * n_nodes + 8 * leaf)  # the values follow the thresholds


def test_a_forest_bin_changed_with_its_checksum_is_refused_by_the_check_rows(
    trained: tuple[Registry, str], tmp_path: Path
) -> None:
    registry, path = _copy(*trained, tmp_path)
    data = bytearray((path / FOREST_FILE).read_bytes())
    at = _leaf_offset(bytes(data))
    value = struct.unpack_from("<d", data, at)[0]
    struct.pack_into("<d", data, at, value + 0.5)
    _set_file(path, FOREST_FILE, bytes(data))
    _refused(registry, trained[1], "check row")


def _edit_forest(path: Path, change: Any) -> None:
    data = bytearray((path / FOREST_FILE).read_bytes())
    change(data)
    _set_file(path, FOREST_FILE, bytes(data))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda d: d.__setitem__(slice(0, 8), b"NOTTREES"), "not a compiled forest"),
        (lambda d: struct.pack_into("<I", d, 8, 99), "format 99"),
        (lambda d: d.__delitem__(slice(-5, None)), "not the size its header gives"),
        (lambda d: d.extend(b"\0" * 8), "not the size its header gives"),
        (lambda d: d.__setitem__(slice(32, 64), b"\0" * 32), "compiled from another model.txt"),
        (lambda d: d.__setitem__(slice(72, 78), b"value "), "forest.bin's features are not"),
        (lambda d: struct.pack_into("<I", d, 12, 13), "14 feature names for 13 features"),
    ],
)
def test_a_malformed_forest_bin_is_refused(
    trained: tuple[Registry, str], tmp_path: Path, change: Any, match: str
) -> None:
    registry, path = _copy(*trained, tmp_path)
    _edit_forest(path, change)
    _refused(registry, trained[1], match)


def test_a_forest_bin_whose_trees_do_not_hold_together_is_refused(
    trained: tuple[Registry, str], tmp_path: Path
) -> None:
    registry, path = _copy(*trained, tmp_path)

    def cycle(data: bytearray) -> None:
        n_nodes, names_len = struct.unpack_from("<I", data, 20)[0], struct.unpack_from("<I", data, 64)[0]
        left = 72 + (names_len + 7) // 8 * 8 + 20 * n_nodes  # after thresholds, values, features
        struct.pack_into("<i", data, left, 0)  # the first root is its own left child

    _edit_forest(path, cycle)
    _refused(registry, trained[1], "forest.bin: node 0: children must lie after it")


def test_model_txt_replaced_beside_its_forest_bin_is_refused(
    trained: tuple[Registry, str], tmp_path: Path
) -> None:
    """A model.txt (with its checksum) that is not the one forest.bin was compiled from."""
    registry, path = _copy(*trained, tmp_path)
    text = (path / MODEL_FILE).read_text()
    _set_file(path, MODEL_FILE, text.replace("feature_names=amount ", "feature_names=value ", 1).encode())
    _refused(registry, trained[1], "compiled from another model.txt")


def test_a_running_instance_swaps_to_a_version_with_and_without_forest_bin(
    trained: tuple[Registry, str], tmp_path: Path
) -> None:
    registry, version = trained
    copy, path = _copy(registry, version, tmp_path)
    text_only = version + "_text"
    path.rename(path.with_name(text_only))
    meta = json.loads((path.with_name(text_only) / "meta.json").read_text())
    (path.with_name(text_only) / "meta.json").write_text(json.dumps({**meta, "version": text_only}))
    _without_forest(path.with_name(text_only))
    shutil.copytree(registry.version_dir(version), path)
    write_json_atomic(tmp_path / POINTER, {"production": version, "history": []})
    live = LiveModels(copy)
    live.refresh()
    row = random_queries(1, seed=7)[0]
    first = live.current.production
    assert first is not None
    score = first.scorer.score(row)
    write_json_atomic(tmp_path / POINTER, {"production": text_only, "history": [version]})
    assert live.refresh()["result"] == "swapped"
    second = live.current.production
    assert second is not None and second.version == text_only
    assert second.scorer.score(row) == score
