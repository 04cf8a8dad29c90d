"""``fraudscore pipeline demo``: the whole pipeline on this machine, watched live, then a report.

It starts a private redis-server (a unix socket in a temporary directory; or uses ``--redis``),
``fraudscore worker --workers N``, and a generator thread that publishes labelled events
(``generate_labelled``: a share made fraudulent on purpose) at the pace of a rate shape, once
the workers own every partition (so the latency is the pipeline's, not the workers' start).  Once
per interval it takes the monitor's snapshot (``stream.monitor``) and shows its line: rewritten
in place on a terminal, one line per interval otherwise (on stderr, so ``--json`` leaves stdout
to the report).  When every event is scored or dead-lettered it stops, in this order, also on
Ctrl-C or SIGTERM: the generator, the workers (SIGTERM: they finish their batch), Redis.  Then
the report (``stream.demo_report``), ``report.json`` and the chart in the output directory.

The children run in sessions of their own, so a Ctrl-C at the terminal reaches the demo only,
and the demo stops them in that order rather than all at once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from fraudscore.errors import TransientError, UsageError
from fraudscore.stream import demo_report
from fraudscore.stream.demo_report import Interval
from fraudscore.stream.events import Event
from fraudscore.stream.generate import RateShape, generate_labelled, raw
from fraudscore.stream.monitor import Decision, LatencyHistogram, Snapshot, line, snapshot
from fraudscore.stream.produce import publish_paced
from fraudscore.stream.worker import TRANSIENT_ERRORS, Client, connect, prepare, wait_until_answering

START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 30.0  # for the workers to finish their batch after SIGTERM
DRAIN_S = 120.0  # after the last event is due, how long the workers may take to catch up
MAX_SOCKET_PATH = 100  # bytes: a unix socket's path must fit sun_path (108 on Linux, with its NUL)
REPORT_NAME = "report.json"
CHART_NAME = "pipeline.png"


@dataclass(frozen=True)
class DemoConfig:
    events: int
    shape: RateShape
    workers: int
    partitions: int
    index: Path
    out: Path  # report.json, and the chart unless ``chart`` says elsewhere
    chart: Path | None  # None: no chart
    interval: float = 1.0
    redis_url: str | None = None  # None: a private redis-server
    seed: int = 0
    fraud_share: float = 0.02
    log_level: str = "WARNING"
    registry: Path | None = None  # the workers score with its live versions (an A/B split too)


def events_within(shape: RateShape, seconds: float) -> int:
    """How many events ``shape`` schedules in its first ``seconds`` (at least one).

    >>> events_within(RateShape("constant", 50.0), 4.0)
    200
    """
    due = shape.schedule(int(shape.peak * seconds) + 1)
    return max(1, sum(t < seconds for t in due))


def check_redis(url: str) -> None:
    """A usable ``--redis``: a well-formed URL that answers PING now; else one clear error."""
    try:
        client = connect(url)
    except ValueError as exc:
        raise UsageError(f"--redis {_without_password(url)!r}: {exc}") from None
    try:
        client.ping()
    except TRANSIENT_ERRORS as exc:
        raise TransientError(f"--redis {_without_password(url)}: Redis does not answer: {exc}") from None
    finally:
        client.close()


def _start_redis(directory: Path) -> tuple[subprocess.Popen[bytes], str]:
    server = shutil.which("redis-server")
    if server is None:
        raise UsageError("redis-server is not installed: run `make system-deps`, or pass --redis URL")
    sock = directory / "redis.sock"
    argv = [server, "--port", "0", "--unixsocket", str(sock), "--dir", str(directory), "--save", ""]
    proc = subprocess.Popen([*argv, "--appendonly", "no"], stdout=subprocess.DEVNULL, start_new_session=True)
    url = f"unix://{sock}"
    client = connect(url)
    try:
        wait_until_answering(client, START_TIMEOUT_S, proc)
    except TransientError:
        proc.kill()
        proc.wait()
        raise TransientError(f"redis-server did not start in {directory}") from None
    finally:
        client.close()
    return proc, url


def _without_password(url: str) -> str:
    """``url`` as the report may show it: a password in it becomes ``***``.

    >>> _without_password("redis://:secret@db:6379/0"), _without_password("unix:///tmp/r.sock")
    ('redis://:***@db:6379/0', 'unix:///tmp/r.sock')
    """
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _arms(registry: Path | None, events: list[Event]) -> dict[str, str]:
    """The A/B arm of each event sent to the registry's candidate, by the split the workers use
    (``models.live.arm_of`` of the customer); the others are production."""
    if registry is None:
        return {}
    from fraudscore.models.live import CANDIDATE, arm_of
    from fraudscore.models.registry import Registry

    candidate = Registry(registry).candidate()
    if candidate is None:
        return {}
    version, share = candidate
    return {e.event_id: CANDIDATE for e in events if arm_of(e.customer_id, version, share) == CANDIDATE}


def _wait_for_workers(client: Client, partitions: int, workers: subprocess.Popen[bytes]) -> Snapshot:
    """The first snapshot in which the workers own every partition: the generator starts then, so
    the latency measured is the pipeline's, not the workers' start."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        now = snapshot(client, partitions)
        if all(p.owner is not None for p in now.partitions):
            return now
        if workers.poll() is not None:
            raise TransientError(f"the workers stopped (exit status {workers.returncode})")
        if time.monotonic() > deadline:
            raise TransientError(f"the workers did not take the partitions within {START_TIMEOUT_S:g} s")
        time.sleep(0.05)


class _Generator(threading.Thread):
    """``publish_paced`` in a thread, stoppable, keeping its error for the main thread."""

    def __init__(self, client: Client, raws: list[bytes], partitions: int, shape: RateShape) -> None:
        super().__init__(name="generator", daemon=True)
        self.args = (client, raws, partitions, shape)
        self.halt = threading.Event()
        self.error: BaseException | None = None
        self.started_at = 0.0

    def run(self) -> None:
        self.started_at = time.monotonic()
        try:
            publish_paced(*self.args, stop=self.halt)
        except BaseException as exc:  # shown by the main thread, as one line
            self.error = exc


class _Progress:
    """The monitor's line per interval: rewritten in place on a terminal, appended otherwise."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.pending = False  # a line shown in place, not yet ended

    def show(self, text: str) -> None:
        if self.tty:  # cut to the terminal's width: a wrapped line could not be rewritten
            width = shutil.get_terminal_size().columns
            self.stream.write("\r\x1b[K" + text[: max(20, width - 1)])
            self.pending = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self.pending:
            self.stream.write("\n")
            self.stream.flush()
            self.pending = False


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run(config: DemoConfig, progress_to: TextIO = sys.stderr) -> dict[str, Any]:
    """Run the demo; its report (also written to ``config.out``/report.json)."""
    events, frauds = generate_labelled(
        config.events,
        customers=max(50, config.events // 50),
        seed=config.seed,
        fraud_share=config.fraud_share,
    )
    raws = [raw(e) for e in events]
    due = config.shape.schedule(len(raws))
    directory = Path(tempfile.mkdtemp(prefix="fs-demo-"))
    if len(str(directory / "redis.sock")) > MAX_SOCKET_PATH:  # a long $TMPDIR: /tmp instead
        directory.rmdir()
        directory = Path(tempfile.mkdtemp(prefix="fs-demo-", dir="/tmp"))
    server: subprocess.Popen[bytes] | None = None
    workers: subprocess.Popen[bytes] | None = None
    generator: _Generator | None = None
    client: Client | None = None
    progress = _Progress(progress_to)
    previous_int = signal.getsignal(signal.SIGINT)
    previous_term = signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM stops the demo as Ctrl-C does
    try:
        if config.redis_url is None:
            server, url = _start_redis(directory)
        else:
            url = config.redis_url
        client = connect(url)
        prepare(client, config.partitions)
        argv = [sys.executable, "-m", "fraudscore.cli", "--log-level", config.log_level, "worker"]
        argv += ["--redis", url, "--partitions", str(config.partitions), "--index", str(config.index)]
        if config.registry is not None:
            argv += ["--registry", str(config.registry)]
        workers = subprocess.Popen([*argv, "--workers", str(config.workers)], start_new_session=True)

        before = _wait_for_workers(client, config.partitions, workers)  # counters, results' cursor
        generator = _Generator(connect(url), raws, config.partitions, config.shape)
        generator.start()
        series: list[Interval] = []
        histograms: list[LatencyHistogram] = []
        decisions: list[Decision] = []
        previous = before
        start = time.monotonic()  # the generator's start: within a few ms of this
        deadline = start + (due[-1] if due else 0.0) + DRAIN_S
        tick = time.monotonic()
        while True:
            tick += config.interval  # on a fixed grid: the snapshots' own time does not add up
            time.sleep(max(0.0, tick - time.monotonic()))
            current = snapshot(client, config.partitions, since=previous, limit=None)
            if generator.started_at:
                start = generator.started_at
            point = demo_report.interval(previous, current, start, due)
            series.append(point)
            histograms.append(current.latency)
            decisions += current.decisions
            progress.show(
                f"{point.t_s:6.1f} s, target {point.target_per_s:,.0f}/s: {line(previous, current)}"
            )
            previous = current
            if generator.error is not None:
                raise TransientError(f"the generator stopped: {generator.error}")
            published = current.total("published") - before.total("published")
            done = sum(current.total(name) - before.total(name) for name in ("scored", "dead"))
            if not generator.is_alive() and done >= published:
                break
            if workers.poll() is not None:
                raise TransientError(f"the workers stopped (exit status {workers.returncode})")
            if time.monotonic() > deadline:
                raise TransientError(
                    f"{done} of {config.events} events done {DRAIN_S:.0f} s after the last was due"
                )
        progress.done()
        report = demo_report.build(
            events=len(raws),
            published=published,
            scored=current.total("scored") - before.total("scored"),
            dead=current.total("dead") - before.total("dead"),
            due=due,
            series=series,
            histograms=histograms,
            decisions=decisions,
            frauds=frauds,
            arms=_arms(config.registry, events),
            shape={"shape": config.shape.shape, "peak": config.shape.peak, "period": config.shape.period},
            redis="private redis-server" if server is not None else _without_password(url),
            chart=config.chart,
        )
    except TRANSIENT_ERRORS as exc:  # Redis went away, or stopped answering
        progress.done()
        where = _without_password(config.redis_url) if config.redis_url else "the private redis-server"
        raise TransientError(f"Redis ({where}): {exc}") from None
    except BaseException:
        progress.done()  # the error's line after the progress line, not on it
        raise
    finally:
        # a second Ctrl-C or SIGTERM must not cut the stop short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        interrupted = isinstance(sys.exc_info()[1], KeyboardInterrupt)
        try:
            stopped = _stop(generator, workers, server)
            if interrupted:
                print(f"pipeline demo: interrupted; stopped {stopped}", file=sys.stderr)
        finally:
            signal.signal(signal.SIGINT, previous_int)
            signal.signal(signal.SIGTERM, previous_term)
            if client is not None:
                client.close()
            shutil.rmtree(directory, ignore_errors=True)
    config.out.mkdir(parents=True, exist_ok=True)
    (config.out / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    if config.chart is not None:
        demo_report.write_chart(report, config.chart)
    return report


def _stop(
    generator: _Generator | None,
    workers: subprocess.Popen[bytes] | None,
    server: subprocess.Popen[bytes] | None,
) -> str:
    """Stop what was started, in order: the generator, the workers (SIGTERM, then KILL), Redis;
    what was stopped, in that order, and how each ended."""
    done = []
    if generator is not None:
        generator.halt.set()
        generator.join(5.0)
        done.append("the generator" + (" (still sending)" if generator.is_alive() else ""))
    if workers is not None:
        if workers.poll() is None:
            workers.send_signal(signal.SIGTERM)
            try:
                workers.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:  # the supervisor and its worker processes: one group
                os.killpg(workers.pid, signal.SIGKILL)
                workers.wait()
        done.append(f"the workers (exit status {workers.returncode})")
    if server is not None:
        # Redis must outlive the workers: they finish their batch against it
        early = server.poll()
        if early is None:
            server.terminate()
            server.wait()
        done.append("redis-server" + ("" if early is None else f" (gone before the workers: status {early})"))
    return ", then ".join(done) or "nothing"
