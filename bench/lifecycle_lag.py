"""How late a waiting thread gets the GIL back while model versions load in another thread.

    python bench/lifecycle_lag.py [--switch SECONDS] [--loads 10]

Stands in for the event loop: the main thread sleeps 0.5 ms again and again and records how much
later than asked it wakes up, while a thread swaps between the first two model versions of
data/registry ``--loads`` times through ``LiveModels.refresh`` (validate, parse, build).
``--switch 0`` keeps the interpreter's default switch interval (5 ms) during loads; any other
value is forced during each load, overriding ``live.LOAD_SWITCH_INTERVAL``.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

from _common import ROOT
from fraudscore.models import live
from fraudscore.models.live import LiveModels
from fraudscore.models.registry import Registry

NAP = 0.0005


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--switch", type=float, default=live.LOAD_SWITCH_INTERVAL)
    parser.add_argument("--loads", type=int, default=10)
    args = parser.parse_args()
    live.LOAD_SWITCH_INTERVAL = args.switch or sys.getswitchinterval()
    registry = Registry(ROOT / "data" / "registry")
    versions = [v for v in registry.versions() if registry.meta(v).get("kind") == "model"][:2]
    registry.promote(versions[0])
    models = LiveModels(registry)
    models.refresh()
    done = threading.Event()

    def load() -> None:
        for i in range(args.loads):
            registry.promote(versions[(i + 1) % 2])
            models.refresh()
        done.set()

    lags: list[float] = []
    thread = threading.Thread(target=load)
    thread.start()
    while not done.is_set():
        started = time.perf_counter()
        time.sleep(NAP)
        lags.append(time.perf_counter() - started - NAP)
    thread.join()
    lags.sort()
    print(
        f"switch interval during loads {live.LOAD_SWITCH_INTERVAL * 1e3:g} ms: {len(lags)} naps, "
        f"lag p50 {lags[len(lags) // 2] * 1e3:.3f} ms, p99 {lags[int(len(lags) * 0.99)] * 1e3:.3f} ms, "
        f"max {lags[-1] * 1e3:.3f} ms"
    )


if __name__ == "__main__":
    main()
