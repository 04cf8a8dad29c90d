"""The stream commands: ``fraudscore worker``, ``publish``, ``generate``, ``monitor``, ``pipeline demo``.

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
RUN_PERIOD_S = 30.0  # `generate`: the longest period of a wave or spike
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
    """Add the stream commands to the command line's subparsers."""
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

    g = subparsers.add_parser(
        "generate",
        help="publish a run of generated events (a share fraudulent, the ground truth kept) at a "
        "rate shaped over time",
        description="Publish events of a population of customers (homes, habits, favourite "
        "merchants; --fraud-share of the events made fraudulent) to the partition streams at "
        "--rate events/s shaped by --shape, for --duration seconds. The run is registered in Redis "
        "({fs}:runs, {fs}:run:<ID>, the ids of its frauds in {fs}:run:<ID>:frauds) for "
        "`fraudscore monitor`; each event id is <ID>-<n>. wave and spike repeat every "
        f"min(--duration, {RUN_PERIOD_S:g}) s; random holds a level for a second, then steps.",
    )
    _add_redis_options(g)
    g.add_argument("--rate", type=positive_float, default=1000.0, help="peak events/s (default: %(default)g)")
    g.add_argument(
        "--duration", type=positive_float, default=60.0, metavar="S", help="seconds (default: %(default)g)"
    )
    g.add_argument(
        "--shape",
        choices=["constant", "wave", "spike", "random"],
        default="constant",
        help="how the rate varies; never below a tenth of --rate (default: %(default)s)",
    )
    g.add_argument("--customers", type=positive_int, default=10000, help="default: %(default)s")
    g.add_argument(
        "--fraud-share",
        type=_share,
        default=0.02,
        metavar="F",
        help="share of the events made fraudulent, 0 to 1 (default: %(default)s)",
    )
    g.add_argument("--seed", type=int, default=0, help="the population's and the shape's seed (default: 0)")
    g.add_argument("--run-id", metavar="ID", help="the run's id (default: run-<UTC time>-<random>)")
    g.set_defaults(func=cmd_generate)

    m = subparsers.add_parser(
        "monitor",
        help="a live view of the pipeline: rates, latency, backlog, workers, decisions, precision/recall",
        description="Read from Redis once per interval and show: events in and out per second, "
        "enqueue-to-result latency p50/p95/p99 (histograms merged, never max-of-percentiles), "
        "backlog and pending, each worker's rate, dead letters, decisions by scorer version and "
        "A/B arm, and precision/recall against the ground truth of `fraudscore generate` runs. "
        "--runs lists the runs; --stats --run-id ID gives one run's figures; --json prints JSON.",
    )
    _add_redis_options(m)
    m.add_argument("--interval", type=positive_float, default=1.0, help="seconds between views (default: 1)")
    m.add_argument("--count", type=positive_int, help="stop after this many views (default: never)")
    m.add_argument("--group", default="scorers", help="consumer group (default: %(default)s)")
    what = m.add_mutually_exclusive_group()
    what.add_argument("--runs", action="store_true", help="list the generator's runs, then exit")
    what.add_argument("--stats", action="store_true", help="one run's figures (with --run-id), then exit")
    m.add_argument("--run-id", metavar="ID", help="the run of --stats")
    m.add_argument(
        "--registry",
        type=Path,
        help="the model registry the workers follow: results of its A/B candidate's version count "
        "for the candidate arm (the results carry the scorer, not the arm)",
    )
    m.add_argument("--json", action="store_true", help="JSON: one object per view (a line each)")
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


def _share(text: str) -> float:
    """A share, 0 to 1 (an argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text!r}")
    return value


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


def cmd_generate(args: argparse.Namespace) -> int:
    from fraudscore.stream.runs import RunSpec, check_run_id, claim, new_run_id, publish_run
    from fraudscore.stream.worker import TRANSIENT_ERRORS, prepare

    try:
        run_id = check_run_id(args.run_id) if args.run_id is not None else new_run_id()
    except ValueError as exc:
        raise UsageError(f"--run-id: {exc}") from None
    spec = RunSpec(
        run_id=run_id,
        shape=args.shape,
        rate=args.rate,
        period=min(args.duration, RUN_PERIOD_S),
        duration=args.duration,
        customers=args.customers,
        fraud_share=args.fraud_share,
        seed=args.seed,
        partitions=args.partitions,
    )
    client = _client(args)
    stop = _stop_on_signals()
    try:
        prepare(client, args.partitions)
        if not claim(client, spec):
            raise UsageError(f"--run-id {run_id}: a run with this id is already in this Redis")
        print(f"run {run_id}: {args.shape} up to {args.rate:g}/s for {args.duration:g} s", file=sys.stderr)
        counts = publish_run(client, spec, stop)
    except TRANSIENT_ERRORS as exc:
        raise TransientError(f"--redis {args.redis or _redis_url()}: {exc}") from None
    ended = "stopped early: " if stop.is_set() else ""
    print(f"run {run_id}: {ended}published {counts['published']} events, {counts['frauds']} fraudulent")
    return 0


def _stop_on_signals() -> Any:
    """A threading.Event set by SIGINT or SIGTERM: the run stops between two sends."""
    import threading

    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def cmd_monitor(args: argparse.Namespace) -> int:
    from fraudscore.stream import monitor
    from fraudscore.stream.runs import runs
    from fraudscore.stream.worker import TRANSIENT_ERRORS

    if args.stats and args.run_id is None:
        raise UsageError("--stats needs --run-id ID")
    if args.run_id is not None and not args.stats:
        raise UsageError("--run-id goes with --stats")
    candidate = _candidate(args.registry)
    client = _client(args)
    try:
        if args.runs:
            found = runs(client)
            print(json.dumps(found, indent=2) if args.json else monitor.render_runs(found))
            return 0
        if args.stats:
            stats = monitor.run_stats(client, args.partitions, args.run_id, candidate)
            if stats is None:
                raise UsageError(f"--run-id {args.run_id}: no such run in this Redis (see --runs)")
            print(json.dumps(stats, indent=2) if args.json else monitor.render_stats(stats))
            return 0
        return _live(client, args, candidate)
    except TRANSIENT_ERRORS as exc:
        raise TransientError(f"--redis {args.redis or _redis_url()}: {exc}") from None


def _candidate(registry: Path | None) -> str | None:
    """The registry's A/B candidate version, if a split is running."""
    if registry is None:
        return None
    if not registry.is_dir():
        raise UsageError(f"--registry {registry}: no such directory")
    from fraudscore.models.registry import Registry

    found = Registry(registry).candidate()
    return None if found is None else found[0]


def _live(client: Any, args: argparse.Namespace, candidate: str | None) -> int:
    """The totals at once, then the view once per interval: on a terminal, several lines redrawn
    in place; otherwise one line per interval (for logs); with --json, one object per line."""
    from fraudscore.stream import monitor

    truth = monitor.Truth(client)
    view = monitor.LiveView(candidate=candidate)
    tty = sys.stdout.isatty() and not args.json
    previous = monitor.snapshot(client, args.partitions, args.group, sample=1)  # its cursor: now
    print(
        json.dumps(monitor.totals_json(previous)) if args.json else monitor.line(None, previous), flush=True
    )
    shown = 1
    tick = time.monotonic()
    while args.count is None or shown < args.count:
        tick += args.interval
        time.sleep(max(0.0, tick - time.monotonic()))
        current = monitor.snapshot(client, args.partitions, args.group, since=previous)
        figures = view.update(previous, current, truth, monitor.live_workers(client))
        if args.json:
            print(json.dumps(figures), flush=True)
        elif tty:
            print("\x1b[H\x1b[2J" + monitor.render(figures), flush=True)
        else:
            print(monitor.compact(previous, current, figures), flush=True)
        shown += 1
        previous = current
    return 0


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
