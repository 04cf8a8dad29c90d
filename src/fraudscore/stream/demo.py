"""``fraudscore demo``: the whole pipeline on this machine, watched live.

It starts a private redis-server (a unix socket in a temporary directory; or uses ``--redis``),
``fraudscore worker --workers N``, and a producer that publishes generated events at the pace
of a rate shape, and prints the monitor's line every interval until every event is scored or
dead-lettered.  Then it stops the workers with SIGTERM (they finish their batch), stops Redis,
and prints a summary.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fraudscore.errors import TransientError, UsageError
from fraudscore.stream.generate import RateShape, generate, raw
from fraudscore.stream.monitor import Snapshot, line, snapshot
from fraudscore.stream.produce import publish_paced
from fraudscore.stream.worker import connect, prepare, wait_until_answering

START_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class DemoConfig:
    events: int
    shape: RateShape
    workers: int
    partitions: int
    index: Path
    interval: float = 1.0
    redis_url: str | None = None  # None: a private redis-server
    timeout: float = 600.0  # give up when the events are not all done by then


def _start_redis(directory: Path) -> tuple[subprocess.Popen[bytes], str]:
    server = shutil.which("redis-server")
    if server is None:
        raise UsageError("redis-server is not installed: install Redis 7, or pass --redis URL")
    sock = directory / "redis.sock"
    argv = [server, "--port", "0", "--unixsocket", str(sock), "--dir", str(directory), "--save", ""]
    proc = subprocess.Popen([*argv, "--appendonly", "no"], stdout=subprocess.DEVNULL)
    url = f"unix://{sock}"
    client = connect(url)
    try:
        wait_until_answering(client, START_TIMEOUT_S, proc)
    except TransientError:
        proc.kill()
        raise TransientError(f"redis-server did not start in {directory}") from None
    finally:
        client.close()
    return proc, url


def run(config: DemoConfig, log_level: str = "WARNING") -> Snapshot:
    """Run the demo; the final snapshot."""
    directory = Path(tempfile.mkdtemp(prefix="fs-demo-"))
    server = None
    workers = None
    try:
        if config.redis_url is None:
            server, url = _start_redis(directory)
        else:
            url = config.redis_url
        client = connect(url)
        prepare(client, config.partitions)
        before = snapshot(client, config.partitions)
        argv = [sys.executable, "-m", "fraudscore.cli", "--log-level", log_level, "worker", "--redis", url]
        argv += ["--partitions", str(config.partitions), "--index", str(config.index)]
        workers = subprocess.Popen([*argv, "--workers", str(config.workers)])

        raws = [raw(e) for e in generate(config.events, customers=max(50, config.events // 50))]
        producer = threading.Thread(
            target=publish_paced, args=(connect(url), raws, config.partitions, config.shape), daemon=True
        )
        producer.start()
        previous = None
        deadline = time.monotonic() + config.timeout
        while True:
            time.sleep(config.interval)
            current = snapshot(client, config.partitions)
            print(line(previous, current), flush=True)
            previous = current
            finished = ("scored", "dead")
            done = sum(current.total(name) - before.total(name) for name in finished)
            if done >= config.events and not producer.is_alive():
                break
            if workers.poll() is not None:
                raise TransientError(f"the workers stopped (exit status {workers.returncode})")
            if time.monotonic() > deadline:
                raise TransientError(f"{done} of {config.events} events done in {config.timeout:.0f} s")
        scored = current.total("scored") - before.total("scored")
        dead = current.total("dead") - before.total("dead")
        print(f"demo: {config.events} events published, {scored} scored, {dead} dead-lettered", flush=True)
        return current
    finally:
        if workers is not None and workers.poll() is None:
            workers.send_signal(signal.SIGTERM)
            try:
                workers.wait(30)
            except subprocess.TimeoutExpired:
                workers.kill()
                workers.wait()
        if server is not None:
            server.terminate()
            server.wait()
        shutil.rmtree(directory, ignore_errors=True)
