"""The model lifecycle under load: swaps, A/B stickiness, shadows, memory, a damaged version.

    python bench/lifecycle.py [--target 900] [--duration 60] [--ids 100000] [--out DIR]

Two `fraudscore serve` instances (TCP, each with its --metrics-port admin listener) on one
registry (data/registry: the full-data model copied from the models worktree, plus a small
second model trained here, seed 2).  In order:

1. baseline: k6 on instance 1's /v1/score at the contract's ramp, no swaps;
2. swaps: the same run with 20 promotions and rollbacks alternating between the two versions,
   while a separate client checks, on instance 1, that every answer names one of the two versions
   and that its probability is that version's (LightGBM's own prediction from model.txt, 1e-6);
3. shadow off, then on (the other version as a shadow), back to back, and the shadow counters;
4. memory: both instances' RSS before and after 200 swaps (promote/rollback + POST /admin/reload);
5. A/B at 10 %: ``--ids`` distinct customer ids on both instances (the candidate's share, both
   instances agree), 10 repeats of a subset, then both instances restarted and the same again;
6. a damaged version in the pointer: refused by both instances, which keep serving.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import lightgbm
import numpy as np
import orjson

from _common import ROOT, dev_entries, fraudscore, free_port, loadtest, machine, proc_status
from fraudscore.contract.vectorize import vectorize
from fraudscore.models.live import CANDIDATE, arm_of
from fraudscore.models.registry import MODEL_FILE, POINTER, Registry, write_json_atomic
from fraudscore.stack.runner import wait_ready

FULL_REGISTRY = ROOT.parent / "models" / "data" / "registry"
REGISTRY = ROOT / "data" / "registry"
SWAPS = 20
MEMORY_SWAPS = 200
REPEATS = 10
CHECK_INTERVAL = 0.05  # the checking client's pace: ~20 req/s beside k6, in every run alike


class Instance:
    def __init__(self, registry: Path) -> None:
        self.registry = registry
        self.port = free_port()
        self.admin_port = free_port()
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            fraudscore(
                "serve",
                "--port",
                str(self.port),
                "--registry",
                str(self.registry),
                "--metrics-port",
                str(self.admin_port),
                log_level="INFO",
            ),
            stderr=subprocess.DEVNULL,
        )
        wait_ready(f"http://127.0.0.1:{self.port}", process=self.proc)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)

    def admin(self, method: str, path: str) -> Any:
        c = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=30)
        c.request(method, path)
        r = c.getresponse()
        body = r.read()
        c.close()
        return json.loads(body) if path.startswith("/admin") else body.decode()

    def rss_kib(self) -> int:
        return int(proc_status(self.proc.pid)["VmRSS"].split()[0])


def prepare() -> tuple[str, str]:
    """data/registry with the full-data model (A) and a small second model (B)."""
    if not REGISTRY.exists():
        shutil.copytree(FULL_REGISTRY, REGISTRY)
    registry = Registry(REGISTRY)
    models = [v for v in registry.versions() if registry.meta(v).get("kind") == "model"]
    if len(models) < 2:
        sys.path.insert(0, str(ROOT))
        from tests.models_support import SMALL_CONFIG, small_references

        from fraudscore.models.train import train

        train(small_references(), registry, config=dataclasses.replace(SMALL_CONFIG, seed=2), progress=False)
        models = [v for v in registry.versions() if registry.meta(v).get("kind") == "model"]
    a, b = models[0], models[1]
    registry.abort()
    registry.promote(a)
    return a, b


def post_all(port: int, payloads: list[bytes]) -> list[dict[str, Any]]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    out = []
    for body in payloads:
        c.request("POST", "/v1/score", body=body)
        r = c.getresponse()
        data = r.read()
        if r.status != 200:
            raise AssertionError(f"HTTP {r.status}: {data[:200]!r}")
        out.append(orjson.loads(data))
    c.close()
    return out


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if (line.startswith(name + "{") or line.startswith(name + " ")) and all(
            f'{k}="{v}"' in line for k, v in labels.items()
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", type=float, default=900.0, help="req/s at the end of the ramp")
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--ids", type=int, default=100_000, help="distinct customer ids of the A/B check")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "lifecycle")
    parser.add_argument("--pairs", type=int, default=1, help="baseline + swaps runs, alternating")
    parser.add_argument(
        "--parts",
        default="swaps,shadow,memory,ab,damaged",
        help="which parts to run, comma-separated (default: %(default)s)",
    )
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    a, b = prepare()
    registry = Registry(REGISTRY)
    entries = dev_entries()
    sample = [e["request"] for e in entries[:50]]
    sample_bodies = [orjson.dumps(p) for p in sample]
    vectors = np.array([vectorize(p) for p in sample])
    expected = {
        v: lightgbm.Booster(model_file=str(REGISTRY / "versions" / v / MODEL_FILE)).predict(vectors)
        for v in (a, b)
    }
    report: dict[str, Any] = {"machine": machine(), "versions": [a, b], "target": args.target}
    instances = [Instance(REGISTRY), Instance(REGISTRY)]
    first = instances[0]
    url = f"http://127.0.0.1:{first.port}"
    try:
        if "swaps" in parts:
            # 1-2. baseline and swaps, alternating, each with the same checking client beside k6
            checked: dict[str, Any] = {
                "answers": 0,
                "bad_version": 0,
                "bad_probability": 0,
                "by_version": {a: 0, b: 0},
            }

            def check(stop: threading.Event) -> None:
                """One sample request every CHECK_INTERVAL: its version is A or B, its probability
                that version's own (LightGBM's prediction from its model.txt)."""
                c = http.client.HTTPConnection("127.0.0.1", first.port, timeout=30)
                i = 0
                while not stop.is_set():
                    i = (i + 1) % len(sample_bodies)
                    c.request("POST", "/v1/score", body=sample_bodies[i])
                    r = c.getresponse()
                    answer = orjson.loads(r.read())
                    checked["answers"] += 1
                    version = answer["decided_by"]["version"] if r.status == 200 else None
                    if version not in (a, b):
                        checked["bad_version"] += 1
                    else:
                        checked["by_version"][version] += 1
                        if abs(answer["model"]["probability"] - expected[version][i]) > 1e-6:
                            checked["bad_probability"] += 1
                    time.sleep(CHECK_INTERVAL)
                c.close()

            def swap(stop: threading.Event) -> None:
                pause = args.duration / (SWAPS + 2)
                for i in range(SWAPS):
                    if stop.wait(pause):
                        return
                    if i % 2 == 0:
                        registry.promote(b)
                    else:
                        registry.rollback()

            def run(name: str, swaps: bool) -> dict[str, Any]:
                stop = threading.Event()
                threads = [threading.Thread(target=check, args=(stop,))]
                if swaps:
                    threads.append(threading.Thread(target=swap, args=(stop,)))
                before = [i.admin("GET", "/admin/status")["swaps"] for i in instances]
                for t in threads:
                    t.start()
                result = loadtest(
                    url, args.target, args.duration, args.out / name, chart=False, path="/v1/score"
                )
                stop.set()
                for t in threads:
                    t.join()
                after = [i.admin("GET", "/admin/status")["swaps"] for i in instances]
                row = {
                    "run": name,
                    "latency_ms": result["latency_ms"],
                    "counts": result["counts"],
                    "requests": result["requests"],
                    "dropped_iterations": result["dropped_iterations"],
                    "swaps_seen": [y - x for x, y in zip(before, after, strict=True)],
                }
                print(json.dumps(row), flush=True)
                return row

            runs = []
            for n in range(args.pairs):
                runs.append(run(f"baseline-{n + 1}", swaps=False))
                runs.append(run(f"swaps-{n + 1}", swaps=True))
            report["swaps"] = {"runs": runs, "checked": checked}
            print(json.dumps(checked), flush=True)

        if "shadow" in parts:
            # 3. shadow off, then on
            registry.abort()
            off = loadtest(
                url, args.target, args.duration, args.out / "shadow-off", chart=False, path="/v1/score"
            )
            shadow = a if registry.production() == b else b
            registry.add_shadow(shadow)
            time.sleep(1.5)
            on = loadtest(
                url, args.target, args.duration, args.out / "shadow-on", chart=False, path="/v1/score"
            )
            text = first.admin("GET", "/metrics")
            report["shadow"] = {
                "off": {"latency_ms": off["latency_ms"], "counts": off["counts"]},
                "on": {"latency_ms": on["latency_ms"], "counts": on["counts"]},
                "p99_on_vs_off": on["latency_ms"]["p99"] / off["latency_ms"]["p99"],
                "scored": metric(text, "fraudscore_shadow_scored_total", version=shadow),
                "disagreed": metric(text, "fraudscore_shadow_disagreements_total", version=shadow),
                "dropped": metric(text, "fraudscore_shadow_dropped_total"),
            }
            print(json.dumps(report["shadow"]), flush=True)
            registry.abort()

        if "memory" in parts:
            # 4. memory over 200 swaps
            for i in instances:
                i.admin("POST", "/admin/reload")
            before = [i.rss_kib() for i in instances]
            results: dict[str, int] = {}
            for _ in range(MEMORY_SWAPS):
                registry.promote(b if registry.production() == a else a)
                for i in instances:
                    result = i.admin("POST", "/admin/reload")["result"]
                    results[result] = results.get(result, 0) + 1
            after = [i.rss_kib() for i in instances]
            report["memory"] = {"rss_kib_before": before, "rss_kib_after": after, "reload_results": results}
            print(json.dumps(report["memory"]), flush=True)

        if "ab" in parts:
            # 5. A/B
            registry.promote(a)
            registry.promote_candidate(b, 10)
            for i in instances:
                i.admin("POST", "/admin/reload")
            template = sample[0]
            ids = [f"cust-{n:07d}" for n in range(args.ids)]

            def arms_of(instance: Instance, some: list[str]) -> list[str]:
                bodies = [
                    orjson.dumps({**template, "customer": {**template["customer"], "id": c}}) for c in some
                ]
                return [x["decided_by"]["arm"] for x in post_all(instance.port, bodies)]

            subset = ids[:2000]
            ab: dict[str, Any] = {}
            first_arms: list[str] | None = None
            for phase in ("before restart", "after restart"):
                if phase == "after restart":
                    for i in instances:
                        i.stop()
                        i.start()
                for n, instance in enumerate(instances):
                    every = arms_of(instance, ids)
                    repeats = [arms_of(instance, subset) for _ in range(REPEATS)]
                    first_arms = first_arms or every
                    ab[f"{phase}, instance {n + 1}"] = {
                        "share": every.count(CANDIDATE) / len(every),
                        "same_as_first_pass": every == first_arms,
                        "matches_arm_of": every == [arm_of(c, b, 10) for c in ids],
                        "repeats_stable": all(r == every[: len(subset)] for r in repeats),
                    }
                    print(phase, n + 1, json.dumps(ab[f"{phase}, instance {n + 1}"]), flush=True)
            report["ab"] = ab
            registry.abort()

        if "damaged" in parts:
            # 6. a damaged version in the pointer: a copy of B under a new name (so no instance
            # holds it in memory already), its model.txt changed after the promotion's check
            pointer = json.loads((REGISTRY / POINTER).read_text())
            serving = registry.production()
            damaged = f"{b}-damaged"
            directory = REGISTRY / "versions" / damaged
            shutil.copytree(REGISTRY / "versions" / b, directory)
            for f in directory.iterdir():
                f.chmod(stat.S_IRUSR | stat.S_IWUSR)
            meta = json.loads((directory / "meta.json").read_text())
            (directory / "meta.json").write_text(json.dumps({**meta, "version": damaged}))
            model = (directory / MODEL_FILE).read_bytes()
            (directory / MODEL_FILE).write_bytes(model.replace(b"leaf_value=", b"leaf_value=1", 1))
            try:
                write_json_atomic(
                    REGISTRY / POINTER, {**pointer, "production": damaged, "history": [serving]}
                )
                time.sleep(2)
                answers = {
                    i.port: {x["decided_by"]["version"] for x in post_all(i.port, sample_bodies)}
                    for i in instances
                }
                status = [i.admin("GET", "/admin/status") for i in instances]
                report["damaged"] = {
                    "version": damaged,
                    "serving_before": serving,
                    "answered_by": {str(k): sorted(v) for k, v in answers.items()},
                    "failures": [s["failures"][-1:] for s in status],
                }
            finally:
                write_json_atomic(REGISTRY / POINTER, pointer)
                shutil.rmtree(directory)
            print(json.dumps(report["damaged"]), flush=True)

    finally:
        for i in instances:
            i.stop()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lifecycle.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
