"""The stream commands: ``fraudscore worker``, ``publish``, ``monitor`` and ``pipeline demo``.

``register(subparsers)`` adds them to the main parser (``fraudscore.cli``).  Redis and the
worker's modules are imported only when a stream command runs, so other commands start as fast
as before.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from fraudscore.errors import EXIT_CODES, Category, TransientError, UsageError
from fraudscore.flags import positive_float, positive_int

log = logging.getLogger("fraudscore.stream")

REDIS_URL_ENV = "FRAUDSCORE_REDIS_URL"
DEMO_OUT = "pipeline-demo"  # `pipeline demo`'s output directory
DEMO_EVENTS = 20000  # `pipeline demo`'s events without --events or --duration
RESTART_DELAY_S = 1.0  # before restarting a worker process that died


def _redis_url() -> str:
    from fraudscore.stream.worker import DEFAULT_REDIS_URL

    return os.environ.get(REDIS_URL_ENV, DEFAULT_REDIS_URL)


def _add_redis_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--redis",
        default=None,
        metavar="URL",
        help=f"redis:// or unix:// URL (default: env {REDIS_URL_ENV}, else redis://localhost:6379/0)",
    )
    p.add_argument(
        "--cluster", action="store_true", help="--redis is a node of a Redis Cluster (one slot per partition)"
    )
    p.add_argument(
        "--partitions",
        type=positive_int,
        default=8,
        help="partition streams; fixed in Redis by the first producer or worker (default: %(default)s)",
    )


def register(subparsers: Any) -> None:
    """Add ``worker``, ``publish``, ``monitor`` and ``pipeline`` to the command line's subparsers."""
    from fraudscore.cli import DEFAULT_INDEX, DEFAULT_REFERENCES
    from fraudscore.stream.keys import DEFAULT_BATCH

    w = subparsers.add_parser(
        "worker",
        help="score the event streams in Redis: features from Redis functions, one result per event",
        description="Consume {fs:p<i>}:events, derive each event's features atomically in Redis, score "
        "them in batches and write one result per event to {fs:p<i>}:results.",
    )
    _add_redis_options(w)
    w.add_argument("--index", type=Path, default=DEFAULT_INDEX, help="default: %(default)s")
    w.add_argument(
        "--references",
        type=Path,
        default=DEFAULT_REFERENCES,
        help="reference vectors, to build a missing index (default: %(default)s)",
    )
    w.add_argument(
        "--batch",
        type=positive_int,
        default=DEFAULT_BATCH,
        help="events per read per partition (default: %(default)s)",
    )
    w.add_argument(
        "--claim-idle-ms",
        type=positive_int,
        default=5000,
        help="a partition whose worker is silent this long is taken over, with its pending entries "
        "(XAUTOCLAIM) (default: %(default)s)",
    )
    w.add_argument(
        "--max-deliveries",
        type=positive_int,
        default=5,
        help="an event delivered more often goes to the dead-letter stream (default: %(default)s)",
    )
    w.add_argument("--workers", type=positive_int, default=1, help="worker processes (default: %(default)s)")
    w.add_argument("--group", default="scorers", help="consumer group (default: %(default)s)")
    w.add_argument(
        "--registry",
        type=Path,
        default=None,
        help="score with this model registry's live versions (production, A/B candidate), "
        "following its promotions without a restart (default: the exact kNN of --index)",
    )
    w.set_defaults(func=cmd_worker)

    p = subparsers.add_parser(
        "publish",
        help="publish raw events (JSON lines) to their partition streams",
        description="Each line of FILE is one raw event (see fraudscore.stream.events); it goes to "
        "its customer's partition stream.",
    )
    _add_redis_options(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("file", nargs="?", help="JSON lines of raw events; - for stdin")
    source.add_argument(
        "--generate", type=positive_int, metavar="N", help="publish N generated events instead"
    )
    p.add_argument("--seed", type=int, default=0, help="the generator's seed (default: %(default)s)")
    p.add_argument("--rate", type=float, help="events per second at the peak (default: as fast as possible)")
    p.add_argument(
        "--shape",
        choices=["constant", "ramp", "burst", "wave"],
        default="constant",
        help="how the rate varies over each period; never below a tenth of --rate (default: %(default)s)",
    )
    p.add_argument("--period", type=float, default=60.0, help="seconds per period of --shape (default: 60)")
    p.set_defaults(func=cmd_publish)

    m = subparsers.add_parser(
        "monitor",
        help="print the pipeline's rates, backlog, latency and approvals, once per interval",
        description="One line per interval, read from Redis: events published and scored per second, "
        "dead letters, pending and undelivered entries, partitions owned, enqueue-to-scored latency "
        "of the newest results, and the share approved.",
    )
    _add_redis_options(m)
    m.add_argument("--interval", type=float, default=1.0, help="seconds between lines (default: %(default)s)")
    m.add_argument("--count", type=positive_int, help="stop after this many lines (default: never)")
    m.add_argument("--group", default="scorers", help="consumer group (default: %(default)s)")
    m.set_defaults(func=cmd_monitor)

    pipeline = subparsers.add_parser(
        "pipeline",
        help="the stream pipeline as a whole (`pipeline demo`)",
        description="The stream pipeline as a whole: Redis, workers, a producer and the monitor together.",
    )
    actions = pipeline.add_subparsers(dest="pipeline_command", required=True, metavar="ACTION")
    d = actions.add_parser(
        "demo",
        help="the whole pipeline here: a private Redis, workers, a paced generator, the monitor; "
        "then a report and a chart",
        description="Start redis-server (unless --redis), `fraudscore worker --workers N` and a "
        "generator of events (a share of them fraudulent on purpose) at --rate/--shape; show the "
        "monitor's line every --interval until every event is done; stop the generator, the "
        "workers and Redis, in that order (also on Ctrl-C); then print a report (rates, "
        "enqueue-to-result latency, dead letters, decisions, precision and recall against the "
        "generator's frauds) and draw the rate and latency over time into a PNG chart.",
    )
    d.add_argument("--redis", metavar="URL", help="use this Redis instead of a private redis-server")
    d.add_argument("--partitions", type=positive_int, default=4, help="default: %(default)s")
    d.add_argument("--index", type=Path, default=DEFAULT_INDEX, help="default: %(default)s")
    size = d.add_mutually_exclusive_group()
    size.add_argument("--events", type=positive_int, help="events to generate (default: 20000)")
    size.add_argument(
        "--duration",
        type=positive_float,
        metavar="SECONDS",
        help="generate as many events as --rate/--shape schedule in this time, instead of --events",
    )
    d.add_argument("--workers", type=positive_int, default=2, help="default: %(default)s")
    d.add_argument(
        "--registry",
        type=Path,
        help="the workers score with this model registry's live versions, as `fraudscore worker "
        "--registry` (an A/B candidate's share too); the report gives each arm's decisions "
        "(default: the exact kNN of --index)",
    )
    d.add_argument("--rate", type=positive_float, default=1000.0, help="peak events/s (default: %(default)s)")
    d.add_argument(
        "--shape", choices=["constant", "ramp", "burst", "wave"], default="wave", help="default: %(default)s"
    )
    d.add_argument(
        "--period", type=positive_float, default=10.0, help="seconds per period (default: %(default)s)"
    )
    d.add_argument(
        "--interval",
        type=positive_float,
        default=1.0,
        help="seconds per point of the series (default: %(default)s)",
    )
    d.add_argument("--seed", type=int, default=0, help="the generator's seed (default: %(default)s)")
    d.add_argument(
        "--fraud-share",
        type=float,
        default=0.02,
        help="share of the events made fraudulent, the ground truth (default: %(default)s)",
    )
    d.add_argument(
        "--out",
        type=Path,
        default=Path(DEMO_OUT),
        metavar="DIR",
        help="where report.json and the chart go (default: %(default)s/)",
    )
    chart = d.add_mutually_exclusive_group()
    chart.add_argument("--chart", type=Path, metavar="PATH", help="the chart (default: DIR/pipeline.png)")
    chart.add_argument("--no-chart", action="store_true", help="draw no chart")
    d.add_argument(
        "--json", action="store_true", help="print the report as JSON (the progress stays on stderr)"
    )
    d.set_defaults(func=cmd_pipeline_demo)


def _client(args: argparse.Namespace) -> Any:
    from fraudscore.stream.worker import connect

    url = args.redis or _redis_url()
    try:
        return connect(url, getattr(args, "cluster", False))
    except ValueError as exc:
        raise UsageError(f"--redis {url!r}: {exc}") from None


def cmd_worker(args: argparse.Namespace) -> int:
    from fraudscore.cli import ensure_index
    from fraudscore.stream.worker import WorkerConfig

    config = WorkerConfig(
        redis_url=args.redis or _redis_url(),
        cluster=args.cluster,
        partitions=args.partitions,
        batch=args.batch,
        claim_idle_ms=args.claim_idle_ms,
        max_deliveries=args.max_deliveries,
        group=args.group,
    )
    _client(args)  # a malformed URL is a usage error now, not a retry loop later
    index = ensure_index(args.index, args.references)
    if args.workers == 1:
        from fraudscore.stream.worker import run_worker

        run_worker(config, index, registry=args.registry)
        return 0
    return _supervise(args, index)


def _child_argv(args: argparse.Namespace, index: Path) -> list[str]:
    argv = [sys.executable, "-m", "fraudscore.cli", "--log-level", args.log_level, "worker"]
    argv += ["--redis", args.redis or _redis_url(), "--partitions", str(args.partitions)]
    argv += ["--index", str(index), "--batch", str(args.batch), "--claim-idle-ms", str(args.claim_idle_ms)]
    argv += ["--max-deliveries", str(args.max_deliveries), "--group", args.group, "--workers", "1"]
    if args.cluster:
        argv.append("--cluster")
    if args.registry is not None:
        argv += ["--registry", str(args.registry)]
    return argv


def _supervise(args: argparse.Namespace, index: Path) -> int:
    """Run ``--workers`` worker processes; restart any that dies; pass SIGTERM/SIGINT on to them."""
    argv = _child_argv(args, index)
    children = [subprocess.Popen(argv) for _ in range(args.workers)]
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    bad_config = EXIT_CODES[Category.BAD_CONFIG]
    status = 0
    while True:
        alive = 0
        for i, child in enumerate(children):
            code = child.poll()
            if code is None:
                alive += 1
            elif not stopping and code == bad_config:
                stop(signal.SIGTERM, None)  # a configuration error: restarting cannot help
                status = code
            elif not stopping:
                log.warning("worker process %d exited with %d; restarting it", child.pid, code)
                time.sleep(RESTART_DELAY_S)
                children[i] = subprocess.Popen(argv)
                alive += 1
        if stopping and not alive:
            return status
        time.sleep(0.2)


def cmd_publish(args: argparse.Namespace) -> int:
    from fraudscore.stream.produce import publish, publish_paced
    from fraudscore.stream.worker import TRANSIENT_ERRORS, prepare

    client = _client(args)
    if args.generate:
        from fraudscore.stream.generate import generate, raw

        raws = [raw(event) for event in generate(args.generate, seed=args.seed)]
    elif args.file == "-":
        raws = [line.strip() for line in sys.stdin.buffer if line.strip()]
    else:
        try:
            raws = [line.strip() for line in Path(args.file).read_bytes().splitlines() if line.strip()]
        except OSError as exc:
            raise UsageError(f"{args.file}: {exc.strerror}") from None
    shape = None
    if args.rate is not None:
        from fraudscore.stream.generate import RateShape

        try:
            shape = RateShape(args.shape, args.rate, args.period)
        except ValueError as exc:
            raise UsageError(f"--rate/--period: {exc}") from None
    try:
        prepare(client, args.partitions)
        if shape is None:
            count = publish(client, raws, args.partitions)
        else:
            count = publish_paced(client, raws, args.partitions, shape)
    except TRANSIENT_ERRORS as exc:
        raise TransientError(f"--redis {args.redis or _redis_url()}: {exc}") from None
    print(f"published {count} events to {args.partitions} partitions")
    return 0


def cmd_monitor(args: argparse.Namespace) -> int:
    from fraudscore.stream.monitor import line, snapshot
    from fraudscore.stream.worker import TRANSIENT_ERRORS

    if not args.interval > 0:
        raise UsageError(f"--interval must be positive, got {args.interval}")
    client = _client(args)
    previous = None
    printed = 0
    while True:
        try:
            current = snapshot(client, args.partitions, args.group, since=previous)
        except TRANSIENT_ERRORS as exc:
            raise TransientError(f"--redis {args.redis or _redis_url()}: {exc}") from None
        print(line(previous, current), flush=True)
        printed += 1
        if args.count is not None and printed >= args.count:
            return 0
        previous = current
        time.sleep(args.interval)


def cmd_pipeline_demo(args: argparse.Namespace) -> int:
    from fraudscore.cli import DEFAULT_REFERENCES, ensure_index
    from fraudscore.loadtest.chart import check_available
    from fraudscore.stream import demo_report
    from fraudscore.stream.demo import CHART_NAME, REPORT_NAME, DemoConfig, check_redis, events_within, run
    from fraudscore.stream.generate import RateShape

    try:
        shape = RateShape(args.shape, args.rate, args.period)
    except ValueError as exc:
        raise UsageError(f"--rate/--period: {exc}") from None
    if not 0.0 <= args.fraud_share <= 1.0:
        raise UsageError(f"--fraud-share must be between 0 and 1, got {args.fraud_share}")
    chart = None if args.no_chart else (args.chart or args.out / CHART_NAME)
    if chart is not None:
        check_available()  # before the run, not after it
    if args.registry is not None and not args.registry.is_dir():
        raise UsageError(f"--registry {args.registry}: no such directory")
    if args.redis is not None:
        check_redis(args.redis)
    events = events_within(shape, args.duration) if args.duration is not None else args.events or DEMO_EVENTS
    config = DemoConfig(
        events=events,
        shape=shape,
        workers=args.workers,
        partitions=args.partitions,
        index=ensure_index(args.index, DEFAULT_REFERENCES),
        out=args.out,
        chart=chart,
        interval=args.interval,
        redis_url=args.redis,
        seed=args.seed,
        fraud_share=args.fraud_share,
        log_level=args.log_level,
        registry=args.registry,
    )
    report = run(config)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(demo_report.text(report))
        print(f"report: {args.out / REPORT_NAME}")
        if chart is not None:
            print(f"chart: {chart}")
    return 0
