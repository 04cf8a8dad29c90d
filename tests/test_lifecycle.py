"""Model lifecycle in production: swaps without restarts, sticky A/B splits, shadows, status.

Real parts throughout: a real registry holding two small models (two seeds), changed with the
real CLI; real ``serve`` processes, reached over real sockets (``/v1/score`` on the main
listener, ``/metrics`` and the admin routes on the ``--metrics-port`` listener); a real
redis-server for the stream worker.
"""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from fraudscore.contract.vectorize import vectorize
from fraudscore.models.live import (
    CANDIDATE,
    POLL_ENV,
    PRODUCTION,
    LiveModels,
    NoDrift,
    arm_of,
    split_key,
)
from fraudscore.models.registry import MODEL_FILE, POINTER, Registry, write_json_atomic
from fraudscore.models.scorer import ModelScorer
from fraudscore.models.train import train
from fraudscore.service.shadow import AfterAnswer

from .conftest import Server, free_port
from .models_support import SMALL_CONFIG, small_model, small_references

SETTLE_SECONDS = 15.0  # how long a test waits for what should happen within about a second


def fraudscore(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fraudscore.cli", *args], capture_output=True, text=True, timeout=120
    )


def cli_ok(*args: str) -> str:
    done = fraudscore(*args)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """A registry of its own holding two small models (seeds 1 and 2): (path, A, B)."""
    source, first = small_model()
    root = tmp_path_factory.mktemp("lifecycle") / "registry"
    shutil.copytree(source.root, root)
    second = train(
        small_references(),
        Registry(root),
        config=dataclasses.replace(SMALL_CONFIG, seed=2),
        index_path=None,
        progress=False,
    )
    return root, first.version, second.version


@pytest.fixture
def registry(versions: tuple[Path, str, str], tmp_path: Path) -> tuple[Path, str, str]:
    """A fresh copy per test, with A in production (promoted by the CLI)."""
    source, a, b = versions
    root = tmp_path / "registry"
    shutil.copytree(source, root)
    cli_ok("model", "promote", a, "--registry", str(root))
    return root, a, b


class Served(Server):
    """`serve --registry R --metrics-port P`: the admin listener is the metrics one."""

    def __init__(self, index_path: Path, registry: Path, poll: float | None = None) -> None:
        self.metrics_port = free_port()
        if poll is not None:
            os.environ[POLL_ENV] = str(poll)
        try:
            super().__init__(
                index_path, "--registry", str(registry), "--metrics-port", str(self.metrics_port)
            )
        finally:
            os.environ.pop(POLL_ENV, None)

    def admin(self, method: str, path: str) -> tuple[int, Any]:
        c = http.client.HTTPConnection("127.0.0.1", self.metrics_port, timeout=10)
        c.request(method, path)
        r = c.getresponse()
        body = r.read()
        c.close()
        return r.status, json.loads(body) if r.getheader("Content-Type") == "application/json" else body

    def metrics(self) -> str:
        return str(self.admin("GET", "/metrics")[1].decode())

    def close(self) -> str:
        code, log = self.stop()
        assert code == 0 and "Traceback" not in log, log
        return log


def score(port: int, payloads: list[Any]) -> list[dict[str, Any]]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    out = []
    for payload in payloads:
        c.request("POST", "/v1/score", body=orjson.dumps(payload))
        r = c.getresponse()
        assert r.status == 200
        out.append(json.loads(r.read()))
    c.close()
    return out


def wait_for(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + SETTLE_SECONDS
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {SETTLE_SECONDS} s: {what}")
        time.sleep(0.05)


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def with_customer(payloads: list[Any], ids: list[str]) -> list[Any]:
    return [{**p, "customer": {**p["customer"], "id": i}} for p, i in zip(payloads, ids, strict=True)]


def expected_probabilities(root: Path, version: str, payloads: list[Any]) -> list[float]:
    model = ModelScorer.from_registry(Registry(root), version)
    return [model.score(vectorize(p)) for p in payloads]


# -- 1. swaps --------------------------------------------------------------------------------------


def test_promotions_and_rollbacks_take_effect_in_the_running_instance(
    index_path: Path, registry: tuple[Path, str, str], example_payloads: list[Any]
) -> None:
    root, a, b = registry
    probability = {v: expected_probabilities(root, v, example_payloads[:1])[0] for v in (a, b)}
    srv = Served(index_path, root)
    try:
        pid = srv.proc.pid

        def serving(version: str) -> bool:
            answer = score(srv.port, example_payloads[:1])[0]
            assert answer["decided_by"]["version"] in (a, b)
            assert answer["model"]["probability"] == probability[answer["decided_by"]["version"]]
            return bool(answer["decided_by"]["version"] == version)

        assert serving(a)
        for version, action in ((b, ("promote", b)), (a, ("rollback",)), (b, ("promote", b))):
            cli_ok("model", *action, "--registry", str(root))
            wait_for(lambda v=version: serving(v), f"{version} serving after {action}")  # type: ignore[misc]
        assert srv.proc.pid == pid and srv.proc.poll() is None  # no restart
        text = srv.metrics()
        assert metric(text, "fraudscore_model_swaps_total") == 3
        assert metric(text, "fraudscore_model_serving", version=b, arm="production") == 1
    finally:
        log = srv.close()
    assert f"released {a}" in log  # the old version let go once its last user was done


def test_admin_reload_and_sighup_without_polling(
    index_path: Path, registry: tuple[Path, str, str], example_payloads: list[Any]
) -> None:
    root, a, b = registry
    srv = Served(index_path, root, poll=3600)  # no polling: only the admin route and SIGHUP
    try:
        cli_ok("model", "promote", b, "--registry", str(root))
        time.sleep(0.5)
        assert score(srv.port, example_payloads[:1])[0]["decided_by"]["version"] == a
        status, result = srv.admin("POST", "/admin/reload")
        assert status == 200 and result["result"] == "swapped", result
        assert score(srv.port, example_payloads[:1])[0]["decided_by"]["version"] == b
        assert srv.admin("GET", "/admin/reload")[0] == 405
        assert srv.admin("POST", "/admin/status")[0] == 405

        cli_ok("model", "rollback", "--registry", str(root))
        srv.proc.send_signal(signal.SIGHUP)
        wait_for(
            lambda: score(srv.port, example_payloads[:1])[0]["decided_by"]["version"] == a, "SIGHUP reload"
        )
        status, document = srv.admin("GET", "/admin/status")
        assert status == 200 and document["swaps"] == 2 and document["pid"] == srv.proc.pid
        assert [(v["version"], v["arm"]) for v in document["versions"]] == [(a, PRODUCTION)]
    finally:
        srv.close()


def test_a_damaged_version_is_refused_and_the_current_one_keeps_serving(
    index_path: Path, registry: tuple[Path, str, str], example_payloads: list[Any]
) -> None:
    root, a, b = registry
    # the damage comes after the promotion's own check: B's model.txt changes on disk, and the
    # pointer names B (as a promotion just before the damage would have)
    model = root / "versions" / b / MODEL_FILE
    model.chmod(stat.S_IRUSR | stat.S_IWUSR)
    text = model.read_text()
    model.write_text(text.replace("leaf_value=", "leaf_value=1", 1))
    pointer = json.loads((root / POINTER).read_text())
    srv = Served(index_path, root)
    try:
        write_json_atomic(root / POINTER, {**pointer, "production": b, "history": [a]})
        wait_for(lambda: metric(srv.metrics(), "fraudscore_model_swap_failures_total") >= 1, "a refusal")
        answers = score(srv.port, example_payloads[:20])
        assert {x["decided_by"]["version"] for x in answers} == {a}
        text = srv.metrics()
        assert metric(text, "fraudscore_model_loads_total", version=b, result="failed") >= 1
        document = srv.admin("GET", "/admin/status")[1]
        assert document["failures"][0]["version"] == b and "checksum" in document["failures"][0]["error"]
        shown = json.loads(cli_ok("model", "show", b, "--registry", str(root)))
        assert shown["load_failures"][0]["version"] == b
        assert "checksum" in shown["load_failures"][0]["error"]
    finally:
        log = srv.close()
    assert f"{b} cannot be loaded" in log


def test_a_version_is_released_when_its_last_user_ends(registry: tuple[Path, str, str]) -> None:
    """Reference counting: a version leaving the live set stays open while a request holds it."""
    root, a, b = registry
    live = LiveModels(Registry(root))
    live.refresh()
    used = live.use("c-1")
    assert used is not None and used[1].version == a
    old = used[1]
    Registry(root).promote(b)
    assert live.refresh()["result"] == "swapped"
    assert live.current.production is not None and live.current.production.version == b
    assert not old.closed and old.in_use == 1  # still answering its request
    old.scorer.score([0.5] * 14)
    old.release()
    assert old.closed


def test_two_hundred_reloads_keep_memory_flat(registry: tuple[Path, str, str]) -> None:
    root, a, b = registry
    reg = Registry(root)
    live = LiveModels(reg)
    live.refresh()

    def rss_kib() -> int:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]

    def swaps(n: int) -> None:
        for i in range(n):
            reg.promote(b if i % 2 == 0 else a)
            assert live.refresh()["result"] == "swapped"

    swaps(20)  # allocators and caches reach their working size
    before = rss_kib()
    swaps(200)
    assert rss_kib() - before < 10 * 1024


# -- 2. A/B --------------------------------------------------------------------------------------


def test_the_split_is_stable_and_near_its_share() -> None:
    ids = [f"customer-{i}" for i in range(100_000)]
    arms = [arm_of(i, "gbt-candidate", 10) for i in ids]
    share = arms.count(CANDIDATE) / len(ids)
    assert 0.09 <= share <= 0.11, share
    assert arms == [arm_of(i, "gbt-candidate", 10) for i in ids]  # a pure function of the id
    # another candidate draws another sample of customers
    assert arms != [arm_of(i, "gbt-other", 10) for i in ids]
    # a process with another hash seed agrees: no use of Python's hash()
    code = (
        "from fraudscore.models.live import arm_of; "
        "print(''.join(arm_of(f'customer-{i}', 'gbt-candidate', 10)[0] for i in range(2000)))"
    )
    other = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONHASHSEED": "7"},
    )
    assert other.stdout.strip() == "".join(a[0] for a in arms[:2000])
    assert split_key({"id": "tx-1", "customer": {"id": "c-1"}}) == "c-1"
    assert split_key({"id": "tx-1", "customer": {}}) == "tx-1"


def test_candidate_split_through_the_service_and_across_restarts(
    index_path: Path, registry: tuple[Path, str, str], example_payloads: list[Any]
) -> None:
    root, a, b = registry
    cli_ok("model", "promote", b, "--candidate", "--share", "30", "--registry", str(root))
    ids = [f"c-{i}" for i in range(200)]
    payloads = with_customer([example_payloads[i % len(example_payloads)] for i in range(200)], ids)
    expected = {v: expected_probabilities(root, v, payloads) for v in (a, b)}
    arms: dict[str, str] = {}
    for _ in range(2):  # the same arms from a second process: across restarts
        srv = Served(index_path, root)
        try:
            answers = score(srv.port, payloads) + score(srv.port, payloads)
            text = srv.metrics()
        finally:
            srv.close()
        for i, answer in enumerate(answers):
            customer = ids[i % len(ids)]
            arm = answer["decided_by"]["arm"]
            assert arm == arm_of(customer, b, 30)
            assert arms.setdefault(customer, arm) == arm
            version = b if arm == CANDIDATE else a
            assert answer["decided_by"]["version"] == version
            assert answer["model"]["probability"] == expected[version][i % len(ids)]
        candidates = sum(1 for x in answers if x["decided_by"]["arm"] == CANDIDATE)
        assert 0 < candidates < len(answers)
        assert metric(text, "fraudscore_decisions_total", version=b, arm=CANDIDATE) == candidates
        assert (
            metric(text, "fraudscore_decisions_total", version=a, arm=PRODUCTION) == len(answers) - candidates
        )

    out = json.loads(cli_ok("model", "abort", "--registry", str(root), "--json"))
    assert out["candidate"] is None and out["production"] == a


def test_promote_flags_are_checked(registry: tuple[Path, str, str]) -> None:
    root, _, b = registry
    for args, word in (
        (("--candidate",), "--share"),
        (("--share", "10"), "--candidate"),
        (("--candidate", "--share", "150"), "--share"),
        (("--candidate", "--share", "10", "--shadow"), "--shadow"),
    ):
        done = fraudscore("model", "promote", b, *args, "--registry", str(root))
        assert done.returncode not in (0,) and done.returncode < 128
        assert len(done.stderr.strip().splitlines()) == 1 and word in done.stderr, done.stderr


def test_the_worker_scores_each_customer_by_its_arm(registry: tuple[Path, str, str]) -> None:
    """The stream worker's scoring (``LiveModels.score_batch``) splits as the service does."""
    root, a, b = registry
    Registry(root).promote_candidate(b, 40)
    live = LiveModels(Registry(root))
    live.refresh()
    keys = [f"c-{i}" for i in range(300)]
    vectors = [[((i * 7 + j) % 10) / 10 for j in range(14)] for i in range(300)]
    models = {v: ModelScorer.from_registry(Registry(root), v) for v in (a, b)}
    for key, vector, (probability, approved, name) in zip(
        keys, vectors, live.score_batch(keys, vectors), strict=True
    ):
        version = b if arm_of(key, b, 40) == CANDIDATE else a
        assert name == f"model:gbt:{version}"
        assert probability == models[version].score(vector)
        assert approved == models[version].approves(probability)


# -- 3. shadows ------------------------------------------------------------------------------


def test_shadow_scores_every_request_off_the_response_path(
    index_path: Path, registry: tuple[Path, str, str], example_payloads: list[Any]
) -> None:
    root, a, b = registry
    cli_ok("model", "promote", b, "--shadow", "--registry", str(root))
    payloads = [example_payloads[i % len(example_payloads)] for i in range(150)]
    shadow = ModelScorer.from_registry(Registry(root), b)
    served = expected_probabilities(root, a, payloads)
    production = ModelScorer.from_registry(Registry(root), a)
    differ = sum(
        shadow.approves(shadow.score(vectorize(p))) != production.approves(s)
        for p, s in zip(payloads, served, strict=True)
    )
    srv = Served(index_path, root)
    try:
        answers = score(srv.port, payloads)
        assert {x["decided_by"]["version"] for x in answers} == {a}  # the shadow never answers
        wait_for(
            lambda: metric(srv.metrics(), "fraudscore_shadow_scored_total", version=b) == 150, "150 scored"
        )
        text = srv.metrics()
        assert metric(text, "fraudscore_shadow_disagreements_total", version=b) == differ
        assert metric(text, "fraudscore_shadow_score_count", version=b, role="shadow") == 150
        assert metric(text, "fraudscore_shadow_dropped_total") == 0
    finally:
        srv.close()


def test_a_full_shadow_queue_drops_and_counts() -> None:
    """While a batch is scoring and the queue is full, requests are dropped and counted."""

    class Slow:
        version = "gbt-slow"
        released = 0

        def __init__(self) -> None:
            self.scorer = self

        def acquire(self) -> bool:
            return True

        def release(self) -> None:
            Slow.released += 1

        def scores(self, vectors: list[Any]) -> list[float]:
            time.sleep(0.05)
            return [0.5] * len(vectors)

        def approves(self, score: float) -> bool:
            return score < 0.5

    async def run() -> AfterAnswer:
        after = AfterAnswer(asyncio.get_running_loop(), batch=4, capacity=8, delay=0.001)
        shadows: Any = (Slow(),)
        for _ in range(4):
            after.put(NoDrift(), [0.0] * 14, 0.1, True, shadows)
        await asyncio.sleep(0.01)  # the first batch is scoring now
        for _ in range(20):
            after.put(NoDrift(), [0.0] * 14, 0.1, True, shadows)
        while after.items or after._busy:
            await asyncio.sleep(0.01)
        after.close()
        return after

    after = asyncio.run(run())
    assert after.dropped == 12
    assert after.scored["gbt-slow"] == 12 and after.disagreed["gbt-slow"] == 12
    assert Slow.released == 2  # each batch held the version for its duration


# -- 5. status ----------------------------------------------------------------------------------


def test_status_reaches_each_instance_and_reports_stale_files(
    index_path: Path, registry: tuple[Path, str, str]
) -> None:
    root, a, b = registry
    cli_ok("model", "promote", b, "--candidate", "--share", "10", "--registry", str(root))
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = root / "instances" / f"{os.uname().nodename}-{dead.stdout.strip()}.json"
    stale.parent.mkdir(exist_ok=True)
    stale.write_text(
        json.dumps({"host": os.uname().nodename, "pid": int(dead.stdout), "admin": "http://127.0.0.1:1"})
    )
    srv = Served(index_path, root)
    try:
        document = json.loads(cli_ok("model", "status", "--registry", str(root), "--json"))
        assert document["production"] == a and document["candidate"] == {"version": b, "share": 10.0}
        rows = {Path(r["file"]).name: r for r in document["instances"]}
        mine = rows[f"{os.uname().nodename}-{srv.proc.pid}.json"]
        assert mine["state"] == "live" and mine["role"] == "service"
        assert {(v["version"], v["arm"], v["share"]) for v in mine["versions"]} == {
            (a, PRODUCTION, 90.0),
            (b, CANDIDATE, 10.0),
        }
        assert mine["swaps"] == 0 and mine["failures"] == [] and set(mine["drift"]) == {a, b}
        assert rows[stale.name]["state"] == "stale"
        text = cli_ok("model", "status", "--registry", str(root))
        assert "stale" in text and f"{b:<36} candidate 10 %" in text
    finally:
        srv.close()
    assert not (root / "instances" / f"{os.uname().nodename}-{srv.proc.pid}.json").exists()


# -- the stream worker follows the registry too ----------------------------------------------------


def test_the_stream_worker_splits_and_follows_promotions(
    registry: tuple[Path, str, str], index_path: Path
) -> None:
    """`fraudscore worker --registry`: each customer's events scored by its arm (the service's
    function), and a promotion taken up by the running worker."""
    from fraudscore.stream.generate import generate, raw
    from fraudscore.stream.keys import PartitionKeys
    from fraudscore.stream.produce import publish
    from fraudscore.stream.worker import connect, prepare

    redis_server = shutil.which("redis-server")
    if redis_server is None:
        pytest.skip("redis-server is not installed")
    root, a, b = registry
    cli_ok("model", "promote", b, "--candidate", "--share", "30", "--registry", str(root))
    models = {v: ModelScorer.from_registry(Registry(root), v) for v in (a, b)}
    directory = Path(tempfile.mkdtemp(prefix="fs-lc-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    url = f"unix://{directory}/redis.sock"  # short: unix socket paths must fit ~100 bytes
    server = subprocess.Popen(
        [redis_server, "--port", "0", "--unixsocket", f"{directory}/redis.sock", "--dir", str(directory)],
        stdout=subprocess.DEVNULL,
    )
    client = connect(url)
    wait_for(lambda: _pings(client), "redis-server up")
    partitions = 2
    events = list(generate(900, customers=120, seed=3))
    customer = {e.event_id: e.customer_id for e in events}
    argv = [
        sys.executable,
        "-m",
        "fraudscore.cli",
        "worker",
        "--redis",
        url,
        "--index",
        str(index_path),
    ]
    argv += ["--partitions", str(partitions), "--registry", str(root), "--claim-idle-ms", "600"]
    worker = subprocess.Popen(argv, stderr=subprocess.PIPE)
    try:
        prepare(client, partitions)

        def scored() -> list[dict[bytes, bytes]]:
            return [f for i in range(partitions) for _, f in client.xrange(PartitionKeys(i).results)]  # type: ignore[union-attr, misc]

        publish(client, [raw(e) for e in events[:600]], partitions)
        wait_for(lambda: len(scored()) == 600, "600 results")
        for fields in scored():
            key = customer[fields[b"event_id"].decode()]
            version = b if arm_of(key, b, 30) == CANDIDATE else a
            assert fields[b"scorer"].decode() == f"model:gbt:{version}"
            vector = vectorize(orjson.loads(fields[b"payload"]))
            assert float(fields[b"fraud_score"]) == models[version].score(vector)
        assert {f[b"scorer"] for f in scored()} == {f"model:gbt:{v}".encode() for v in (a, b)}

        instance = root / "instances" / f"{os.uname().nodename}-{worker.pid}.json"
        cli_ok("model", "promote", b, "--registry", str(root))  # B for everyone: the split ends
        wait_for(
            lambda: [v["version"] for v in json.loads(instance.read_text())["versions"]] == [b],
            "the worker serving B alone",
        )
        publish(client, [raw(e) for e in events[600:]], partitions)
        wait_for(lambda: len(scored()) == 900, "900 results")
        later = {f[b"event_id"].decode(): f[b"scorer"].decode() for f in scored()}
        assert {later[e.event_id] for e in events[600:]} == {f"model:gbt:{b}"}
    finally:
        worker.send_signal(signal.SIGTERM)
        _, err = worker.communicate(timeout=30)
        client.close()
        server.terminate()
        server.wait(10)
        shutil.rmtree(directory, ignore_errors=True)
    assert worker.returncode == 0 and "Traceback" not in err.decode(), err.decode()[-2000:]
    assert not instance.exists()


def _pings(client: Any) -> bool:
    try:
        return bool(client.ping())
    except Exception:  # not up yet
        return False


# -- 4. drift, served ------------------------------------------------------------------------------


def test_drift_is_tracked_by_the_service_and_alerts_on_the_amounts_only(
    index_path: Path, registry: tuple[Path, str, str], dev_entries: list[dict[str, Any]]
) -> None:
    """The dev payloads in their own order raise no alert through a real server; the same with
    amounts x3 raise one on the amount features alone, in /admin/status and in /metrics."""
    root, a, _ = registry
    payloads = [e["request"] for e in dev_entries[:2500]]
    tripled = [
        {**p, "transaction": {**p["transaction"], "amount": p["transaction"]["amount"] * 3}} for p in payloads
    ]
    for batch, alerting in ((payloads, set()), (tripled, {"amount", "amount_vs_avg"})):
        srv = Served(index_path, root)
        try:
            score(srv.port, batch)

            def observed_all(srv: Served = srv, n: int = len(batch)) -> bool:
                return bool(srv.admin("GET", "/admin/status")[1]["drift"][a]["observed"] == n)

            wait_for(observed_all, "every answered request observed")
            snapshot = srv.admin("GET", "/admin/status")[1]["drift"][a]
            assert set(snapshot["alerts"]) - {"score"} == alerting, snapshot["alerts"]
            text = srv.metrics()
            flagged = set(
                re.findall(r'^fraudscore_drift_alert\{feature="([^"]+)",version="[^"]+"\} 1\.0$', text, re.M)
            )
            flagged |= set(
                re.findall(r'^fraudscore_drift_alert\{version="[^"]+",feature="([^"]+)"\} 1\.0$', text, re.M)
            )
            assert flagged - {"score"} == alerting, text
            assert metric(text, "fraudscore_drift_observations", version=a) > 0
        finally:
            srv.close()
