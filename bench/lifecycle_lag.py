"""How late a waiting thread gets the GIL back while model versions load in another thread.

    python bench/lifecycle_lag.py [--switch SECONDS] [--loads 10] [--form binary|text]

Stands in for the event loop: the main thread sleeps 0.5 ms again and again and records how much
later than asked it wakes up, while a thread swaps between the first two model versions of
data/registry ``--loads`` times through ``LiveModels.refresh`` (validate, read, build).  Then the
same naps for as long again with no loads: the lag the machine gives anyway.

The two versions are copied into a scratch registry first (data/registry is left alone), as
``--form``: ``binary`` with forest.bin (compiled from model.txt when the version has none),
``text`` with model.txt alone (a version written before forest.bin, parsed at each load).  Each
swap rewrites the production pointer directly, as a promotion in another process (the CLI)
would: the loading thread does only what the instance does.  ``--switch 0`` keeps the
interpreter's default switch interval (5 ms) during loads; any other value is forced during each
load, overriding ``live.LOAD_SWITCH_INTERVAL``.  An instance keeps the meta.json of versions it
loaded recently, so swapping back and forth reads none after the first two loads; ``--cold``
has each load read its version's meta.json, as the first load of a new version does.

``--every SECONDS`` spaces the loads out (one every SECONDS, the naps running throughout): the
issue's load is 20 promotions or rollbacks a minute, ``--every 3``.  What then counts is the
lag's percentiles over the whole time, loads or not, beside the same time without loads.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import ROOT
from fraudscore.models import live
from fraudscore.models.live import LiveModels
from fraudscore.models.registry import META, MODEL_FILE, POINTER, VERSIONS, Registry, write_json_atomic

NAP = 0.0005
FOREST_FILE = "forest.bin"  # registry.FOREST_FILE, spelled here so the script also runs on older code


def scratch_copy(source: Registry, versions: list[str], root: Path, form: str) -> Registry:
    """``versions`` of ``source`` in a registry at ``root``, with or without forest.bin."""
    for version in versions:
        src, dst = source.version_dir(version), root / VERSIONS / version
        dst.mkdir(parents=True)
        meta = source.meta(version)
        shutil.copy(src / MODEL_FILE, dst / MODEL_FILE)
        files = {MODEL_FILE: meta["files"][MODEL_FILE]}
        if form == "binary":
            import hashlib

            from fraudscore.models.trees import compile_forest, parse_model

            text = (src / MODEL_FILE).read_bytes()
            forest = compile_forest(parse_model(text.decode(), src / MODEL_FILE), text)
            (dst / FOREST_FILE).write_bytes(forest)
            files[FOREST_FILE] = hashlib.sha256(forest).hexdigest()
        (dst / META).write_text(json.dumps({**meta, "files": files}, indent=2) + "\n")
    return Registry(root)


def naps(until: Callable[[], bool]) -> list[float]:
    """The wake-up lag of each 0.5 ms sleep, until ``until()``."""
    lags: list[float] = []
    while not until():
        started = time.perf_counter()
        time.sleep(NAP)
        lags.append(time.perf_counter() - started - NAP)
    return sorted(lags)


def summary(lags: list[float]) -> str:
    return (
        f"{len(lags)} naps, lag p50 {lags[len(lags) // 2] * 1e3:.3f} ms, "
        f"p99 {lags[int(len(lags) * 0.99)] * 1e3:.3f} ms, max {lags[-1] * 1e3:.3f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--switch", type=float, default=live.LOAD_SWITCH_INTERVAL)
    parser.add_argument("--loads", type=int, default=10)
    parser.add_argument("--form", choices=("binary", "text"), default="binary")
    parser.add_argument("--registry", type=Path, default=ROOT / "data" / "registry")
    parser.add_argument("--cold", action="store_true", help="keep no meta.json between loads")
    parser.add_argument("--every", type=float, default=0.0, help="seconds from one load to the next")
    args = parser.parse_args()
    live.LOAD_SWITCH_INTERVAL = args.switch or sys.getswitchinterval()
    if args.cold:
        live.RECENT_METAS = 0
    source = Registry(args.registry)
    versions = [v for v in source.versions() if source.meta(v).get("kind") == "model"][:2]
    with tempfile.TemporaryDirectory(prefix="lifecycle-lag-") as tmp:
        registry = scratch_copy(source, versions, Path(tmp), args.form)

        def point(version: str) -> None:
            write_json_atomic(registry.root / POINTER, {"production": version, "history": []})

        point(versions[0])
        models = LiveModels(registry)
        models.refresh()
        done = threading.Event()
        cpu: list[float] = []

        def load() -> None:
            first = time.perf_counter()
            for i in range(args.loads):
                time.sleep(max(0.0, first + i * args.every - time.perf_counter()))
                point(versions[(i + 1) % 2])
                started = time.thread_time()
                result: dict[str, Any] = models.refresh()
                cpu.append(time.thread_time() - started)
                assert result["result"] == "swapped", result
            time.sleep(args.every)  # the time after the last load counts too
            done.set()

        thread = threading.Thread(target=load)
        started = time.perf_counter()
        thread.start()
        loading = naps(done.is_set)
        seconds = time.perf_counter() - started
        thread.join()
        idle_until = time.perf_counter() + seconds
        idle = naps(lambda: time.perf_counter() >= idle_until)
    spacing = f" one every {args.every:g} s" if args.every else ""
    print(
        f"{args.form}{', cold' if args.cold else ''}, "
        f"switch interval during loads {live.LOAD_SWITCH_INTERVAL * 1e3:g} ms, "
        f"{args.loads} loads{spacing} in {seconds:.3f} s, "
        f"CPU per load median {statistics.median(cpu) * 1e3:.2f} ms (max {max(cpu) * 1e3:.2f})\n"
        f"  {'with loads: ' if args.every else 'during loads:'} {summary(loading)}\n"
        f"  no loads:     {summary(idle)}"
    )


if __name__ == "__main__":
    main()
