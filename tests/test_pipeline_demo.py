"""`fraudscore pipeline demo` for real: the command as a subprocess, its private redis-server,
its worker processes and its generator; the report's numbers, the chart, Ctrl-C and bad flags."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import free_port

DEMO = [sys.executable, "-m", "fraudscore.cli", "--log-level", "WARNING", "pipeline", "demo"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DURATION_S = 6
RATE = 50.0

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")


def _descendants(pid: int) -> list[int]:
    """The live processes below ``pid`` (children, their children...)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])  # after "pid (comm) state"
        parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def _alive(pids: list[int]) -> list[int]:
    return [pid for pid in pids if Path(f"/proc/{pid}").exists() and "(zombie)" not in _status(pid)]


def _status(pid: int) -> str:
    try:
        return next(
            line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("State:")
        )
    except (OSError, StopIteration):
        return "(zombie)"


def test_the_demo_runs_the_pipeline_and_reports_consistent_numbers(index_path: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    argv = [*DEMO, "--duration", str(DURATION_S), "--rate", str(RATE), "--shape", "constant"]
    argv += ["--partitions", "2", "--workers", "1", "--fraud-share", "0.2", "--index", str(index_path)]
    argv += ["--out", str(out_dir), "--json"]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=90)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)  # --json: stdout is the report alone
    assert json.loads((out_dir / "report.json").read_text()) == report

    events = int(DURATION_S * RATE)  # what the constant schedule holds in the duration
    assert report["events"] == report["published"] == events
    assert report["dead_letters"] == 0
    assert report["results"] == report["results_read"] == events  # every event scored, each read once

    series = report["per_second"]
    # one point per second from the generator's start until the last result: the duration and
    # the drain (the worker's start and its last batches), a few seconds at most
    assert DURATION_S <= len(series) <= DURATION_S + 6
    assert sum(s["results"] for s in series) == events
    assert report["rate_per_s"]["target"]["peak"] == pytest.approx(RATE, rel=0.1)
    assert report["rate_per_s"]["target"]["mean"] == pytest.approx(RATE, rel=0.05)

    latency = report["latency_ms"]
    assert latency["count"] == events  # the per-second histograms merged hold every result
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"]
    worst = max(s["p99_ms"] for s in series if s["p99_ms"] is not None)
    assert latency["p99"] <= worst  # a merged percentile cannot pass every second's

    assert sum(d["approved"] + d["declined"] for d in report["decisions"]) == events
    assert all(d["scorer"].startswith("knn:") and d["arm"] == "production" for d in report["decisions"])
    truth = report["truth"]
    assert truth["tp"] + truth["fp"] + truth["fn"] + truth["tn"] == events
    assert truth["tp"] + truth["fn"] == truth["frauds"] > 0
    # the frauds are declined far more often than the rest: the labels are those of these events
    # (labels unrelated to the events would give about the same share for both)
    assert truth["recall"] > truth["fp"] / (truth["fp"] + truth["tn"]) + 0.2

    chart = Path(report["chart"])
    assert chart == out_dir / "pipeline.png"
    data = chart.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 20_000

    progress = [line for line in run.stderr.splitlines() if "target" in line and "published" in line]
    assert len(progress) == len(series)  # not a terminal: one progress line per point


def test_ctrl_c_stops_the_generator_the_workers_and_redis(index_path: Path, tmp_path: Path) -> None:
    argv = [*DEMO, "--events", "100000", "--rate", "200", "--partitions", "2", "--workers", "2"]
    argv += ["--index", str(index_path), "--out", str(tmp_path / "out"), "--no-chart"]
    log = tmp_path / "stderr"  # a file, not a pipe: a child left behind cannot hold it open
    with log.open("w") as err:
        # its own process group, as a terminal's foreground job
        demo = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    children: list[int] = []
    try:
        deadline = time.monotonic() + 30
        while "published" not in log.read_text() and time.monotonic() < deadline:  # running
            time.sleep(0.1)
        children = _descendants(demo.pid)
        # redis-server, the worker supervisor, its two worker processes
        assert len(children) == 4, log.read_text()[-2000:]
        os.killpg(demo.pid, signal.SIGINT)  # Ctrl-C at a terminal: the whole foreground group
        assert demo.wait(timeout=40) == 130, log.read_text()[-2000:]
        stderr = log.read_text()
        assert "Traceback" not in stderr
        # in order, each while the next was still running: the workers finished against a live Redis
        stopped = "stopped the generator, then the workers (exit status 0), then redis-server\n"
        assert stderr.endswith(f"pipeline demo: interrupted; {stopped}"), stderr[-2000:]
        deadline = time.monotonic() + 5
        while _alive(children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _alive(children) == []
        assert not (tmp_path / "out" / "report.json").exists()  # an interrupted run reports nothing
    finally:  # whatever failed, nothing of this test stays running
        for pid in [demo.pid, *_alive(children)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        demo.wait()


def test_with_a_registry_the_decisions_are_split_by_arm(index_path: Path, tmp_path: Path) -> None:
    from fraudscore.models.live import CANDIDATE, arm_of
    from fraudscore.models.registry import Registry
    from fraudscore.models.train import train
    from fraudscore.stream.generate import generate_labelled
    from tests.models_support import SMALL_CONFIG, small_references

    registry = Registry(tmp_path / "registry")
    knn = registry.register_knn(index_path)
    registry.promote(knn)
    model = train(small_references(), registry, config=SMALL_CONFIG, index_path=index_path, progress=False)
    registry.promote_candidate(model.version, 50)
    argv = [*DEMO, "--events", "150", "--rate", str(RATE), "--shape", "constant", "--partitions", "2"]
    argv += ["--workers", "1", "--index", str(index_path), "--registry", str(registry.root)]
    argv += ["--out", str(tmp_path / "out"), "--no-chart", "--json"]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=90)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)
    assert report["results"] == 150 and report["chart"] is None
    # (arm the report gives, kind of the scorer that decided): they must agree, event by event
    decisions = {
        (d["arm"], d["scorer"].split(":")[0]): d["approved"] + d["declined"] for d in report["decisions"]
    }
    # the same events (the demo's generator: seed 0, 50 customers for so few events), split as
    # the workers split them: each customer's arm by models.live.arm_of
    events, _ = generate_labelled(150, customers=50)
    candidates = sum(arm_of(e.customer_id, model.version, 50) == CANDIDATE for e in events)
    assert 0 < candidates < 150
    assert decisions == {("production", "knn"): 150 - candidates, ("candidate", "model"): candidates}


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--rate", "0"], "--rate"),
        (["--rate", "-5"], "--rate"),
        (["--duration", "3", "--events", "10"], "--events"),
        (["--fraud-share", "1.5"], "--fraud-share"),
        (["--registry", "/nonexistent/registry"], "--registry"),
        (["--redis", "redis://127.0.0.1:{port}/0"], "--redis"),
        (["--redis", "nonsense://x"], "--redis"),
    ],
)
def test_a_bad_flag_is_one_line_and_a_nonzero_exit(flags: list[str], named: str, tmp_path: Path) -> None:
    flags = [f.format(port=free_port()) for f in flags]
    run = subprocess.run(
        [*DEMO, *flags, "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=30
    )
    assert 0 < run.returncode < 128
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("fraudscore pipeline demo"), run.stderr
    assert named in run.stderr and "Traceback" not in run.stderr
    assert run.stdout == "" and not (tmp_path / "out").exists()


def test_help_at_both_levels() -> None:
    group = subprocess.run([*DEMO[:-1], "--help"], capture_output=True, text=True)
    assert group.returncode == 0 and "demo" in group.stdout
    demo = subprocess.run([*DEMO, "--help"], capture_output=True, text=True)
    assert demo.returncode == 0
    for flag in ("--redis", "--rate", "--duration", "--chart", "--no-chart", "--json"):
        assert flag in demo.stdout


def test_the_readme_lists_every_redis_key_of_keys_py() -> None:
    """README's "Redis keys" table against stream/keys.py, the one owner of key names: a key
    added there without a row here (or a row for a key that is gone) fails."""
    from fraudscore.stream import keys

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme.split("### Redis keys", 1)[1].split("\n#", 1)[0]
    # a row's key, partition 0, cut where its variable part (<event id>, <customer>...) begins
    listed = {
        row.split("`")[1].replace("<i>", "0").split("<")[0]
        for row in table.splitlines()
        if row.startswith("| `")
    }
    module = {v for k, v in vars(keys).items() if k.isupper() and isinstance(v, str) and v.startswith("{")}
    partition = keys.PartitionKeys(0)
    fixed = {v for k, v in vars(partition).items() if isinstance(v, str) and k != "tag"}
    variable = {
        getattr(partition, name)("\0").split("\0")[0]
        for name in dir(partition)
        if not name.startswith("_") and callable(getattr(partition, name))
    }
    assert listed == module | fixed | variable


def test_latency_histograms_merge_to_the_histogram_of_all_values() -> None:
    """The report's percentiles are per-interval histograms merged: the same buckets as one
    histogram of every value, and each quantile at most one bucket (4.4 %) above the exact one."""
    import math
    import random

    from fraudscore.stream.monitor import LatencyHistogram

    rng = random.Random(7)
    values = [rng.lognormvariate(1.0, 1.2) for _ in range(5000)]
    merged = LatencyHistogram()
    for i in range(0, len(values), 700):  # uneven intervals
        merged.merge(LatencyHistogram.of(values[i : i + 700]))
    whole = LatencyHistogram.of(values)
    assert merged.counts == whole.counts and merged.count == len(values)
    ordered = sorted(values)
    for q in (0.5, 0.95, 0.99):
        exact = ordered[math.ceil(q * len(values)) - 1]
        estimate = merged.quantile(q)
        assert estimate is not None and exact <= estimate <= exact * 2 ** (1 / 16) * (1 + 1e-9)
    assert LatencyHistogram().quantile(0.5) is None
