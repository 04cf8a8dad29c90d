"""`fraudscore model …` as a user runs it: real subprocesses, a registry of their own."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fraudscore.errors import DataFileError, exit_code
from tests.models_support import INDEX, ROOT, small_references

ACTIONS = ["train", "list", "show", "promote", "rollback", "add-knn", "explain"]


def run(
    *args: str, registry: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "fraudscore.cli", "model", *args]
    if registry is not None:
        argv += ["--registry", str(registry)]
    return subprocess.run(
        argv, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})}, timeout=300
    )


def one_line_error(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    assert 0 < proc.returncode < 128, proc
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for word in words:
        assert word in lines[0]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("registry")


@pytest.fixture(scope="module")
def version(registry: Path, index_path: Path) -> str:
    proc = run(
        "train",
        "--references",
        str(small_references()),
        "--rounds",
        "20",
        "--threads",
        "1",
        "--index",
        str(index_path),
        "--json",
        registry=registry,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["auc"] > 0.99 and 0 < result["threshold"] < 1 and result["trees"] <= 20
    assert result["knn_agreement"] is not None
    return str(result["version"])


@pytest.mark.parametrize("action", ["", *ACTIONS])
def test_every_action_has_help(action: str) -> None:
    proc = run(*filter(None, [action]), "--help")
    assert proc.returncode == 0 and f"usage: fraudscore model {action}".strip() in proc.stdout


def test_list_show_promote_rollback(registry: Path, version: str) -> None:
    listed = json.loads(run("list", "--json", registry=registry).stdout)
    assert [v["version"] for v in listed] == [version]
    assert json.loads(run("show", version, "--json", registry=registry).stdout)["threshold"] > 0
    knn = json.loads(run("add-knn", "--index", str(INDEX), "--json", registry=registry).stdout)["version"]
    assert knn.startswith("knn-")
    assert run("promote", version, registry=registry).returncode == 0
    pointer = json.loads(run("promote", knn, "--json", registry=registry).stdout)
    assert pointer["production"] == knn and pointer["history"] == [version]
    text = run("list", registry=registry).stdout
    assert f"* {knn}" in text and f"  {version}" in text
    assert json.loads(run("rollback", "--json", registry=registry).stdout)["production"] == version
    one_line_error(run("rollback", registry=registry), "no earlier production version")


def test_the_registry_comes_from_the_environment(registry: Path, version: str) -> None:
    listed = json.loads(run("list", "--json", env={"FRAUDSCORE_REGISTRY": str(registry)}).stdout)
    assert version in [v["version"] for v in listed]


def test_explain(registry: Path, version: str, tmp_path: Path) -> None:
    payloads: list[Any] = json.loads((ROOT / "data" / "example-payloads.json").read_text())
    src = tmp_path / "payloads.jsonl"
    src.write_text("\n".join(json.dumps(p) for p in payloads) + "\n")
    proc = run("explain", str(src), "--version", version, "--top", "4", registry=registry)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["id"] for line in lines] == [p.get("id") for p in payloads]
    for line in lines:
        assert set(line) == {"id", "approved", "probability", "reasons"}
        assert len(line["reasons"]) == 4
        assert {"feature", "value", "contribution"} == set(line["reasons"][0])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([payloads[0], {"id": "tx-bad", "transaction": {}}]))
    proc = run("explain", str(bad), "--version", version, registry=registry)
    assert proc.returncode == exit_code(DataFileError("")), proc.stderr  # after the good ones
    assert "bad.json: 1 of 2 payloads could not be scored (the first, at [1]" in proc.stderr
    assert json.loads(proc.stdout.splitlines()[0])["id"] == payloads[0]["id"]
    assert json.loads(proc.stdout.splitlines()[1]) == {
        "id": "tx-bad",
        "at": "[1]",
        "error": "customer must be an object",
    }


def test_one_line_errors(registry: Path, version: str, tmp_path: Path) -> None:
    one_line_error(run("show", "gbt-nope", registry=registry), "no version gbt-nope")
    one_line_error(run("promote", "../x", registry=registry), "not a version name")
    one_line_error(
        run("train", "--references", str(tmp_path / "none.json.gz"), registry=registry), "--references"
    )
    one_line_error(run("train", "--name", "Bad Name", registry=registry), "--name")
    one_line_error(
        run("explain", "data/example-payloads.json", registry=tmp_path / "empty"), "no version in production"
    )
    one_line_error(
        run("explain", "data/example-payloads.json", "--version", version, "--top", "0", registry=registry),
        "--top",
    )
    # a damaged version is refused by promote, with the reason
    damaged = tmp_path / "damaged"
    (damaged / "versions").mkdir(parents=True)
    shutil.copytree(registry / "versions" / version, damaged / "versions" / version)
    model = damaged / "versions" / version / "model.txt"
    model.chmod(0o600)
    model.write_text(model.read_text().replace("Tree=1", "Tree=7"))
    one_line_error(run("promote", version, registry=damaged), version, "checksum")
