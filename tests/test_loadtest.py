"""`fraudscore loadtest`: the contest's score, the k6 profile, and real k6 runs against a stand-in service."""

from __future__ import annotations

import argparse
import gzip
import json
import math
import re
import socket
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from fraudscore import cli
from fraudscore.contract.testdata import Entry
from fraudscore.errors import (
    ConfigError,
    DataFileError,
    FraudscoreError,
    LoadTestError,
    TransientError,
    exit_code,
)
from fraudscore.loadtest import command as loadtest
from fraudscore.loadtest import driver, k6, profile, results
from fraudscore.loadtest.contest import Counts, detection_score, final_score, p99_score

from .conftest import DEV_DATA

# --- the contest's score -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("p99_ms", "counts", "expected"),
    [
        (1.0, Counts(tp=2000, tn=3000, fp=0, fn=0, http_errors=0), 6000.00),
        (3.0, Counts(tp=2000, tn=2990, fp=5, fn=5, http_errors=0), 4524.15),
        (10.0, Counts(tp=2000, tn=2200, fp=500, fn=300, http_errors=0), -1000.00),
    ],
    ids=["p99-1ms-no-error", "p99-3ms-5fp-5fn", "p99-10ms-500fp-300fn"],
)
def test_published_examples(p99_ms: float, counts: Counts, expected: float) -> None:
    assert counts.requests == 5000
    assert round(final_score(p99_ms, counts), 2) == expected


def test_p99_past_two_seconds_fails() -> None:
    assert p99_score(2000.0) == pytest.approx(1000 * math.log10(0.5))
    assert p99_score(2000.001) == -3000.0


def test_p99_below_one_millisecond_counts_as_one() -> None:
    assert p99_score(0.01) == p99_score(1.0) == 3000.0


def test_error_share_past_fifteen_percent_fails() -> None:
    at_limit = Counts(tp=0, tn=85, fp=5, fn=5, http_errors=5)  # 15 % exactly: still scored
    assert detection_score(at_limit) > -3000.0
    assert detection_score(Counts(tp=0, tn=84, fp=0, fn=0, http_errors=16)) == -3000.0


def test_no_error_scores_full_detection() -> None:
    assert detection_score(Counts(tp=1, tn=0, fp=0, fn=0, http_errors=0)) == 3000.0


def test_weights() -> None:
    counts = Counts(tp=994, tn=0, fp=1, fn=2, http_errors=3)  # N = 1000, E = 22
    assert counts.weighted_errors == 1 + 6 + 15
    assert detection_score(counts) == pytest.approx(1000 * math.log10(1000 / 22) - 300 * math.log10(23))


def test_no_request_is_an_error() -> None:
    with pytest.raises(ValueError, match="no request"):
        detection_score(Counts(tp=0, tn=0, fp=0, fn=0, http_errors=0))


# --- the k6 profile: Python owns it, the script only reads it ---------------------------------------


def test_the_contract_profile_in_k6_terms() -> None:
    scenario = profile.Profile().k6_scenario()
    assert scenario["executor"] == "ramping-arrival-rate"
    assert (scenario["startRate"], scenario["timeUnit"]) == (1, "1s")
    assert scenario["stages"] == [{"target": 900, "duration": "120000ms"}]
    assert (scenario["preAllocatedVUs"], scenario["maxVUs"]) == (90, 250)


def test_a_fractional_rate_is_counted_per_1000_seconds() -> None:
    scenario = profile.Profile(rate_multiplier=0.0015, duration_s=10).k6_scenario()
    assert (scenario["startRate"], scenario["timeUnit"]) == (2, "1000s")  # 1.5 per 1000 s, half up
    assert scenario["stages"] == [{"target": 1350, "duration": "10000ms"}]
    assert scenario["preAllocatedVUs"] == 5  # never fewer


def test_the_script_repeats_nothing_of_the_profile() -> None:
    script = (Path(k6.__file__).parent / k6.SCRIPT).read_text()
    numbers = [profile.TARGET_RATE, profile.DURATION_S, profile.MAX_VUS, profile.REQUEST_TIMEOUT_MS, 9999]
    assert [n for n in numbers if re.search(rf"\b{n:g}\b", script)] == []
    # the scenario's settings are written in profile.py only
    keys = ("startRate", "timeUnit", "stages", "preAllocatedVUs", "maxVUs", "gracefulStop", "p(99)")
    assert [k for k in keys if k in script] == []


# --- reading data and samples -------------------------------------------------------------------------


def test_load_entries_plain_json(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    entry = {"request": {"id": "tx-1"}, "expected_approved": False, "expected_fraud_score": 0.8}
    path.write_text(json.dumps({"stats": {}, "entries": [entry]}))
    assert driver.load_entries(path) == [Entry({"id": "tx-1"}, False, 0.8)]


@pytest.mark.parametrize(
    "doc",
    [
        [],
        {"entries": [{"request": {}}]},
        {"entries": [{"request": {}, "expected_approved": 1, "expected_fraud_score": 0}]},
    ],
)
def test_load_entries_rejects_malformed(tmp_path: Path, doc: Any) -> None:
    path = tmp_path / "data.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(DataFileError):
        driver.load_entries(path)


def test_per_second_buckets_and_gaps() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    samples = [(t0 + timedelta(seconds=s), ms) for s, ms in [(0.1, 1.0), (0.9, 3.0), (2.5, 7.0)]]
    series = results.per_second(iter(samples))
    assert [(s.t_s, s.requests, s.p50_ms) for s in series] == [(0, 2, 2.0), (1, 0, None), (2, 1, 7.0)]


# --- one real run of k6 -------------------------------------------------------------------------------


def _k6_or_skip() -> Path:
    try:
        binary = k6.find_k6(None)
        subprocess.run([str(binary), "version"], check=True, capture_output=True, timeout=30)
    except (LoadTestError, OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"k6 cannot run here: {exc}")
    return binary


class StandIn:
    """A stand-in for the service: answers each payload from the expected answers, some wrongly on purpose."""

    def __init__(self, entries: list[dict[str, Any]]) -> None:
        self.answers = {e["request"]["id"]: e for e in entries}
        approve = [e["request"]["id"] for e in entries if e["expected_approved"]]
        deny = [e["request"]["id"] for e in entries if not e["expected_approved"]]
        self.flip = set(approve[:3] + deny[:2])  # 3 FP, 2 FN
        self.status_500, self.garbage = approve[3], deny[2]  # 2 HTTP errors
        self.wrong_score = approve[4]  # right decision, wrong fraud_score: not an error
        self.seen: Counter[str] = Counter()
        self.lock = threading.Lock()

    def answer(self, payload_id: str) -> tuple[int, bytes]:
        with self.lock:
            self.seen[payload_id] += 1
        if payload_id == self.status_500:
            return 500, b'{"error": "on purpose"}'
        if payload_id == self.garbage:
            return 200, b"not json"
        expected = self.answers[payload_id]
        approved = expected["expected_approved"] != (payload_id in self.flip)
        score = 0.2 if payload_id == self.wrong_score else expected["expected_fraud_score"]
        return 200, json.dumps({"approved": approved, "fraud_score": score}).encode()


def _entries(n: int) -> list[dict[str, Any]]:
    """The first n entries of the dev data; made-up ones, alternating answers, where it is not at hand."""
    if DEV_DATA.exists():
        with gzip.open(DEV_DATA, "rt") as f:
            entries: list[dict[str, Any]] = json.load(f)["entries"][:n]
            return entries
    return [
        {"request": {"id": f"tx-{i}"}, "expected_approved": i % 2 == 0, "expected_fraud_score": 0.6 * (i % 2)}
        for i in range(n)
    ]


@pytest.fixture
def stand_in(tmp_path: Path) -> Iterator[tuple[str, Path, StandIn]]:
    entries = _entries(50)
    data = tmp_path / "data.json.gz"
    with gzip.open(data, "wt") as f:
        json.dump({"stats": {}, "entries": entries}, f)
    service = StandIn(entries)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            status, body = service.answer(payload["id"])
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", data, service
    finally:
        server.shutdown()
        server.server_close()


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    loadtest.add_arguments(parser)
    return parser.parse_args(argv)


def _run_against(stand_in: tuple[str, Path, StandIn], out: Path, *extra: str) -> dict[str, Any]:
    """`fraudscore loadtest` against the stand-in: 0.1 -> 90 req/s over 3 s starts ~135
    iterations, so all 50 entries are sent and the rest of the ramp sends nothing."""
    _k6_or_skip()
    url, data, service = stand_in
    argv = (
        "--url",
        url,
        "--data",
        str(data),
        "--rate-multiplier",
        "0.1",
        "--duration",
        "3",
        "--out",
        str(out),
    )
    assert loadtest.run(_parse(*argv, *extra)) == 0
    assert set(service.seen) == set(service.answers)
    assert set(service.seen.values()) == {1}, "each entry is sent exactly once"
    result: dict[str, Any] = json.loads((out / "result.json").read_text())
    return result


def test_k6_run_counts_every_answer(
    stand_in: tuple[str, Path, StandIn], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    result = _run_against(stand_in, out)

    entries = stand_in[2].answers.values()
    deny = sum(not e["expected_approved"] for e in entries)
    assert result["counts"] == {
        "tp": deny - 2 - 1,  # less the 2 flipped to approve and the garbage answer
        "tn": len(entries) - deny - 3 - 1,  # less the 3 flipped to deny and the 500
        "fp": 3,
        "fn": 2,
        "http_errors": 2,
    }
    assert result["requests"] == 50
    assert result["fraud_score_mismatches"] == 1
    latency = result["latency_ms"]
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
    counts = Counts(**result["counts"])
    assert result["score"]["final"] == pytest.approx(final_score(latency["p99"], counts))
    assert sum(s["requests"] for s in result["per_second"]) == 50
    assert (out / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "FP 3  FN 2  HTTP errors 2" in printed
    assert f"= {result['score']['final']:.2f}" in printed


def test_no_chart_scores_from_the_summary_alone(
    stand_in: tuple[str, Path, StandIn], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    result = _run_against(stand_in, out, "--no-chart")

    assert result["requests"] == 50
    assert result["counts"]["fp"] == 3 and result["counts"]["http_errors"] == 2
    assert result["latency_ms"]["p99"] > 0
    assert result["per_second"] == []
    assert not (out / "latency.png").exists()
    assert "latency.png" not in capsys.readouterr().out


# --- bad input: one line on stderr, non-zero exit -----------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _fails(capsys: pytest.CaptureFixture[str], error: FraudscoreError, *argv: str) -> str:
    """`fraudscore loadtest ARGV` fails with ``error``'s exit code and one line on stderr."""
    assert cli.main(["--log-level", "ERROR", "loadtest", *argv]) == exit_code(error)
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith("fraudscore loadtest: ")
    return err


def test_missing_data_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _k6_or_skip()
    argv = ("--data", str(tmp_path / "nope.json.gz"), "--out", str(tmp_path / "out"))
    assert "test data not found" in _fails(capsys, DataFileError(""), *argv)


def test_k6_not_found(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ("--k6", str(tmp_path / "no-k6"), "--out", str(tmp_path / "out"))
    assert "--k6: not found" in _fails(capsys, ConfigError(""), *argv)


def test_service_not_answering(
    stand_in: tuple[str, Path, StandIn], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _k6_or_skip()
    _, data, _ = stand_in
    url = f"http://127.0.0.1:{_free_port()}"
    argv = ("--url", url, "--data", str(data), "--out", str(tmp_path / "out"))
    assert f"does not answer at {url}" in _fails(capsys, TransientError(""), *argv)
    assert not (tmp_path / "out").exists()


def test_default_data_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FRAUDSCORE_TEST_DATA", "/somewhere/data.json")
    assert loadtest.default_data() == "/somewhere/data.json"
