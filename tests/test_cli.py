"""The command line as a user runs it: help everywhere, clear errors, the offline commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import DEV_DATA, ROOT

COMMANDS = [
    [],
    ["index"],
    ["index", "build"],
    ["index", "info"],
    ["serve"],
    ["score"],
    ["eval"],
    ["loadtest"],
]


def fraudscore(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "fraudscore.cli", *args],
        input=stdin,
        capture_output=True,
        cwd=ROOT,
        timeout=300,
    )


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "fraudscore")
def test_every_command_has_help(command: list[str]) -> None:
    result = fraudscore(*command, "--help")
    assert result.returncode == 0
    assert b"usage: fraudscore" in result.stdout


def test_eval_dev_data_all_match(index_path: Path) -> None:
    if not DEV_DATA.exists():
        pytest.skip(f"no dev data at {DEV_DATA}")
    result = fraudscore("eval", "--index", str(index_path), str(DEV_DATA))
    summary = json.loads(result.stdout)
    assert result.returncode == 0, result.stderr
    assert summary["total"] == 20000
    assert summary["score_differs"] == 0
    assert summary["fp"] == summary["fn"] == 0
    assert summary["references_match"] is True


def test_eval_reports_what_differs(index_path: Path, tmp_path: Path) -> None:
    payloads = json.loads((ROOT / "data" / "example-payloads.json").read_text())
    entries = [{"request": p, "expected_approved": False, "expected_fraud_score": 1.0} for p in payloads[:5]]
    (tmp_path / "t.json").write_text(json.dumps({"stats": {}, "entries": entries}))
    result = fraudscore("eval", "--index", str(index_path), str(tmp_path / "t.json"))
    summary = json.loads(result.stdout)
    assert result.returncode == 1
    assert summary["score_differs"] == len(summary["differing"]) > 0
    assert summary["differing"][0]["id"] == payloads[0]["id"]


def test_score_one_line_per_payload(index_path: Path) -> None:
    payloads = json.loads((ROOT / "data" / "example-payloads.json").read_text())
    bad = {"id": "broken", "transaction": 1}
    stdin = json.dumps([*payloads, bad]).encode()
    result = fraudscore("score", "--index", str(index_path), "-", stdin=stdin)
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == len(payloads) + 1
    assert lines[0] == {"id": "tx-1329056812", "approved": True, "fraud_score": 0.0}
    assert lines[-1] == {"id": "broken", "error": "transaction must be an object"}
    assert result.returncode == 1
    assert b"1 of 51 payloads could not be scored" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["eval", "/nonexistent.json"], b"cannot read /nonexistent.json"),
        (["index", "info", "--index", "/nonexistent.fsidx"], b"cannot map index"),
        (["index", "build", "--references", "/nonexistent.json.gz", "--out", "/tmp/x.fsidx"], b"cannot open"),
        (["serve", "--index", "/nonexistent.fsidx", "--references", "/nonexistent"], b"no index at"),
    ],
)
def test_errors_are_one_clear_line(args: list[str], message: bytes) -> None:
    result = fraudscore(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert b"Traceback" not in result.stderr


def test_index_info(index_path: Path) -> None:
    info = json.loads(fraudscore("index", "info", "--index", str(index_path)).stdout)
    assert info["references"] == 3_000_000
    assert info["kernel"] in ("avx2", "scalar")
