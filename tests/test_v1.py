"""POST /v1/score through a real socket: a real server with ``--registry`` on a temporary registry
holding the small test model, promoted with the real CLI.

The kNN part must be the contract's answer exactly, the model's probability LightGBM's own to
1e-6, the reasons the model's largest attributions; ``decided_by`` follows ``model promote``.
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightgbm
import numpy as np
import orjson
import pytest

from fraudscore.contract.vectorize import DEFAULT_CONSTANTS, FEATURES, vectorize
from fraudscore.loadtest import command as loadtest
from fraudscore.models.registry import MODEL_FILE, Registry, knn_version
from fraudscore.models.scorer import ModelScorer
from fraudscore.scorer import KnnScorer
from fraudscore.service import responses, v1
from fraudscore.service.memory import memory_connection
from fraudscore.service.state import ServiceConfig, ServiceState
from fraudscore.service.v1 import REASONS

from .conftest import Server, free_port
from .models_support import small_model

CHECKED_PAYLOADS = 2000  # bench/v1_check.py checks all 20,000
TOLERANCE = 1e-6
SERVE = [sys.executable, "-m", "fraudscore.cli", "serve", "--host", "127.0.0.1"]


def fraudscore(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fraudscore.cli", *args], capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, index_path: Path) -> tuple[Path, str]:
    """A registry of its own (promotions here touch no other test's) with the small model in
    production, promoted by the CLI; (its path, the model's version)."""
    source, report = small_model()
    path = tmp_path_factory.mktemp("v1") / "registry"
    shutil.copytree(source.root, path)
    done = fraudscore("model", "promote", report.version, "--registry", str(path))
    assert done.returncode == 0, done.stderr
    return path, report.version


@pytest.fixture(scope="module")
def server(registry: tuple[Path, str], index_path: Path) -> Iterator[Server]:
    srv = Server(index_path, "--registry", str(registry[0]), "--request-timeout", "1")
    yield srv
    code, log = srv.stop()
    assert code == 0 and "Traceback" not in log, log


def post(port: int, body: bytes, path: str = "/v1/score") -> tuple[int, Any]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    c.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    r = c.getresponse()
    data = r.read()
    c.close()
    assert r.getheader("Content-Type") == "application/json"
    return r.status, json.loads(data)


def score_all(port: int, bodies: list[bytes]) -> list[Any]:
    """Each body's /v1/score answer, over one keep-alive connection."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    answers = []
    for body in bodies:
        c.request("POST", "/v1/score", body=body)
        r = c.getresponse()
        assert r.status == 200
        answers.append(json.loads(r.read()))
    c.close()
    return answers


def check_reasons(answer: dict[str, Any], vector: list[float], contributions: list[float]) -> None:
    """The answer's reasons are the REASONS largest |contributions| of the model, largest first."""
    reasons = answer["reasons"]
    assert len(reasons) == REASONS
    magnitudes = [abs(r["contribution"]) for r in reasons]
    assert magnitudes == sorted(magnitudes, reverse=True)
    named = [FEATURES.index(r["feature"]) for r in reasons]
    for r, i in zip(reasons, named, strict=True):
        assert r["value"] == vector[i]
        assert r["contribution"] == contributions[i]
    left_out = [abs(c) for i, c in enumerate(contributions) if i not in named]
    assert max(left_out) <= magnitudes[-1]


def test_the_model_decides_beside_the_exact_knn(
    server: Server, registry: tuple[Path, str], dev_entries: list[dict[str, Any]]
) -> None:
    path, version = registry
    entries = dev_entries[:CHECKED_PAYLOADS]
    answers = score_all(server.port, [orjson.dumps(e["request"]) for e in entries])
    vectors = [vectorize(e["request"]) for e in entries]
    booster = lightgbm.Booster(model_file=str(path / "versions" / version / MODEL_FILE))
    expected_probability = booster.predict(np.array(vectors))
    model = ModelScorer.from_registry(Registry(path), version)
    for entry, vector, answer, probability in zip(
        entries, vectors, answers, expected_probability, strict=True
    ):
        assert answer["knn"] == {
            "approved": entry["expected_approved"],
            "fraud_score": entry["expected_fraud_score"],
        }
        assert answer["model"]["name"] == "gbt" and answer["model"]["version"] == version
        assert abs(answer["model"]["probability"] - probability) <= TOLERANCE
        assert answer["decided_by"] == {"name": "gbt", "version": version, "arm": "production"}
        assert answer["fraud_score"] == answer["model"]["probability"]
        assert answer["approved"] == (answer["fraud_score"] < model.threshold)
        check_reasons(answer, vector, model.explain(vector)[1])
    # the model and the kNN disagree somewhere, or deciding by one or the other could not be told apart
    assert any(a["approved"] != a["knn"]["approved"] for a in answers)


def test_fraud_score_stays_the_contracts_answer(server: Server, dev_entries: list[dict[str, Any]]) -> None:
    for entry in dev_entries[:200]:
        status, answer = post(server.port, orjson.dumps(entry["request"]), "/fraud-score")
        assert status == 200
        assert answer == {
            "approved": entry["expected_approved"],
            "fraud_score": entry["expected_fraud_score"],
        }


def test_decided_by_follows_promote_and_rollback(
    registry: tuple[Path, str], index_path: Path, dev_entries: list[dict[str, Any]], tmp_path: Path
) -> None:
    path, version = registry
    own = tmp_path / "registry"  # promotions here leave the module's registry as it was
    shutil.copytree(path, own)
    added = fraudscore("model", "add-knn", "--index", str(index_path), "--registry", str(own))
    assert added.returncode == 0, added.stderr
    knn = added.stdout.strip()
    assert knn.startswith("knn-")
    assert fraudscore("model", "promote", knn, "--registry", str(own)).returncode == 0
    entries = dev_entries[:300]
    bodies = [orjson.dumps(e["request"]) for e in entries]

    srv = Server(index_path, "--registry", str(own))  # a restart: the production version is read at start
    try:
        answers = score_all(srv.port, bodies)
    finally:
        srv.stop()
    for entry, answer in zip(entries, answers, strict=True):
        assert answer["decided_by"] == {"name": "knn", "version": knn, "arm": "production"}
        expected = {"approved": entry["expected_approved"], "fraud_score": entry["expected_fraud_score"]}
        assert answer["knn"] == expected
        assert {"approved": answer["approved"], "fraud_score": answer["fraud_score"]} == expected
        assert answer["model"]["version"] == version and len(answer["reasons"]) == REASONS

    assert fraudscore("model", "rollback", "--registry", str(own)).returncode == 0
    srv = Server(index_path, "--registry", str(own))
    try:
        answer = score_all(srv.port, bodies[:1])[0]
    finally:
        srv.stop()
    assert answer["decided_by"] == {"name": "gbt", "version": version, "arm": "production"}


def test_without_a_model_the_knn_decides_alone(
    index_path: Path, dev_entries: list[dict[str, Any]], tmp_path: Path
) -> None:
    empty = tmp_path / "registry"
    empty.mkdir()
    srv = Server(index_path, "--registry", str(empty))
    try:
        answers = score_all(srv.port, [orjson.dumps(e["request"]) for e in dev_entries[:50]])
    finally:
        srv.stop()
    for entry, answer in zip(dev_entries, answers, strict=False):
        expected = {"approved": entry["expected_approved"], "fraud_score": entry["expected_fraud_score"]}
        assert answer == {
            **expected,
            "decided_by": {"name": "knn", "version": answer["decided_by"]["version"], "arm": "production"},
            "knn": expected,
            "model": None,
            "reasons": [],
        }
        assert answer["decided_by"]["version"].startswith("knn-")


# -- bad input -------------------------------------------------------------------------------------


def _valid() -> dict[str, Any]:
    payloads: list[dict[str, Any]] = json.loads(
        (Path(__file__).parent.parent / "data/example-payloads.json").read_text()
    )
    return payloads[0]


def _with(path: str, value: Any) -> bytes:
    payload = _valid()
    *parents, last = path.split(".")
    node = payload
    for key in parents:
        node = node[key]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return json.dumps(payload).encode()


BAD_BODIES = [
    b"",
    b"{",
    b"not json",
    b"[]",
    b"NaN",
    b"\xff\xfe",
    _with("transaction.amount", "12.0"),
    _with("transaction.amount", -1),
    _with("transaction", KeyError),
    _with("transaction.requested_at", "yesterday"),
    _with("terminal.is_online", "yes"),
    _with("customer.known_merchants", None),
    _with("customer", 7),
]


@pytest.mark.parametrize("body", BAD_BODIES, ids=range(len(BAD_BODIES)))
def test_bad_input_gets_the_same_400_as_fraud_score(server: Server, body: bytes) -> None:
    v1 = post(server.port, body)
    contract = post(server.port, body, "/fraud-score")
    assert v1[0] == 400 and isinstance(v1[1]["error"], str)
    assert v1 == contract


@pytest.mark.parametrize("value", [123, None, True, [], {}, ""], ids=repr)
def test_customer_id_of_the_wrong_type(server: Server, value: Any) -> None:
    status, answer = post(server.port, _with("customer.id", value))
    assert status == 400
    assert "customer.id" in answer["error"]


def test_customer_id_accepted(server: Server) -> None:
    with_id = post(server.port, _with("customer.id", "cust-42"))
    without = post(server.port, json.dumps(_valid()).encode())
    assert with_id[0] == 200 and with_id == without


def test_methods_and_readiness(server: Server) -> None:
    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    c.request("GET", "/v1/score")
    r = c.getresponse()
    assert r.status == 405 and r.getheader("Allow") == "POST"
    assert json.loads(r.read()) == {"error": "use POST for /v1/score"}
    c.close()


def test_ready_only_once_the_models_are_loaded(registry: tuple[Path, str], index_path: Path) -> None:
    srv = Server(index_path, "--registry", str(registry[0]))
    code, log = srv.stop()
    assert code == 0, log
    loaded = log.index("/v1/score: ")
    assert f"model {registry[1]}" in log[loaded:]
    assert loaded < log.index("ready in"), log


def test_v1_score_waits_while_warming(index_path: Path) -> None:
    config = ServiceConfig(index_path=index_path, port=9999)  # never listens
    with KnnScorer.open(index_path) as knn:
        state = ServiceState(config=config, scorer=knn, constants=DEFAULT_CONSTANTS)
        conn, transport = memory_connection(state, eof=False)  # an error answer closes at once
        request = b"POST /v1/score HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s"
        body = json.dumps(_valid()).encode()
        conn.data_received(request % (len(body), body))
        assert transport.output() == responses.WARMING
        state.ready = True  # the index is warm, the models not yet loaded
        conn.data_received(request % (len(body), body))
        assert transport.writes[-1] == responses.WARMING
        state.v1 = v1.load(None, knn)
        conn.data_received(request % (len(body), body))
        assert orjson.loads(bytes(transport.writes[-1]).split(b"\r\n\r\n", 1)[1])["model"] is None


def test_ok_is_a_200_response() -> None:
    document = {"approved": True, "fraud_score": 0.2, "reasons": [{"feature": "amount"}]}
    assert responses.ok(orjson.dumps(document)) == responses.response(200, document)


# -- start-up refusals -------------------------------------------------------------------------------


def test_a_missing_registry_is_refused(index_path: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    for argv in (["serve", "--registry", str(missing)], ["stack", "--registry", str(missing)]):
        done = fraudscore(*argv, "--index", str(index_path), "--port", "1")
        assert done.returncode == 2
        assert done.stderr.strip() == f"fraudscore {argv[0]}: --registry {missing}: no such directory"


def test_the_registry_from_the_environment(
    registry: tuple[Path, str], index_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, version = registry
    missing = tmp_path / "nowhere"
    monkeypatch.setenv("FRAUDSCORE_REGISTRY", str(missing))
    done = fraudscore("serve", "--index", str(index_path), "--port", "1")
    assert done.returncode == 2
    assert done.stderr.strip() == f"fraudscore serve: FRAUDSCORE_REGISTRY={missing}: no such directory"
    monkeypatch.setenv("FRAUDSCORE_REGISTRY", str(path))
    srv = Server(index_path)  # no --registry: the variable names it
    try:
        answer = post(srv.port, json.dumps(_valid()).encode())[1]
    finally:
        srv.stop()
    assert answer["decided_by"] == {"name": "gbt", "version": version, "arm": "production"}


def test_the_knn_of_another_index_is_refused(
    registry: tuple[Path, str], index_path: Path, tmp_path: Path
) -> None:
    own = tmp_path / "registry"
    shutil.copytree(registry[0], own)
    other = "0" * 64
    version = knn_version(other)
    (own / "versions" / version).mkdir()
    meta = {"version": version, "kind": "knn", "name": "knn", "index": "/elsewhere.fsidx", "checksum": other}
    (own / "versions" / version / "meta.json").write_text(json.dumps(meta))
    (own / "production.json").write_text(json.dumps({"production": version, "history": []}))
    done = subprocess.run(
        [*SERVE, "--index", str(index_path), "--registry", str(own), "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("fraudscore serve: ") and version in last and "/elsewhere.fsidx" in last
    assert "Traceback" not in done.stderr


def test_the_stack_passes_the_registry_on(registry: tuple[Path, str], index_path: Path) -> None:
    from .test_stack import Stack

    stack = Stack(index_path, "--registry", str(registry[0]), "--no-limits")
    try:
        # one connection per request: the balancer hands them round-robin to both instances
        answers = [post(stack.port, json.dumps(_valid()).encode())[1] for _ in range(4)]
    finally:
        stack.kill()
    assert [a["decided_by"] for a in answers] == [
        {"name": "gbt", "version": registry[1], "arm": "production"}
    ] * 4


# -- the load test against /v1/score -------------------------------------------------------------------


def run_loadtest(url: str, entries: list[dict[str, Any]], tmp_path: Path) -> dict[str, Any]:
    """`fraudscore loadtest --path /v1/score` (real k6) with these entries, each sent once."""
    from .test_loadtest import _k6_or_skip

    _k6_or_skip()
    data = tmp_path / "data.json.gz"
    with gzip.open(data, "wt") as f:
        json.dump({"stats": {}, "entries": entries}, f)
    parser = argparse.ArgumentParser()
    loadtest.add_arguments(parser)
    out = tmp_path / "out"
    argv = ["--url", url, "--path", "/v1/score", "--data", str(data), "--rate-multiplier", "0.1"]
    assert loadtest.run(parser.parse_args([*argv, "--duration", "3", "--out", str(out), "--no-chart"])) == 0
    result: dict[str, Any] = json.loads((out / "result.json").read_text())
    assert result["path"] == "/v1/score" and result["requests"] == len(entries)
    assert result["counts"]["http_errors"] == 0
    return result


def test_loadtest_drives_v1_score(server: Server, dev_entries: list[dict[str, Any]], tmp_path: Path) -> None:
    result = run_loadtest(server.url, dev_entries[:50], tmp_path)
    # the model decides here: its fraud_score is a probability, not the kNN's share of five
    assert result["fraud_score_mismatches"] > 0


def test_loadtest_counts_stay_exact_with_the_knn_deciding(
    registry: tuple[Path, str], index_path: Path, dev_entries: list[dict[str, Any]], tmp_path: Path
) -> None:
    own = tmp_path / "registry"
    shutil.copytree(registry[0], own)
    knn = fraudscore("model", "add-knn", "--index", str(index_path), "--registry", str(own)).stdout.strip()
    assert fraudscore("model", "promote", knn, "--registry", str(own)).returncode == 0
    srv = Server(index_path, "--registry", str(own))
    try:
        result = run_loadtest(srv.url, dev_entries[:50], tmp_path)
    finally:
        srv.stop()
    assert result["fraud_score_mismatches"] == 0
    assert result["counts"]["fp"] == 0 and result["counts"]["fn"] == 0
