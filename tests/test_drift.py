"""Drift (models/drift.py): PSI of recent requests against the training distribution in meta.json.

The acceptance runs on the contract's real dev payloads with the small test model
(tests/models_support.py) and, when data/registry holds a full-data model, with it too: the dev
payloads in their own order raise no alert; with their amounts x3 the amount-based features
alert within 5,000 requests and no other feature does.  The PSI is checked against a plain
per-value implementation (``oracle_psi``); the CLI runs as a real subprocess, its live view
against a real HTTP server in the test."""

from __future__ import annotations

import gc
import http.server
import json
import logging
import math
import os
import random
import shutil
import subprocess
import sys
import threading
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fraudscore.contract.testdata import amounts_scaled
from fraudscore.contract.vectorize import FEATURES, vectorize
from fraudscore.errors import ModelFormatError, UsageError
from fraudscore.models.drift import EPSILON, SERIES, Drift, DriftCollector, offline, psi
from fraudscore.models.registry import Registry
from fraudscore.models.scorer import ModelScorer
from tests.models_support import small_model

ROOT = Path(__file__).resolve().parent.parent
FULL_REGISTRY = ROOT / "data" / "registry"
AMOUNT_FEATURES = {"amount", "amount_vs_avg"}  # dims 0 and 2: amount / max, amount / customer avg
PROMTOOL = shutil.which("promtool")


class Clock:
    """A clock the test moves."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def tripled(payload: dict[str, Any]) -> Any:
    return amounts_scaled(payload, 3)


def full_model() -> tuple[Registry, str] | None:
    registry = Registry(FULL_REGISTRY)
    models = [v for v in registry.versions() if registry.meta(v).get("kind") == "model"]
    if not models:
        return None
    # the one trained on the most references: a registry may also hold small ones (the benches')
    return registry, max(models, key=lambda v: int(registry.meta(v)["training"]["rows"]))


@pytest.fixture(scope="module", params=["small", "full"])
def model(request: pytest.FixtureRequest) -> tuple[dict[str, Any], ModelScorer]:
    if request.param == "small":
        registry, report = small_model()
        version = report.version
    else:
        found = full_model()
        if found is None:
            pytest.skip(f"no full-data model in {FULL_REGISTRY} (fraudscore model train)")
        registry, version = found
    return registry.meta(version), ModelScorer.from_registry(registry, version)


@pytest.fixture(scope="module")
def dev_vectors(dev_entries: list[dict[str, Any]]) -> list[list[float]]:
    return [vectorize(e["request"]) for e in dev_entries]


@pytest.fixture(scope="module")
def tripled_vectors(dev_entries: list[dict[str, Any]]) -> list[list[float]]:
    return [vectorize(tripled(e["request"])) for e in dev_entries]


def first_alerts(drift: Drift, vectors: Sequence[list[float]], scores: Sequence[float]) -> dict[str, int]:
    """Each series that alerted, with the number of requests observed when it first did."""
    first: dict[str, int] = {}
    for i, (vector, score) in enumerate(zip(vectors, scores, strict=True), 1):
        drift.observe(vector, score)
        if i % 256 == 0 or i == len(vectors):
            for name in drift.snapshot()["alerts"]:
                first.setdefault(name, i)
    return first


# -- the acceptance ------------------------------------------------------------------------------


def test_dev_payloads_in_their_own_order_raise_no_alert(
    model: tuple[dict[str, Any], ModelScorer],
    dev_vectors: list[list[float]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    meta, scorer = model
    drift = Drift.for_meta(meta)
    with caplog.at_level(logging.INFO, logger="fraudscore.models.drift"):
        alerted = first_alerts(drift, dev_vectors, scorer.scores(dev_vectors))
    assert alerted == {}
    assert not [r for r in caplog.records if "drift alert" in r.getMessage()]
    snap = drift.snapshot()
    assert snap["observed"] == len(dev_vectors) == 20_000
    assert snap["windows"]["count"]["observations"] == 5000
    for name, entry in snap["series"].items():
        assert entry["psi"]["count"] is not None and entry["psi"]["count"] < 0.2, (name, entry)


def test_amounts_x3_alert_on_the_amount_features_only(
    model: tuple[dict[str, Any], ModelScorer],
    dev_vectors: list[list[float]],
    tripled_vectors: list[list[float]],
) -> None:
    meta, scorer = model
    # which dimensions the change moves: amount / max_amount and amount / customer's avg_amount
    changed = {
        FEATURES[d]
        for d in np.flatnonzero(np.any(np.array(dev_vectors) != np.array(tripled_vectors), axis=0))
    }
    assert changed == AMOUNT_FEATURES
    drift = Drift.for_meta(meta)
    alerted = first_alerts(drift, tripled_vectors, scorer.scores(tripled_vectors))
    features = {name: n for name, n in alerted.items() if name != "score"}
    assert set(features) == AMOUNT_FEATURES, alerted
    assert max(features.values()) <= 5000, alerted
    # the model's score moves with the amount, so the score's own series alerts too (not a feature)
    assert "score" in alerted


def test_amounts_x3_alert_by_themselves_within_5000_requests(
    model: tuple[dict[str, Any], ModelScorer],
    tripled_vectors: list[list[float]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No snapshot taken: the alerts the service logs on its own (checked every BATCH requests)."""
    meta, scorer = model
    drift = Drift.for_meta(meta)
    with caplog.at_level(logging.WARNING, logger="fraudscore.models.drift"):
        for vector, score in zip(tripled_vectors[:5000], scorer.scores(tripled_vectors[:5000]), strict=True):
            drift.observe(vector, score)
    alerted = {r.getMessage().split()[2] for r in caplog.records if r.getMessage().startswith("drift alert")}
    assert alerted - {"score"} == AMOUNT_FEATURES


def test_too_few_requests_say_nothing(
    model: tuple[dict[str, Any], ModelScorer], dev_vectors: list[list[float]]
) -> None:
    """256 ordinary requests can pass the threshold by chance: a window says nothing (and raises
    nothing) until it holds MIN_OBSERVATIONS requests."""
    meta, scorer = model
    scores = scorer.scores(dev_vectors)
    noisy = 0
    for start in range(0, 19_968, 256):
        chunk = slice(start, start + 256)
        eager = Drift.for_meta(meta, min_observations=1, clock=Clock(), log_alerts=False)
        careful = Drift.for_meta(meta, clock=Clock())
        for vector, score in zip(dev_vectors[chunk], scores[chunk], strict=True):
            eager.observe(vector, score)
            careful.observe(vector, score)
        noisy += bool(eager.snapshot()["alerts"])
        snap = careful.snapshot()
        assert snap["alerts"] == []
        assert all(v is None for entry in snap["series"].values() for v in entry["psi"].values())
    assert noisy > 0  # the noise the guard is for


def test_the_small_models_reference_against_the_full_ones(model: tuple[dict[str, Any], ModelScorer]) -> None:
    """The small model is trained on the first 50,000 references only.  Its reference differs from
    the full model's but not by much: the discrete features have the same edges and shares within
    PSI 0.01; the continuous ones' deciles lie within 0.01 of the full ones' (a few fall on other
    4-decimal values, and minutes_since_last_tx has one edge fewer); the score's distribution is
    another model's.  Both pass the acceptance above."""
    found = full_model()
    if found is None:
        pytest.skip(f"no full-data model in {FULL_REGISTRY}")
    registry, version = found
    small_meta, _ = model
    full = registry.meta(version)["drift"]
    small = small_meta["drift"]
    for name in FEATURES:
        s, f = small["features"][name], full["features"][name]
        if s["edges"] == f["edges"]:
            assert psi(s["shares"], f["shares"]) < 0.01, name
        else:
            assert all(min(abs(e - g) for g in f["edges"]) < 0.01 for e in s["edges"]), name
    assert psi(small["score"]["shares"], full["score"]["shares"]) < 0.2


# -- the PSI, against a straightforward implementation ---------------------------------------------


def oracle_psi(values: Sequence[float], edges: Sequence[float], shares: Sequence[float]) -> float:
    """Bin by counting the edges below each value ((-inf, e0], (e0, e1], …), then the PSI term by term."""
    counts = [0] * (len(edges) + 1)
    for v in values:
        counts[sum(1 for e in edges if v > e)] += 1
    total_reference = sum(shares)
    out = 0.0
    for count, share in zip(counts, shares, strict=True):
        p = max(count / len(values), EPSILON)
        q = max(share / total_reference, EPSILON)
        out += (p - q) * math.log(p / q)
    return out


def random_rows(meta: dict[str, Any], n: int, seed: int) -> tuple[list[list[float]], list[float]]:
    """4-decimal vectors whose values are often exactly an edge, a flag or the -1 sentinel."""
    rng = random.Random(seed)
    reference = meta["drift"]
    rows = []
    for _ in range(n):
        row = []
        for name in FEATURES:
            pool = [*reference["features"][name]["edges"], -1.0, 0.0, 1.0]
            row.append(rng.choice(pool) if rng.random() < 0.5 else round(rng.random(), 4))
        rows.append(row)
    score_edges = reference["score"]["edges"]
    scores = [rng.choice(score_edges) if rng.random() < 0.3 else rng.random() for _ in range(n)]
    return rows, scores


@pytest.mark.parametrize(("window", "n"), [(5000, 3000), (700, 3000), (1000, 1000)])
def test_psi_equals_the_oracle(window: int, n: int, dev_vectors: list[list[float]]) -> None:
    registry, report = small_model()
    meta = registry.meta(report.version)
    rows, scores = random_rows(meta, n, seed=window)
    rows[: n // 3] = dev_vectors[: n // 3]
    clock = Clock()
    drift = Drift.for_meta(meta, window=window, min_observations=1, clock=clock)
    for row, score in zip(rows, scores, strict=True):
        drift.observe(row, score)
    snap = drift.snapshot()
    last = slice(max(0, n - window), n)
    for i, name in enumerate(FEATURES):
        entry = meta["drift"]["features"][name]
        want_count = oracle_psi([r[i] for r in rows[last]], entry["edges"], entry["shares"])
        want_time = oracle_psi([r[i] for r in rows], entry["edges"], entry["shares"])
        assert snap["series"][name]["psi"]["count"] == pytest.approx(want_count, abs=2e-6), name
        assert snap["series"][name]["psi"]["time"] == pytest.approx(want_time, abs=2e-6), name
    reference = meta["drift"]["score"]
    want = oracle_psi(scores[last], reference["edges"], reference["shares"])
    assert snap["series"]["score"]["psi"]["count"] == pytest.approx(want, abs=2e-6)
    assert snap["windows"]["count"]["observations"] == min(n, window)
    assert snap["windows"]["time"]["observations"] == n


def test_psi_of_shares() -> None:
    assert psi([0.25] * 4, [0.25] * 4) == 0.0
    # an empty bin counts as EPSILON on its side: finite, and large
    assert psi([0.0, 1.0], [0.5, 0.5]) == pytest.approx(
        (EPSILON - 0.5) * math.log(EPSILON / 0.5) + 0.5 * math.log(2.0)
    )


# -- the windows ----------------------------------------------------------------------------------


def test_the_time_window_expires_old_observations(
    dev_vectors: list[list[float]], tripled_vectors: list[list[float]]
) -> None:
    registry, report = small_model()
    meta = registry.meta(report.version)
    clock = Clock(0.0)
    drift = Drift.for_meta(meta, window=5000, seconds=60.0, min_observations=200, clock=clock)
    for vector in tripled_vectors[:1000]:
        drift.observe(vector, 0.1)
    clock.now = 50.0  # still within the last 60 s
    snap = drift.snapshot()
    assert snap["windows"]["time"]["observations"] == 1000
    assert snap["series"]["amount_vs_avg"]["psi"]["time"] > 1.0
    assert "amount_vs_avg" in snap["alerts"]
    clock.now = 61.0  # their slot (0-2 s) has left the window
    snap = drift.snapshot()
    assert snap["windows"]["time"]["observations"] == 0
    assert snap["series"]["amount_vs_avg"]["psi"]["time"] is None  # too few to say
    assert snap["windows"]["count"]["observations"] == 1000  # the count window keeps them
    assert "amount_vs_avg" in snap["alerts"]  # and still alerts on them
    for vector in dev_vectors[:500]:  # slot 30: the row slot 0 had, reused
        drift.observe(vector, 0.1)
    clock.now = 70.0
    snap = drift.snapshot()
    assert snap["windows"]["time"]["observations"] == 500
    assert snap["series"]["amount_vs_avg"]["psi"]["time"] < 0.2
    assert snap["series"]["amount_vs_avg"]["psi"]["count"] > 0.2  # 1000 of its 1500 are tripled


def test_the_count_window_keeps_the_last_requests(
    dev_vectors: list[list[float]], tripled_vectors: list[list[float]]
) -> None:
    registry, report = small_model()
    meta = registry.meta(report.version)
    drift = Drift.for_meta(meta, window=1000, clock=Clock())
    for vector in tripled_vectors[:3000]:
        drift.observe(vector, 0.1)
    assert drift.snapshot()["series"]["amount"]["psi"]["count"] > 0.2
    for vector in dev_vectors[:1000]:  # exactly one window of ordinary requests
        drift.observe(vector, 0.1)
    snap = drift.snapshot()
    entry = meta["drift"]["features"]["amount"]
    want = oracle_psi([v[0] for v in dev_vectors[:1000]], entry["edges"], entry["shares"])
    assert snap["series"]["amount"]["psi"]["count"] == pytest.approx(want, abs=2e-6)


def test_an_alert_is_logged_once_per_crossing(
    model: tuple[dict[str, Any], ModelScorer],
    dev_vectors: list[list[float]],
    tripled_vectors: list[list[float]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    meta, scorer = model
    clock = Clock()
    drift = Drift.for_meta(meta, clock=clock)
    normal, drifted = scorer.scores(dev_vectors), scorer.scores(tripled_vectors)

    def messages(kind: str, name: str) -> int:
        return sum(1 for r in caplog.records if r.getMessage().startswith(f"drift {kind}: {name} of"))

    with caplog.at_level(logging.INFO, logger="fraudscore.models.drift"):
        for vector, score in zip(tripled_vectors[:8000], drifted[:8000], strict=True):
            drift.observe(vector, score)
        drift.snapshot()
        assert {n: messages("alert", n) for n in ("amount", "amount_vs_avg", "score")} == dict.fromkeys(
            ("amount", "amount_vs_avg", "score"), 1
        )
        assert all(messages("alert", n) == 0 for n in SERIES if n not in ("amount", "amount_vs_avg", "score"))
        alert_records = [r for r in caplog.records if "drift alert" in r.getMessage()]
        assert all(r.levelno == logging.WARNING for r in alert_records)
        # back to normal: the count window refills, the time window moves past the drifted requests
        clock.now += 400.0
        for vector, score in zip(dev_vectors[:8000], normal[:8000], strict=True):
            drift.observe(vector, score)
        assert drift.snapshot()["alerts"] == []
        assert messages("cleared", "amount") == 1 and messages("cleared", "amount_vs_avg") == 1
        # and drifting again is a second crossing
        clock.now += 400.0
        for vector, score in zip(tripled_vectors[8000:16000], drifted[8000:16000], strict=True):
            drift.observe(vector, score)
        assert messages("alert", "amount") == 2 and messages("cleared", "amount") == 1


def test_a_vector_of_another_shape_is_refused_and_not_counted(dev_vectors: list[list[float]]) -> None:
    registry, report = small_model()
    drift = Drift.for_meta(registry.meta(report.version), clock=Clock())
    drift.observe(dev_vectors[0], 0.5)
    for bad in (dev_vectors[0][:13], [*dev_vectors[0], 0.0], tuple(dev_vectors[0])):
        with pytest.raises(ValueError, match="14 floats"):
            drift.observe(bad, 0.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        drift.observe([*dev_vectors[0][:13], "x"], 0.5)  # type: ignore[list-item]
    snap = drift.snapshot()
    assert snap["observed"] == 1 and snap["windows"]["count"]["observations"] == 1


def test_a_dropped_drift_is_freed() -> None:
    """The native tracker calls back into its Drift (the alerts): the cycle must be collectable,
    or every model swap would leak its windows."""
    registry, report = small_model()
    drift = Drift.for_meta(registry.meta(report.version))
    ref = weakref.ref(drift)
    del drift
    gc.collect()
    assert ref() is None


def test_bad_references_and_settings_are_refused() -> None:
    registry, report = small_model()
    meta = registry.meta(report.version)
    with pytest.raises(ModelFormatError, match="no drift reference"):
        Drift.for_meta({"version": "knn-1", "kind": "knn"})
    broken = json.loads(json.dumps(meta))
    broken["drift"]["features"]["hour"]["shares"] = [0.5]
    with pytest.raises(ModelFormatError, match="hour"):
        Drift.for_meta(broken)
    with pytest.raises(UsageError, match="window"):
        Drift.for_meta(meta, window=0)
    with pytest.raises(UsageError, match="seconds"):
        Drift.for_meta(meta, seconds=0.0)


# -- Prometheus ------------------------------------------------------------------------------------


def test_the_collector_exports_the_snapshot(tripled_vectors: list[list[float]], tmp_path: Path) -> None:
    registry, report = small_model()
    meta = registry.meta(report.version)
    drift = Drift.for_meta(meta, clock=Clock())
    for vector in tripled_vectors[:1500]:
        drift.observe(vector, 0.9)
    prometheus = CollectorRegistry(auto_describe=False)
    prometheus.register(DriftCollector(lambda: [drift]))
    text = generate_latest(prometheus).decode()
    snap = drift.snapshot()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    psi_samples = {
        (s.labels["feature"], s.labels["window"]): s.value for s in families["fraudscore_drift_psi"].samples
    }
    assert len(psi_samples) == 2 * len(SERIES)
    for name, entry in snap["series"].items():
        for window in ("count", "time"):
            assert psi_samples[name, window] == pytest.approx(entry["psi"][window])
    alerts = {s.labels["feature"]: s.value for s in families["fraudscore_drift_alert"].samples}
    assert {name for name, value in alerts.items() if value == 1.0} == {"amount", "amount_vs_avg"} | (
        {"score"} if "score" in snap["alerts"] else set()
    )
    assert all(s.labels["version"] == report.version for s in families["fraudscore_drift_psi"].samples)
    observations = {s.labels["window"]: s.value for s in families["fraudscore_drift_observations"].samples}
    assert observations == {"count": 1500, "time": 1500}
    if PROMTOOL is not None:
        (tmp_path / "metrics.txt").write_text(text)
        checked = subprocess.run(
            [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_collector_leaves_out_windows_with_too_few_requests(dev_vectors: list[list[float]]) -> None:
    registry, report = small_model()
    drift = Drift.for_meta(registry.meta(report.version), clock=Clock())
    for vector in dev_vectors[:999]:
        drift.observe(vector, 0.1)
    prometheus = CollectorRegistry(auto_describe=False)
    prometheus.register(DriftCollector(lambda: [drift]))
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(prometheus).decode())}
    assert families["fraudscore_drift_psi"].samples == []
    assert len(families["fraudscore_drift_alert"].samples) == len(SERIES)


# -- the CLI ---------------------------------------------------------------------------------------


def fraudscore(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "fraudscore.cli", "model", "drift", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


@pytest.fixture(scope="module")
def payload_files(
    dev_entries: list[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("drift-payloads")
    normal, drifted = out / "normal.json", out / "tripled.json"
    normal.write_text(json.dumps([e["request"] for e in dev_entries[:3000]]))
    drifted.write_text(json.dumps([tripled(e["request"]) for e in dev_entries[:3000]]))
    return normal, drifted


def test_cli_offline_view(payload_files: tuple[Path, Path], dev_entries: list[dict[str, Any]]) -> None:
    registry, report = small_model()
    normal, drifted = payload_files
    base = ("--registry", registry.root, "--version", report.version)
    run = fraudscore(drifted, *base, "--json")
    assert run.returncode == 0, run.stderr
    snap = json.loads(run.stdout)
    assert snap["version"] == report.version and snap["observed"] == 3000
    assert set(snap["alerts"]) >= AMOUNT_FEATURES and not set(snap["alerts"]) - AMOUNT_FEATURES - {"score"}
    # the same numbers as the library's, on the same payloads
    meta = registry.meta(report.version)
    vectors = [vectorize(tripled(e["request"])) for e in dev_entries[:3000]]
    scores = ModelScorer.from_registry(registry, report.version).scores(vectors)
    assert snap == json.loads(json.dumps(offline(meta, vectors, scores)))
    run = fraudscore(normal, *base)
    assert run.returncode == 0, run.stderr
    assert f"drift of {report.version}" in run.stdout and "ALERT" not in run.stdout
    assert len([line for line in run.stdout.splitlines() if line.startswith("  ")]) == 1 + len(SERIES)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ((), "FILE or --url"),
        (("x.json", "--url", "http://127.0.0.1:1"), "FILE or --url"),
        (("--url", "127.0.0.1:9200"), "--url"),
        (("--url", "http://127.0.0.1:1"), "--url http://127.0.0.1:1/admin/drift"),
        (("missing.json", "--version", "VERSION"), "missing.json"),
    ],
)
def test_cli_errors_are_one_line(args: tuple[str, ...], needle: str, tmp_path: Path) -> None:
    registry, report = small_model()
    args = tuple(report.version if a == "VERSION" else a for a in args)
    run = fraudscore(*args, "--registry", registry.root)
    assert 0 < run.returncode < 128, run
    assert run.stderr.strip().count("\n") == 0 and needle in run.stderr, run.stderr
    assert "Traceback" not in run.stderr


def test_cli_refuses_a_knn_version(payload_files: tuple[Path, Path], tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry")
    version = registry.register_knn(ROOT / "data" / "references.fsidx")
    run = fraudscore(payload_files[0], "--registry", registry.root, "--version", version)
    assert run.returncode != 0 and "not a model version" in run.stderr and run.stderr.count("\n") == 1


class _Admin(http.server.BaseHTTPRequestHandler):
    """A stand-in admin listener: ``routes`` maps a path to its JSON body (others: 404)."""

    routes: ClassVar[dict[str, Any]] = {}

    def do_GET(self) -> None:
        body = json.dumps(self.routes[self.path]).encode() if self.path in self.routes else b'{"error": "no"}'
        self.send_response(200 if self.path in self.routes else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def admin_server() -> Iterator[tuple[str, type[_Admin]]]:
    handler = type("Admin", (_Admin,), {"routes": {}})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("route", ["/admin/drift", "/admin/status"])
def test_cli_live_view(
    route: str, admin_server: tuple[str, type[_Admin]], tripled_vectors: list[list[float]]
) -> None:
    """The service's admin listener is the lifecycle helper's: a real HTTP server here stands in
    for it, serving a real snapshot either at /admin/drift or as /admin/status's ``drift``."""
    url, handler = admin_server
    registry, report = small_model()
    drift = Drift.for_meta(registry.meta(report.version))
    for vector in tripled_vectors[:2000]:
        drift.observe(vector, 0.2)
    snap = json.loads(json.dumps(drift.snapshot()))
    handler.routes[route] = snap if route == "/admin/drift" else {"production": report.version, "drift": snap}
    run = fraudscore("--url", url, "--json")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == snap
    run = fraudscore("--url", url + "/")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith(
        f"drift of {report.version} (count window 2000 of 5000 requests, time window 2000"
    )
    alerted = {line.split()[0] for line in lines if line.endswith("ALERT")}
    assert alerted == set(snap["alerts"]) and alerted >= AMOUNT_FEATURES


def test_cli_live_view_without_drift(admin_server: tuple[str, type[_Admin]]) -> None:
    url, handler = admin_server
    handler.routes["/admin/status"] = {"production": "knn-1", "drift": None}
    run = fraudscore("--url", url)
    assert run.returncode != 0 and "tracks no drift" in run.stderr and run.stderr.count("\n") == 1
