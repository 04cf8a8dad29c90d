"""Training, the registry and the model scorer, on a small model trained once (models_support)."""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fraudscore.contract.costs import FN_WEIGHT, FP_WEIGHT
from fraudscore.contract.vectorize import FEATURES, vectorize
from fraudscore.errors import ModelFormatError, UsageError
from fraudscore.models.registry import FOREST_FILE, MODEL_FILE, POINTER, Registry
from fraudscore.models.scorer import ModelScorer, open_version
from fraudscore.models.train import TrainConfig, best_threshold, train
from fraudscore.scorer import KnnScorer
from tests.models_support import INDEX, SMALL_CONFIG, small_model, small_references

TINY = TrainConfig(num_boost_round=15, num_threads=1, agreement_queries=0, check_rows=30)


@pytest.fixture(scope="module")
def trained(index_path: Path) -> tuple[Registry, str]:
    """The small model (its kNN agreement needs the index: the fixture builds it if missing)."""
    registry, report = small_model()
    return registry, report.version


def _copy_version(registry: Registry, version: str, root: Path) -> tuple[Registry, str, Path]:
    """A writable copy of ``version`` in a registry of its own, to damage."""
    target = Registry(root)
    dst = root / "versions" / version
    shutil.copytree(registry.version_dir(version), dst)
    for p in dst.iterdir():
        p.chmod(stat.S_IRUSR | stat.S_IWUSR)
    return target, version, dst


def _text_only(path: Path) -> None:
    """The copied version as written before forest.bin existed: loaded by parsing model.txt."""
    (path / FOREST_FILE).unlink()
    _edit_meta(path, lambda m: m["files"].pop(FOREST_FILE))


def _edit_meta(path: Path, change: Any) -> None:
    meta = json.loads((path / "meta.json").read_text())
    change(meta)
    (path / "meta.json").write_text(json.dumps(meta))


# -- training ---------------------------------------------------------------------------------


def test_same_seed_same_model_other_seed_other_model(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    a = train(small_references(), registry, config=TINY, progress=False)
    b = train(small_references(), registry, config=TINY, progress=False)
    c = train(
        small_references(),
        registry,
        config=TrainConfig(**{**TINY.__dict__, "seed": 2}),
        progress=False,
    )
    assert a.version != b.version
    text = (a.path / MODEL_FILE).read_bytes()
    assert text == (b.path / MODEL_FILE).read_bytes()
    assert text != (c.path / MODEL_FILE).read_bytes()


def _cost(p: np.ndarray, y: np.ndarray, threshold: float) -> int:
    flagged = p >= threshold
    return int(FN_WEIGHT * np.sum(~flagged & (y == 1)) + FP_WEIGHT * np.sum(flagged & (y == 0)))


@pytest.mark.parametrize("seed", range(5))
def test_threshold_minimises_cost_like_a_brute_force_scan(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 400)
    p = np.round(np.clip(y * 0.3 + rng.random(400) * 0.7, 0, 1), 2)  # ties on purpose
    threshold, cost = best_threshold(p.astype(np.float64), y)
    scan = [*np.unique(p), 0.0, 0.5, 1.0, 1.01, *np.linspace(0, 1, 201)]
    assert cost == _cost(p, y, threshold)
    assert cost == min(_cost(p, y, t) for t in scan)


def test_threshold_on_the_trained_model(trained: tuple[Registry, str]) -> None:
    registry, version = trained
    meta = registry.meta(version)
    holdout = meta["metrics"]["holdout"]
    assert holdout["cost"] == FN_WEIGHT * holdout["fn"] + FP_WEIGHT * holdout["fp"]
    assert holdout["auc"] > 0.99
    assert 0 < meta["threshold"] < 1


def test_meta_records_what_the_issue_asks(trained: tuple[Registry, str]) -> None:
    registry, version = trained
    meta = registry.meta(version)
    assert meta["features"] == list(FEATURES)
    assert meta["training"]["seed"] == SMALL_CONFIG.seed
    assert meta["training"]["references_sha256"] and meta["libraries"]["lightgbm"]
    assert set(meta["drift"]["features"]) == set(FEATURES)
    for dist in meta["drift"]["features"].values():
        assert len(dist["shares"]) == len(dist["edges"]) + 1
        assert sum(dist["shares"]) == pytest.approx(1.0, abs=1e-4)
    assert sum(meta["drift"]["score"]["shares"]) == pytest.approx(1.0, abs=1e-4)
    assert len(meta["check_rows"]["rows"]) == SMALL_CONFIG.check_rows
    agreement = meta["metrics"]["knn_agreement"]
    assert agreement["queries"] == SMALL_CONFIG.agreement_queries
    assert 0.9 < agreement["agreement"] <= 1.0
    for key in ("auc", "log_loss", "precision", "recall"):
        assert isinstance(meta["metrics"]["holdout"][key], float)


# -- registry ---------------------------------------------------------------------------------


def test_versions_are_read_only_and_validate(trained: tuple[Registry, str]) -> None:
    registry, version = trained
    path = registry.version_dir(version)
    assert not (path / MODEL_FILE).stat().st_mode & stat.S_IWUSR
    assert registry.validate(version)["version"] == version
    assert version in registry.versions()


def test_promote_and_rollback_keep_a_history(trained: tuple[Registry, str], tmp_path: Path) -> None:
    source, version = trained
    registry, _, _ = _copy_version(source, version, tmp_path)
    knn = registry.register_knn(INDEX)
    assert registry.register_knn(INDEX) == knn  # once per index
    assert registry.production() is None
    registry.promote(version)
    registry.promote(knn)
    assert (registry.production(), registry.history()) == (knn, [version])
    assert isinstance(open_version(registry), KnnScorer)
    registry.rollback()
    assert (registry.production(), registry.history()) == (version, [])
    assert isinstance(open_version(registry), ModelScorer)
    with pytest.raises(UsageError, match="no earlier production version"):
        registry.rollback()


CRASH = """
import os, sys
from fraudscore.models.registry import Registry
def crash(*args, **kwargs):
    os._exit(9)
os.replace = crash
Registry(sys.argv[1]).promote(sys.argv[2])
"""


def test_a_promotion_that_crashes_after_the_temporary_file_leaves_the_old_pointer(
    trained: tuple[Registry, str], tmp_path: Path
) -> None:
    source, version = trained
    registry, _, _ = _copy_version(source, version, tmp_path)
    registry.promote(version)
    before = (tmp_path / POINTER).read_bytes()
    knn = registry.register_knn(INDEX)
    proc = subprocess.run([sys.executable, "-c", CRASH, str(tmp_path), knn], capture_output=True)
    assert proc.returncode == 9, proc.stderr.decode()
    leftovers = list(tmp_path.glob(f".{POINTER}.tmp-*"))
    assert leftovers and json.loads(leftovers[0].read_text())["production"] == knn  # it got that far
    assert (tmp_path / POINTER).read_bytes() == before
    assert registry.production() == version
    registry.promote(knn)  # and the registry still works
    assert registry.production() == knn


def _refused(registry: Registry, version: str, match: str) -> None:
    with pytest.raises(ModelFormatError, match=match):
        registry.validate(version)
    with pytest.raises(ModelFormatError, match=match):
        registry.promote(version)
    assert registry.production() is None
    with pytest.raises(ModelFormatError, match=match):
        ModelScorer.from_registry(registry, version)


def test_a_damaged_model_is_refused(trained: tuple[Registry, str], tmp_path: Path) -> None:
    registry, version, path = _copy_version(*trained, tmp_path)
    with open(path / MODEL_FILE, "ab") as f:
        f.write(b"\n")
    _refused(registry, version, "model.txt does not match its checksum")


def test_a_model_changed_with_its_checksum_is_refused_by_the_check_rows(
    trained: tuple[Registry, str], tmp_path: Path
) -> None:
    import hashlib

    registry, version, path = _copy_version(*trained, tmp_path)
    _text_only(path)  # forest.bin's own check: test_models_compiled.py
    text = (path / MODEL_FILE).read_text()
    start = text.index("leaf_value=") + len("leaf_value=")
    first = text[start:].split()[0]
    text = text[:start] + str(float(first) + 0.5) + text[start + len(first) :]
    (path / MODEL_FILE).write_text(text)
    digest = hashlib.sha256(text.encode()).hexdigest()
    _edit_meta(path, lambda m: m["files"].update({MODEL_FILE: digest}))
    _refused(registry, version, "check row")


def test_tampered_check_rows_are_refused(trained: tuple[Registry, str], tmp_path: Path) -> None:
    registry, version, path = _copy_version(*trained, tmp_path)

    def tamper(meta: dict[str, Any]) -> None:
        meta["check_rows"]["probabilities"][7] += 1e-3

    _edit_meta(path, tamper)
    _refused(registry, version, "check row 7")


def test_another_schema_is_refused(trained: tuple[Registry, str], tmp_path: Path) -> None:
    registry, version, path = _copy_version(*trained, tmp_path)
    _edit_meta(path, lambda m: m.update(features=list(reversed(FEATURES))))
    _refused(registry, version, "feature schema")


def test_a_model_of_other_features_is_refused(trained: tuple[Registry, str], tmp_path: Path) -> None:
    import hashlib

    registry, version, path = _copy_version(*trained, tmp_path)
    _text_only(path)
    text = (path / MODEL_FILE).read_text().replace("feature_names=amount ", "feature_names=value ", 1)
    (path / MODEL_FILE).write_text(text)
    digest = hashlib.sha256(text.encode()).hexdigest()
    _edit_meta(path, lambda m: m["files"].update({MODEL_FILE: digest}))
    _refused(registry, version, "features are not this contract")


def test_an_unknown_version_is_a_usage_error(trained: tuple[Registry, str]) -> None:
    registry, _ = trained
    with pytest.raises(UsageError, match="no version gbt-nope"):
        registry.validate("gbt-nope")
    with pytest.raises(UsageError, match="not a version name"):
        registry.validate("../escape")


def test_a_knn_version_whose_index_changed_is_refused(index_path: Path, tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    knn = registry.register_knn(INDEX)
    path = registry.version_dir(knn)
    path.joinpath("meta.json").chmod(stat.S_IRUSR | stat.S_IWUSR)
    _edit_meta(path, lambda m: m.update(checksum="0" * 64))
    with pytest.raises(ModelFormatError, match="not the one registered"):
        registry.promote(knn)


# -- the scorer -------------------------------------------------------------------------------


def test_model_scorer(trained: tuple[Registry, str], example_payloads: list[dict[str, Any]]) -> None:
    registry, version = trained
    scorer = ModelScorer.from_registry(registry, version)
    meta = registry.meta(version)
    assert scorer.threshold == meta["threshold"]
    assert (scorer.id.kind, scorer.id.name, scorer.id.version) == ("model", "gbt", version)
    for payload in example_payloads:
        vector = vectorize(payload)
        probability, contributions = scorer.explain(vector)
        assert probability == scorer.score(vector)
        assert len(contributions) == len(FEATURES)
        p, reasons = scorer.reasons(vector, top=3)
        assert p == probability and len(reasons) == 3
        sizes = [abs(float(r["contribution"])) for r in reasons]
        assert sizes == sorted(sizes, reverse=True)
        assert sizes[0] == max(abs(c) for c in contributions)
        assert reasons[0]["value"] == vector[FEATURES.index(str(reasons[0]["feature"]))]
