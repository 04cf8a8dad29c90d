"""One instance over HTTP: the contract's k6 ramp (scaled to 1,000 req/s), and its memory.

    python bench/http_single.py [--target 1000] [--duration 120]

Starts `fraudscore serve` on a free port, waits for /ready, runs `fraudscore loadtest --cycle`
against it (the dev payloads, reused once exhausted, so the ramp reaches its target), then reads
the instance's peak resident memory (VmHWM) and CPU time from /proc.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from _common import DEV_DATA, INDEX, ROOT, machine

CONTRACT_TARGET = 900.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_ready(url: str, timeout: float = 30.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            with urllib.request.urlopen(f"{url}/ready", timeout=1) as r:
                if r.status == 200:
                    return time.monotonic() - start
        except OSError:
            time.sleep(0.01)
    raise TimeoutError(url)


def proc_status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def cpu_seconds(pid: int) -> float:
    parts = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(parts[11]) + int(parts[12])  # utime + stime
    return ticks / 100.0


def loadtest(url: str, target: float, duration: float, out: Path) -> dict[str, object]:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "fraudscore.cli",
            "loadtest",
            "--url",
            url,
            "--data",
            str(DEV_DATA),
            "--rate-multiplier",
            f"{target / CONTRACT_TARGET:.6f}",
            "--duration",
            str(duration),
            "--cycle",
            "--out",
            str(out),
        ],
        check=True,
    )
    result: dict[str, object] = json.loads((out / "result.json").read_text())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", type=float, default=1000.0, help="req/s at the end of the ramp")
    parser.add_argument("--duration", type=float, default=120.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "http-single")
    args = parser.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fraudscore.cli",
            "--log-level",
            "WARNING",
            "serve",
            "--index",
            str(INDEX),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
    )
    try:
        ready = wait_ready(url)
        rss_ready = proc_status(server.pid)["VmRSS"]
        result = loadtest(url, args.target, args.duration, args.out)
        status = proc_status(server.pid)
        cpu = cpu_seconds(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=15)
    latency = result["latency_ms"]
    assert isinstance(latency, dict)
    print(f"machine: {machine()}")
    print(f"ready {ready:.2f} s after start ({time.monotonic() - started:.0f} s total run)")
    print(f"memory: VmRSS at ready {rss_ready}, peak VmHWM {status['VmHWM']}")
    print(f"requests {result['requests']}, CPU {cpu:.1f} s in the server")
    print("latency ms: " + "  ".join(f"{k} {latency[k]:.3f}" for k in ("p50", "p90", "p99", "max")))
    print(f"counts: {result['counts']}")
    print(f"score: {result['score']}")


if __name__ == "__main__":
    main()
