"""One instance over HTTP: the contract's k6 ramp (scaled to 1,000 req/s), and its memory.

    python bench/http_single.py [--target 1000] [--duration 120] [--no-fast-path] [--no-chart]
                                [--path /v1/score] [--registry DIR]

Starts `fraudscore serve` on a free port, waits for /ready, runs `fraudscore loadtest --cycle`
against it (the dev payloads, reused once exhausted, so the ramp reaches its target), then reads
the instance's peak resident memory (VmHWM) and CPU time from /proc.  ``--path /v1/score`` drives
the models' endpoint instead of the contract's; ``--registry`` is passed to the server (without it
the server finds its default registry itself).
"""

from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path

from _common import ROOT, cpu_seconds, fraudscore, free_port, loadtest, machine, proc_status
from fraudscore.defaults import SCORE_PATH
from fraudscore.loadtest.profile import DURATION_S
from fraudscore.stack.runner import wait_ready


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", type=float, default=1000.0, help="req/s at the end of the ramp")
    parser.add_argument("--duration", type=float, default=DURATION_S)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "http-single")
    parser.add_argument(
        "--no-fast-path", action="store_true", help="serve every request through httptools and Python"
    )
    parser.add_argument("--no-chart", action="store_true", help="k6 without per-request samples")
    parser.add_argument("--path", default=SCORE_PATH, help="the endpoint k6 posts to (default: %(default)s)")
    parser.add_argument("--registry", type=Path, help="the server's --registry")
    args = parser.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    extra = ["--no-fast-path"] if args.no_fast_path else []
    if args.registry is not None:
        extra += ["--registry", str(args.registry)]
    server = subprocess.Popen(fraudscore("serve", "--port", str(port), *extra))
    try:
        ready = wait_ready(url)
        rss_ready = proc_status(server.pid)["VmRSS"]
        result = loadtest(url, args.target, args.duration, args.out, chart=not args.no_chart, path=args.path)
        status = proc_status(server.pid)
        cpu = cpu_seconds(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=15)
    latency = result["latency_ms"]
    assert isinstance(latency, dict)
    print(f"machine: {machine()}; fast path {'off' if args.no_fast_path else 'on'}; {args.path}")
    print(f"ready {ready:.2f} s after start ({time.monotonic() - started:.0f} s total run)")
    print(f"memory: VmRSS at ready {rss_ready}, peak VmHWM {status['VmHWM']}")
    print(f"requests {result['requests']}, CPU {cpu:.1f} s in the server")
    print("latency ms: " + "  ".join(f"{k} {latency[k]:.3f}" for k in ("p50", "p90", "p99", "max")))
    print(f"counts: {result['counts']}")
    print(f"score: {result['score']}")


if __name__ == "__main__":
    main()
