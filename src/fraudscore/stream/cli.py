"""The stream commands: ``fraudscore worker``, ``publish``, ``monitor`` and ``demo``.

``register(subparsers)`` adds them to the main parser (``fraudscore.cli``).  Redis and the
worker's modules are imported only when a stream command runs, so other commands start as fast
as before.
"""

from __future__ import annotations

import argparse
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
from fraudscore.flags import positive_int

log = logging.getLogger("fraudscore.stream")

REDIS_URL_ENV = "FRAUDSCORE_REDIS_URL"
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
    """Add ``worker``, ``publish``, ``monitor`` and ``demo`` to the command line's subparsers."""
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

    d = subparsers.add_parser(
        "demo",
        help="the whole pipeline here: a private Redis, workers, a paced producer, the monitor",
        description="Start redis-server (or use --redis), `fraudscore worker --workers N` and a producer "
        "of generated events at --rate/--shape; print the monitor's line every --interval until every "
        "event is done; then stop everything and print a summary.",
    )
    d.add_argument("--redis", metavar="URL", help="use this Redis instead of a private redis-server")
    d.add_argument("--partitions", type=positive_int, default=4, help="default: %(default)s")
    d.add_argument("--index", type=Path, default=DEFAULT_INDEX, help="default: %(default)s")
    d.add_argument("--events", type=positive_int, default=20000, help="default: %(default)s")
    d.add_argument("--workers", type=positive_int, default=2, help="default: %(default)s")
    d.add_argument("--rate", type=float, default=1000.0, help="peak events/s (default: %(default)s)")
    d.add_argument("--shape", choices=["constant", "ramp", "burst", "wave"], default="wave")
    d.add_argument("--period", type=float, default=10.0, help="seconds per period (default: %(default)s)")
    d.add_argument("--interval", type=float, default=1.0, help="seconds between lines (default: %(default)s)")
    d.set_defaults(func=cmd_demo)


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
            current = snapshot(client, args.partitions, args.group)
        except TRANSIENT_ERRORS as exc:
            raise TransientError(f"--redis {args.redis or _redis_url()}: {exc}") from None
        print(line(previous, current), flush=True)
        printed += 1
        if args.count is not None and printed >= args.count:
            return 0
        previous = current
        time.sleep(args.interval)


def cmd_demo(args: argparse.Namespace) -> int:
    from fraudscore.cli import DEFAULT_REFERENCES, ensure_index
    from fraudscore.stream.demo import DemoConfig, run
    from fraudscore.stream.generate import RateShape

    if not args.interval > 0:
        raise UsageError(f"--interval must be positive, got {args.interval}")
    try:
        shape = RateShape(args.shape, args.rate, args.period)
    except ValueError as exc:
        raise UsageError(f"--rate/--period: {exc}") from None
    if args.redis is not None:
        _client(args)  # a malformed URL is a usage error
    config = DemoConfig(
        events=args.events,
        shape=shape,
        workers=args.workers,
        partitions=args.partitions,
        index=ensure_index(args.index, DEFAULT_REFERENCES),
        interval=args.interval,
        redis_url=args.redis,
    )
    run(config, log_level=args.log_level)
    return 0
