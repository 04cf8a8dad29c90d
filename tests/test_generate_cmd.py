"""`fraudscore generate` for real: the command as a subprocess against a private redis-server;
what lands in the streams and in the runs registry, the ground truth, and bad flags."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from fraudscore.stream.generate import RateShape
from fraudscore.stream.keys import RUNS, PartitionKeys, partition_of, run_frauds_key, run_key
from fraudscore.stream.runs import population_events
from fraudscore.stream.worker import connect, wait_until_answering

CLI = [sys.executable, "-m", "fraudscore.cli", "--log-level", "WARNING"]
pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    directory = Path(
        tempfile.mkdtemp(prefix="fs-gen-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None)
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


def generate(url: str, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "generate", "--redis", url, *flags], capture_output=True, text=True, timeout=60
    )


def test_a_run_publishes_its_schedule_with_its_truth_and_registers_itself(redis_url: str) -> None:
    client = connect(redis_url)
    client.flushall()
    flags = ["--rate", "400", "--duration", "1.5", "--shape", "wave", "--customers", "60"]
    flags += ["--fraud-share", "0.2", "--seed", "5", "--run-id", "t-wave", "--partitions", "3"]
    done = generate(redis_url, *flags)
    assert done.returncode == 0, done.stderr
    planned = RateShape("wave", 400.0, 1.5).count_within(1.5)
    assert done.stdout.startswith(f"run t-wave: published {planned} events")

    published: list[dict[str, Any]] = []
    for i in range(3):
        entries: Any = client.xrange(PartitionKeys(i).events)
        for _, fields in entries:
            event = orjson.loads(fields[b"event"])
            assert partition_of(event["customer_id"], 3) == i
            published.append(event)
    published.sort(key=lambda e: e["event_id"])
    # the same run, regenerated: every event, and exactly its frauds as the truth in Redis
    expected = list(population_events(60, 5, 0.2, "t-wave", planned))
    assert [e["event_id"] for e in published] == [e.event_id for e, _ in expected]
    frauds: Any = client.smembers(run_frauds_key("t-wave"))
    assert {f.decode() for f in frauds} == {e.event_id for e, fraud in expected if fraud}
    assert len(frauds) > 0

    run: Any = client.hgetall(run_key("t-wave"))
    info = {k.decode(): v.decode() for k, v in run.items()}
    assert info["state"] == "done" and info["shape"] == "wave" and float(info["rate"]) == 400.0
    assert int(info["published"]) == int(info["planned"]) == planned
    assert int(info["frauds"]) == len(frauds)
    assert client.zscore(RUNS, "t-wave") == int(info["started_ms"])
    assert int(info["ended_ms"]) >= int(info["started_ms"])

    listed = subprocess.run(
        [*CLI, "monitor", "--redis", redis_url, "--runs", "--json"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert listed.returncode == 0, listed.stderr
    assert [r["run_id"] for r in json.loads(listed.stdout)] == ["t-wave"]

    again = generate(redis_url, *flags)  # the same id again: its events would be repeats
    assert again.returncode != 0 and "--run-id t-wave" in again.stderr
    client.close()


def test_a_stopped_run_says_so_and_counts_what_it_sent(redis_url: str) -> None:
    client = connect(redis_url)
    client.flushall()
    proc = subprocess.Popen(
        [*CLI, "generate", "--redis", redis_url, "--rate", "200", "--duration", "60", "--run-id", "long"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while int(client.hget(run_key("long"), "published") or 0) == 0:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.terminate()
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    published = int(client.hget(run_key("long"), "published") or 0)
    assert client.hget(run_key("long"), "state") == b"stopped"
    assert f"stopped early: published {published} events" in out
    assert sum(int(client.xlen(PartitionKeys(i).events)) for i in range(8)) == published
    client.close()


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--rate", "0"], "--rate"),
        (["--duration", "-1"], "--duration"),
        (["--shape", "ramp"], "--shape"),
        (["--customers", "x"], "--customers"),
        (["--fraud-share", "1.5"], "--fraud-share"),
        (["--seed", "x"], "--seed"),
        (["--run-id", "a:b"], "--run-id"),
        (["--run-id", "-x"], "--run-id"),
        (["--partitions", "0"], "--partitions"),
        (["--redis", "nonsense://x"], "--redis"),
    ],
)
def test_a_bad_flag_is_one_line_and_a_nonzero_exit(flags: list[str], named: str) -> None:
    run = subprocess.run([*CLI, "generate", *flags], capture_output=True, text=True, timeout=30)
    assert 0 < run.returncode < 128
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("fraudscore generate"), run.stderr
    assert named in run.stderr and "Traceback" not in run.stderr


def test_help_names_every_flag() -> None:
    run = subprocess.run([*CLI, "generate", "--help"], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0
    for flag in ("--rate", "--duration", "--shape", "--customers", "--fraud-share", "--seed", "--run-id"):
        assert flag in run.stdout
    for shape in ("constant", "wave", "spike", "random"):
        assert shape in run.stdout
