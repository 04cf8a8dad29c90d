"""The native evaluator (models/_trees.c) against LightGBM itself, and its Saabas reasons
against an independent walk of LightGBM's own dump of the trees."""

from __future__ import annotations

import gzip
import json
import math
from array import array
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import pytest

from fraudscore.contract.vectorize import vectorize
from fraudscore.errors import ModelFormatError
from fraudscore.index.search import random_queries
from fraudscore.models import _trees
from fraudscore.models.registry import MODEL_FILE
from fraudscore.models.trees import load_forest, parse_model
from tests.conftest import DEV_DATA
from tests.models_support import small_model

ROWS = 10_000


@pytest.fixture(scope="module")
def model_path(index_path: Path) -> Path:
    registry, report = small_model()
    return registry.version_dir(report.version) / MODEL_FILE


@pytest.fixture(scope="module")
def rows(example_payloads: list[dict[str, Any]]) -> np.ndarray:
    """Vectors of the dev payloads (or the examples, without the dev data), then random ones: 10,000."""
    if DEV_DATA.exists():
        entries = json.loads(gzip.decompress(DEV_DATA.read_bytes()))["entries"]
        payloads = [e["request"] for e in entries[: ROWS // 2]]
    else:
        payloads = example_payloads
    vectors = [vectorize(p) for p in payloads]
    return np.array(vectors + random_queries(ROWS - len(vectors), seed=11), dtype=np.float64)


def test_native_equals_lightgbm_on_10000_rows(model_path: Path, rows: np.ndarray) -> None:
    booster = lgb.Booster(model_file=str(model_path))
    _, forest = load_forest(model_path)
    assert len(rows) == ROWS
    want = booster.predict(rows)
    batch = np.frombuffer(forest.predict_many(rows.tobytes()))
    single = np.array([forest.predict(list(r)) for r in rows])
    assert np.max(np.abs(batch - want)) <= 1e-6
    assert np.array_equal(single, batch)
    raw = np.frombuffer(forest.raw_many(rows.tobytes()))
    assert np.max(np.abs(raw - booster.predict(rows, raw_score=True))) <= 1e-9


def _saabas(trees: list[dict[str, Any]], x: np.ndarray) -> tuple[np.ndarray, float]:
    """Saabas contributions and the sum of the roots' expected values, from LightGBM's dump."""

    def expected(n: dict[str, Any]) -> tuple[float, float]:
        if "leaf_value" in n:
            return n["leaf_value"], n["leaf_count"]
        (lv, lc), (rv, rc) = expected(n["left_child"]), expected(n["right_child"])
        return (lv * lc + rv * rc) / (lc + rc), lc + rc

    contrib = np.zeros(len(x))
    bias = 0.0
    for tree in trees:
        node = tree["tree_structure"]
        value = expected(node)[0]
        bias += value
        while "leaf_value" not in node:
            feature = node["split_feature"]
            node = node["left_child"] if x[feature] <= node["threshold"] else node["right_child"]
            child_value = expected(node)[0]
            contrib[feature] += child_value - value
            value = child_value
    return contrib, bias


def test_saabas_reasons_match_an_independent_walk_and_add_up(model_path: Path, rows: np.ndarray) -> None:
    booster = lgb.Booster(model_file=str(model_path))
    _, forest = load_forest(model_path)
    trees = booster.dump_model()["tree_info"]
    sample = rows[::100]
    raw = booster.predict(sample, raw_score=True)
    for x, want_raw in zip(sample, raw, strict=True):
        probability, contributions = forest.explain(list(x))
        want, bias = _saabas(trees, x)
        assert probability == forest.predict(list(x))
        assert forest.bias == pytest.approx(bias, abs=1e-9)
        assert np.allclose(contributions, want, rtol=0, atol=1e-9)
        # the contributions add up to the raw score minus the roots' expected values
        assert math.fsum(contributions) == pytest.approx(want_raw - bias, abs=1e-9)


def _missing_model(tmp_path: Path, **params: Any) -> Path:
    """A small model trained on data with NaN and zeros, so its splits carry missing-value rules."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3000, 4))
    x[rng.random(x.shape) < 0.2] = np.nan
    x[rng.random(x.shape) < 0.2] = 0.0
    y = ((np.nan_to_num(x[:, 0], nan=1.5) + np.nan_to_num(x[:, 1], nan=-1) * 0.5) > 0.3).astype(int)
    base = {"objective": "binary", "num_leaves": 15, "verbosity": -1, "min_data_in_leaf": 5, "seed": 1}
    booster = lgb.train({**base, **params}, lgb.Dataset(x, label=y), num_boost_round=25)
    path = tmp_path / "model.txt"
    booster.save_model(str(path))
    return path


@pytest.mark.parametrize(
    "params", [{}, {"zero_as_missing": True}, {"use_missing": False}], ids=["nan", "zero", "none"]
)
def test_missing_values_follow_lightgbm(tmp_path: Path, params: dict[str, Any]) -> None:
    path = _missing_model(tmp_path, **params)
    text = path.read_text()
    decision_types = {
        int(d)
        for line in text.splitlines()
        if line.startswith("decision_type=")
        for d in line.split("=")[1].split()
    }
    expected_types = {"nan": {8, 10}, "zero": {4, 6}, "none": {0, 2}}
    key = "zero" if params.get("zero_as_missing") else "none" if params.get("use_missing") is False else "nan"
    assert decision_types & expected_types[key]  # the rule under test is really in the model
    booster = lgb.Booster(model_file=str(path))
    _, forest = load_forest(path, allow_nan=True)
    rng = np.random.default_rng(6)
    x = rng.normal(size=(4000, 4))
    x[rng.random(x.shape) < 0.25] = np.nan
    x[rng.random(x.shape) < 0.25] = 0.0
    x[rng.random(x.shape) < 0.05] = -0.0
    x[rng.random(x.shape) < 0.05] = 1e-36  # within LightGBM's zero threshold
    got = np.frombuffer(forest.predict_many(x.tobytes()))
    assert np.max(np.abs(got - booster.predict(x))) <= 1e-12
    for row, want in zip(x[:300], got[:300], strict=True):
        assert forest.predict(list(row)) == want


def test_nan_is_a_value_error_unless_allowed(model_path: Path) -> None:
    _, forest = load_forest(model_path)
    row = [0.5] * 14
    row[3] = math.nan
    with pytest.raises(ValueError, match="feature 3 is not a finite number"):
        forest.predict(row)
    with pytest.raises(ValueError, match="row 1: feature 3"):
        forest.predict_many(array("d", [0.5] * 14 + row))
    with pytest.raises(ValueError, match="14 numbers"):
        forest.explain([0.5] * 13)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda t: t.replace("objective=binary", "objective=regression"), "not binary"),
        (lambda t: t.replace("end of trees", ""), "no 'end of trees'"),
        (lambda t: t.replace("num_cat=0", "num_cat=1", 1), "categorical"),
        (lambda t: t.replace("left_child=", "left_child=0 ", 1), "left_child has"),
        (lambda t: t.replace("max_feature_idx=13", "max_feature_idx=12"), "13 features"),
    ],
)
def test_malformed_models_are_refused(model_path: Path, edit: Any, match: str) -> None:
    with pytest.raises(ModelFormatError, match=match):
        parse_model(edit(model_path.read_text()), "x/model.txt")


def test_a_cycle_is_refused_natively(model_path: Path) -> None:
    parsed = parse_model(model_path.read_text())
    left = array("i", parsed.left)
    first_internal = next(i for i, f in enumerate(parsed.feature) if f >= 0)
    left[first_internal] = first_internal  # a node that is its own child
    with pytest.raises(ValueError, match="children must lie after it"):
        type(parsed)(**{**parsed.__dict__, "left": left}).forest()


def _stump(**change: Any) -> dict[str, Any]:
    """The arrays of one tree with one split (node 0) and two leaves (nodes 1, 2), changed."""
    arrays: dict[str, Any] = {
        "feature": array("i", [0, -1, -1]),
        "threshold": array("d", [0.5, 0.0, 0.0]),
        "decision": bytes([2, 0, 0]),
        "left": array("i", [1, 0, 0]),
        "right": array("i", [2, 0, 0]),
        "value": array("d", [0.0, -1.0, 1.0]),
        "roots": array("i", [0]),
        "n_features": 2,
        "sigmoid": 1.0,
    }
    return {**arrays, **change}


def test_a_stump() -> None:
    forest = _trees.Forest(**_stump())
    assert (forest.raw([0.5, 9.0]), forest.raw([0.6, 9.0])) == (-1.0, 1.0)  # <= goes left
    assert forest.explain([0.6, 0.0]) == (1 / (1 + math.exp(-1.0)), [1.0, 0.0])
    assert forest.bias == 0.0


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"left": array("i", [5, 0, 0])}, "children must lie after it"),
        ({"right": array("i", [0, 0, 0])}, "children must lie after it"),
        ({"right": array("i", [1, 0, 0])}, "two parents"),
        ({"feature": array("i", [2, -1, -1])}, "feature 2 of 2"),
        ({"decision": bytes([1, 0, 0])}, "categorical"),
        ({"decision": bytes([12, 0, 0])}, "missing type"),
        ({"roots": array("i", [3])}, "bad root"),
        ({"roots": array("i", [0, 0])}, "root reached twice"),
        ({"roots": array("i", [1])}, "two parents|no tree"),
        ({"value": array("d", [0.0, 1.0])}, "expected 3"),
        ({"threshold": b"\0" * 7}, "whole number"),
        ({"n_features": 0}, "n_features"),
    ],
)
def test_malformed_arrays_are_refused_natively(change: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _trees.Forest(**_stump(**change))


def test_an_uninitialised_forest_refuses_to_score() -> None:
    forest = _trees.Forest.__new__(_trees.Forest)
    with pytest.raises(ValueError, match="not initialised"):
        forest.predict([0.0, 0.0])
