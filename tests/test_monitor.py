"""`fraudscore monitor` against a real redis-server: results written as the workers write them
(known latencies, decisions, scorers), runs with known truth; the figures must equal them."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fraudscore.stream.events import iso_ms
from fraudscore.stream.keys import RUNS, PartitionKeys, run_frauds_key, run_key
from fraudscore.stream.monitor import LatencyHistogram, LiveView, Truth, snapshot, worker_rates
from fraudscore.stream.runs import redis_ms
from fraudscore.stream.worker import Client, connect, wait_until_answering

CLI = [sys.executable, "-m", "fraudscore.cli", "--log-level", "WARNING", "monitor"]
PARTITIONS = 2
START_MS = 1_800_000_000_000
pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    directory = Path(
        tempfile.mkdtemp(prefix="fs-mon-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None)
    )
    sock = directory / "redis.sock"
    server = subprocess.Popen(
        ["redis-server", "--port", "0", "--unixsocket", str(sock), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    url = f"unix://{sock}"
    client = connect(url)
    wait_until_answering(client, 20.0, server)
    client.close()
    yield url
    server.terminate()
    server.wait()
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def client(redis_url: str) -> Iterator[Client]:
    c = connect(redis_url)
    c.flushall()
    yield c
    c.close()


def register(client: Client, run_id: str, frauds: set[str]) -> None:
    """A run as ``fraudscore generate`` registers it, started a second ago by Redis's clock."""
    started_ms = redis_ms(client) - 1000
    client.hset(run_key(run_id), mapping={"run_id": run_id, "shape": "constant", "rate": 100, "duration": 1})
    client.hset(run_key(run_id), mapping={"published": 0, "started_ms": started_ms, "state": "done"})
    client.zadd(RUNS, {run_id: started_ms})
    if frauds:
        client.sadd(run_frauds_key(run_id), *frauds)


def write_result(client: Client, partition: int, event_id: str, approved: bool, scorer: str, ms: int) -> int:
    """One result as a worker writes it; enqueued at a whole second, scored ``ms`` later."""
    enqueued = START_MS + 1000 * random.Random(event_id).randrange(1, 100)
    client.xadd(
        PartitionKeys(partition).results,
        {
            "event_id": event_id,
            "approved": "true" if approved else "false",
            "scorer": scorer,
            "enqueued_at": iso_ms(enqueued),
            "scored_at": iso_ms(enqueued + ms),
        },
    )
    return ms


def test_stats_of_a_run_equal_what_was_written(redis_url: str, client: Client) -> None:
    rng = random.Random(3)
    frauds = {f"r1-{n:08d}" for n in range(0, 300, 7)}
    register(client, "r1", frauds)
    register(client, "r2", set())
    latencies, expected = [], {"tp": 0, "fp": 0, "fn": 0, "tn": 0}
    by_scorer: dict[tuple[str, str], dict[str, int]] = {}
    for n in range(300):
        event_id = f"r1-{n:08d}"
        approved = rng.random() < 0.7
        scorer = "knn:knn:v1" if n % 3 else "model:gbt:v2"
        latencies.append(
            write_result(client, n % PARTITIONS, event_id, approved, scorer, rng.randrange(1, 400))
        )
        fraud = event_id in frauds
        expected["tp" if fraud and not approved else "fn" if fraud else "fp" if not approved else "tn"] += 1
        arm = "candidate" if scorer.endswith("v2") else "production"
        row = by_scorer.setdefault((scorer, arm), {"approved": 0, "declined": 0})
        row["approved" if approved else "declined"] += 1
    for n in range(50):  # another run's results, and one of a run never registered: not r1's
        write_result(client, n % PARTITIONS, f"r2-{n:08d}", False, "knn:knn:v1", 5000)
    write_result(client, 0, "r10-00000001", False, "knn:knn:v1", 9000)

    stats = monitor_json(redis_url, "--stats", "--run-id", "r1", registry_candidate="v2")
    assert stats["results"] == 300
    truth = stats["truth"]
    assert {k: truth[k] for k in ("tp", "fp", "fn", "tn")} == expected and truth["frauds"] == len(frauds)
    assert truth["precision"] == expected["tp"] / (expected["tp"] + expected["fp"])
    assert truth["recall"] == expected["tp"] / (expected["tp"] + expected["fn"])
    assert stats["decisions"] == [{"scorer": s, "arm": a, **c} for (s, a), c in sorted(by_scorer.items())]
    whole = LatencyHistogram.of(latencies)
    assert stats["latency_ms"] == {
        "count": 300,
        "p50": whole.quantile(0.5),
        "p95": whole.quantile(0.95),
        "p99": whole.quantile(0.99),
    }
    missing = subprocess.run(
        [*CLI, "--redis", redis_url, "--partitions", str(PARTITIONS), "--stats", "--run-id", "nope"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert 0 < missing.returncode < 128 and missing.stderr.count("\n") == 1 and "nope" in missing.stderr


def monitor_json(url: str, *flags: str, registry_candidate: str | None = None) -> Any:
    argv = [*CLI, "--redis", url, "--partitions", str(PARTITIONS), "--json", *flags]
    with tempfile.TemporaryDirectory() as registry:
        if registry_candidate is not None:  # a registry whose A/B candidate is that version
            from fraudscore.models.registry import POINTER

            pointer = {
                "production": "v1",
                "history": [],
                "candidate": {"version": registry_candidate, "share": 10},
            }
            (Path(registry) / POINTER).write_text(json.dumps(pointer))
            argv += ["--registry", registry]
        run = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def test_the_live_view_counts_each_interval_for_the_owner_and_against_the_truth(client: Client) -> None:
    register(client, "live", {"live-00000001", "live-00000002"})
    client.set(PartitionKeys(0).lease, "worker-a")
    client.set(PartitionKeys(1).lease, "worker-b")
    for n in range(5):  # results before the interval: not in it
        write_result(client, n % PARTITIONS, f"early-{n:08d}", True, "knn:knn:v1", 10)
    before = snapshot(client, PARTITIONS, sample=1)
    sent = {0: 0, 1: 0}
    decisions = [("live-00000001", False), ("live-00000002", True), ("live-00000003", False)]
    decisions += [(f"live-{n:08d}", True) for n in range(4, 40)]
    decisions += [("other-00000001", False)]  # no such run: no truth, left out of the quality
    for n, (event_id, approved) in enumerate(decisions):
        partition = 0 if n % 4 else 1
        write_result(client, partition, event_id, approved, "knn:knn:v1", 10)
        sent[partition] += 1
    after = snapshot(client, PARTITIONS, since=before)
    rates = worker_rates(before, after, ["worker-a", "worker-b", "idle"])
    assert {w: r["results"] for w, r in rates.items()} == {
        "worker-a": sent[0],
        "worker-b": sent[1],
        "idle": 0,
    }
    assert rates["worker-a"]["partitions"] == [0] and rates["idle"]["partitions"] == []
    view = LiveView().update(before, after, Truth(client), [])
    assert view["truth"] | {"precision": 0, "recall": 0} == {
        "tp": 1,
        "fp": 1,
        "fn": 1,
        "tn": 36,
        "precision": 0,
        "recall": 0,
    }
    assert view["truth"]["precision"] == 0.5 and view["truth"]["recall"] == 0.5
    assert view["decisions"] == [{"scorer": "knn:knn:v1", "arm": "production", "approved": 37, "declined": 3}]
    assert view["latency_ms"]["count"] == len(decisions)
    assert view["results"] - snapshot_total(before) == len(decisions)


def snapshot_total(s: Any) -> int:
    return int(s.total("scored"))


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--stats"], "--run-id"),
        (["--run-id", "x"], "--stats"),
        (["--runs", "--stats"], "--stats"),
        (["--interval", "0"], "--interval"),
        (["--registry", "/nonexistent/registry"], "--registry"),
    ],
)
def test_a_bad_flag_is_one_line_and_a_nonzero_exit(flags: list[str], named: str) -> None:
    run = subprocess.run([*CLI, *flags], capture_output=True, text=True, timeout=30)
    assert 0 < run.returncode < 128
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("fraudscore monitor"), run.stderr
    assert named in run.stderr and "Traceback" not in run.stderr


def test_the_live_monitor_prints_the_totals_then_one_view_per_interval(
    redis_url: str, client: Client
) -> None:
    register(client, "lv", {"lv-00000000"})
    for n in range(6):
        write_result(client, n % PARTITIONS, f"lv-{n:08d}", n != 0, "knn:knn:v1", 10)
    client.set(PartitionKeys(1).lease, "worker-b")
    argv = [*CLI, "--redis", redis_url, "--partitions", str(PARTITIONS), "--count", "2", "--interval", "0.1"]
    as_json = subprocess.run([*argv, "--json"], capture_output=True, text=True, timeout=60)
    assert as_json.returncode == 0, as_json.stderr
    first, second = (json.loads(line) for line in as_json.stdout.splitlines())
    assert first == {
        "published": 0,
        "results": 6,
        "dead_letters": 0,
        "pending": 0,
        "backlog": 0,
        "owners": {"0": None, "1": "worker-b"},
    }
    assert second["results"] == 6 and second["out_per_s"] == 0 and second["latency_ms"]["count"] == 0
    assert second["workers"] == {"worker-b": {"partitions": [1], "results": 0, "per_s": 0.0}}
    as_text = subprocess.run(argv, capture_output=True, text=True, timeout=60)  # not a terminal: lines
    lines = as_text.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("published 0, scored 6; dead 0; pending 0")
    assert lines[1].startswith("published 0/s, scored 0/s") and "worker-b 0/s" in lines[1]


def test_a_generated_run_scored_by_a_worker_adds_up(redis_url: str, client: Client, index_path: Path) -> None:
    """`fraudscore generate`, a real worker, then `monitor --stats`: every published event has
    one result, and the confusion counts are those of the results against the run's truth."""
    from fraudscore.scorer import KnnScorer
    from fraudscore.stream.worker import Worker, WorkerConfig

    flags = ["--rate", "600", "--duration", "1", "--customers", "40", "--fraud-share", "0.2"]
    flags += ["--seed", "9", "--run-id", "e2e", "--partitions", str(PARTITIONS), "--redis", redis_url]
    made = subprocess.run([*CLI[:-1], "generate", *flags], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    with KnnScorer.open(index_path) as scorer:
        Worker(connect(redis_url), scorer, WorkerConfig(partitions=PARTITIONS, claim_idle_ms=600)).run(
            max_idle_s=1.0
        )
    stats = monitor_json(redis_url, "--stats", "--run-id", "e2e")
    assert stats["published"] == stats["results"] == 600 and stats["dead_letters"] == 0
    frauds: Any = client.smembers(run_frauds_key("e2e"))
    approved: dict[str, bool] = {}
    for i in range(PARTITIONS):
        entries: Any = client.xrange(PartitionKeys(i).results)
        approved |= {f[b"event_id"].decode(): f[b"approved"] == b"true" for _, f in entries}
    truth = {f.decode() for f in frauds}
    assert stats["truth"]["tp"] == sum(not a for e, a in approved.items() if e in truth)
    assert stats["truth"]["fp"] == sum(not a for e, a in approved.items() if e not in truth)
    assert stats["truth"]["tn"] == sum(a for e, a in approved.items() if e not in truth)
    assert stats["truth"]["tp"] + stats["truth"]["fn"] == len(truth) == stats["truth"]["frauds"] > 0
    assert sum(d["approved"] + d["declined"] for d in stats["decisions"]) == 600
