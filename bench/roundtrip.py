"""Round trips through the running stack with a plain socket client: how much of k6's latency is ours.

    python bench/roundtrip.py [--requests 2000] [--lb builtin|nginx|haproxy]
                              [--native-loop | --no-native-loop]

Starts `fraudscore stack` (limits as in the compose file), then from this process, one request at
a time: requests on one keep-alive connection, and requests each on a new connection (connect,
then the first request, which the balancer hands over).  The client is a blocking socket and
nothing else runs, so the figures are the stack's own latency plus one loopback round trip.
It also prints the instances' CPU time (all their threads, from /proc) per keep-alive request,
and from their metrics the mean time inside the server (read to answer) and of the search.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from _common import ROOT, fraudscore, free_port, machine, scoring_request
from fraudscore.loadtest.results import percentile
from fraudscore.stack.runner import wait_ready
from stack import stack_processes


def exchange(sock: socket.socket, request: bytes) -> None:
    sock.sendall(request)
    answer = sock.recv(4096)
    if not answer.startswith(b"HTTP/1.1 200"):
        raise SystemExit(f"unexpected answer: {answer[:80]!r}")


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of these processes, every thread included (clock ticks, so coarse)."""
    ticks = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def native_means(metrics_port: int, instances: int) -> str:
    """The native answerer's mean read-to-answer and search times, over every instance."""
    sums: dict[str, float] = {}
    for i in range(instances):
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port + i}/metrics", timeout=5) as r:
            text = r.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.labels.get("answerer") == "native" and sample.name.endswith(("_sum", "_count")):
                    sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
    means = []
    for name in ("fraudscore_http_request_duration_seconds", "fraudscore_knn_search_duration_seconds"):
        count = sums.get(f"{name}_count", 0.0)
        means.append(sums.get(f"{name}_sum", 0.0) / count * 1e6 if count else float("nan"))
    read_to_answer, search = means
    return f"inside (native answerer, mean): read to answer {read_to_answer:.1f}, search {search:.1f} us"


def summary(name: str, micros: list[float]) -> str:
    micros.sort()
    p50, p90, p99 = (percentile(micros, q) for q in (50, 90, 99))
    return f"{name:34s} median {p50:6.0f}  p90 {p90:6.0f}  p99 {p99:6.0f} us"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000, help="of each kind")
    parser.add_argument("--lb", choices=["builtin", "nginx", "haproxy"], default="builtin")
    parser.add_argument(
        "--native-loop", action=argparse.BooleanOptionalAction, help="passed on to `fraudscore stack`"
    )
    args = parser.parse_args()

    request = scoring_request(json.loads((ROOT / "data" / "example-payloads.json").read_text())[0])
    port = free_port()
    metrics_port = free_port()  # instance i at metrics_port + i: likely free too, on a quiet range
    argv = fraudscore("stack", "--port", str(port), "--lb", args.lb, "--metrics-port", str(metrics_port))
    if args.native_loop is not None:
        argv.append("--native-loop" if args.native_loop else "--no-native-loop")
    stack = subprocess.Popen(argv)
    try:
        wait_ready(f"http://127.0.0.1:{port}", timeout=60)
        instances = [pid for name, pid in stack_processes(stack.pid).items() if name != "lb"]
        keep_alive, first = [], []
        with connect(port) as sock:
            cpu_before = cpu_seconds(instances)
            for _ in range(args.requests):
                t0 = time.perf_counter_ns()
                exchange(sock, request)
                keep_alive.append((time.perf_counter_ns() - t0) / 1000)
            cpu = cpu_seconds(instances) - cpu_before
        means = native_means(metrics_port, len(instances))
        for _ in range(args.requests):
            with connect(port) as sock:
                t0 = time.perf_counter_ns()
                exchange(sock, request)
                first.append((time.perf_counter_ns() - t0) / 1000)
    finally:
        stack.send_signal(signal.SIGTERM)
        stack.wait(timeout=60)
    native = {None: "default", True: "on", False: "off"}[args.native_loop]
    print(f"machine: {machine()}; balancer {args.lb}; native loop {native}; {args.requests} requests each")
    per_request = cpu / args.requests * 1e6
    print(f"instances' CPU per keep-alive request: {per_request:.0f} us (all threads; clock ticks)")
    print(means)
    print(summary("keep-alive connection", keep_alive))
    print(summary("first request on a new connection", first))


if __name__ == "__main__":
    main()
