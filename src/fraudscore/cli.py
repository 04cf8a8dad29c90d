"""``fraudscore``: the command line.  Every command has ``--help``; paths default to ``data/``.

Defaults can be set by environment: FRAUDSCORE_INDEX, FRAUDSCORE_REFERENCES, FRAUDSCORE_PORT,
FRAUDSCORE_HOST, FRAUDSCORE_LOG_LEVEL.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

from fraudscore.defaults import PORT
from fraudscore.errors import FraudscoreError, UsageError

log = logging.getLogger("fraudscore")

DEFAULT_INDEX = Path(os.environ.get("FRAUDSCORE_INDEX", "data/references.fsidx"))
DEFAULT_REFERENCES = Path(os.environ.get("FRAUDSCORE_REFERENCES", "data/references.json.gz"))
DEFAULT_PORT = int(os.environ.get("FRAUDSCORE_PORT", PORT))
DEFAULT_HOST = os.environ.get("FRAUDSCORE_HOST", "0.0.0.0")

Command = Callable[[argparse.Namespace], int]


def _constants(args: argparse.Namespace) -> Any:
    from fraudscore.contract.vectorize import DEFAULT_CONSTANTS, Constants

    if args.normalization is None and args.mcc_risk is None:
        return DEFAULT_CONSTANTS
    return Constants.load(args.normalization, args.mcc_risk)


def _open_scorer(args: argparse.Namespace) -> Any:
    from fraudscore.scorer import KnnScorer

    path = ensure_index(args.index, getattr(args, "references", DEFAULT_REFERENCES))
    return KnnScorer.open(path)


def ensure_index(index: Path, references: Path) -> Path:
    """The index at ``index``, built from ``references`` first if it does not exist yet."""
    if index.exists():
        return index
    if not references.exists():
        raise UsageError(
            f"no index at {index} and no references at {references} to build it from "
            "(see: fraudscore index build --help)"
        )
    from fraudscore.index.build import build_index

    log.info("no index at %s: building it from %s", index, references)
    build_index(references, index, progress=sys.stderr.isatty())
    return index


# -- commands ---------------------------------------------------------------------------------


def cmd_index_build(args: argparse.Namespace) -> int:
    from fraudscore.index.build import build_index

    report = build_index(
        args.references,
        args.out,
        leaf_size=args.leaf_size,
        fanout_levels=args.fanout_levels,
        progress=not args.no_progress,
    )
    print(
        f"{report.path}: {report.n_points:,} references ({report.n_fraud:,} fraud), "
        f"{report.file_bytes / 1e6:.1f} MB, parsed in {report.parse_seconds:.1f} s, "
        f"built in {report.build_seconds:.1f} s, sha256 {report.sha256}"
    )
    return 0


def cmd_index_info(args: argparse.Namespace) -> int:
    from fraudscore.index.search import Index

    with Index(args.index) as index:
        info = index.describe()
    print(orjson.dumps(info, option=orjson.OPT_INDENT_2).decode())
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from fraudscore.service.server import run
    from fraudscore.service.state import ServiceConfig

    port = args.port
    if args.uds is None and args.handoff is None and port is None:
        port = DEFAULT_PORT
    config = ServiceConfig(
        index_path=ensure_index(args.index, args.references),
        host=args.host,
        port=port,
        uds=args.uds,
        handoff=args.handoff,
        constants=_constants(args),
        max_body_bytes=args.max_body_bytes,
        request_timeout=args.request_timeout,
        fast_path=not args.no_fast_path,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
    )
    run(config)
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from fraudscore.contract.testdata import read_json
    from fraudscore.offline import iter_payloads, score_all

    payloads = list(iter_payloads(read_json(args.file)))
    with _open_scorer(args) as scorer:
        results = score_all(scorer, payloads, _constants(args))
    out = sys.stdout.buffer
    for result in results:
        out.write(orjson.dumps(result.as_json()) + b"\n")
    bad = sum(r.error is not None for r in results)
    if bad:
        print(f"fraudscore score: {bad} of {len(results)} payloads could not be scored", file=sys.stderr)
    return 1 if bad else 0


def cmd_eval(args: argparse.Namespace) -> int:
    from fraudscore.contract.testdata import read_json
    from fraudscore.offline import evaluate

    with _open_scorer(args) as scorer:
        result = evaluate(scorer, read_json(args.file), _constants(args))
    summary = result.as_json()
    if not args.all:
        summary["differing"] = summary["differing"][:20]
    print(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode())
    if summary["references_match"] is False:
        print(
            "fraudscore eval: the test data was made from other references than this index's", file=sys.stderr
        )
    return 0 if not result.score_differs else 1


# -- parser -----------------------------------------------------------------------------------


def _add_index_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--index",
        type=Path,
        default=DEFAULT_INDEX,
        help="index file (default: %(default)s, env FRAUDSCORE_INDEX); built from --references if missing",
    )
    p.add_argument(
        "--references",
        type=Path,
        default=DEFAULT_REFERENCES,
        help="reference vectors, to build a missing index (default: %(default)s)",
    )


def _add_constants_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--normalization", type=Path, help="normalization.json (default: the bundled copy)")
    p.add_argument("--mcc-risk", type=Path, help="mcc_risk.json (default: the bundled copy)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fraudscore",
        description="Exact 5-nearest-neighbour card-fraud scoring (Rinha de Backend 2026 contract).",
    )
    parser.add_argument(
        "--log-level",
        default=os.environ.get("FRAUDSCORE_LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log verbosity (default: %(default)s, env FRAUDSCORE_LOG_LEVEL)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    index = sub.add_parser("index", help="build or inspect the index file")
    index_sub = index.add_subparsers(dest="index_command", required=True, metavar="ACTION")
    build = index_sub.add_parser("build", help="build the index from references.json(.gz)")
    build.add_argument("--references", type=Path, default=DEFAULT_REFERENCES, help="default: %(default)s")
    build.add_argument("--out", type=Path, default=DEFAULT_INDEX, help="default: %(default)s")
    build.add_argument("--leaf-size", type=int, default=64, help="points per leaf (default: %(default)s)")
    build.add_argument(
        "--fanout-levels", type=int, default=3, help="binary splits per tree node (default: %(default)s)"
    )
    build.add_argument("--no-progress", action="store_true", help="no progress bar")
    build.set_defaults(func=cmd_index_build)
    info = index_sub.add_parser("info", help="describe an index file")
    info.add_argument("--index", type=Path, default=DEFAULT_INDEX, help="default: %(default)s")
    info.set_defaults(func=cmd_index_info)

    serve = sub.add_parser("serve", help="serve POST /fraud-score and GET /ready")
    _add_index_option(serve)
    listen = serve.add_mutually_exclusive_group()
    listen.add_argument("--port", type=int, help=f"TCP port (default: {DEFAULT_PORT}, env FRAUDSCORE_PORT)")
    listen.add_argument("--uds", type=Path, help="listen on this unix socket instead")
    listen.add_argument("--handoff", type=Path, help="take connections passed by `fraudscore balance` here")
    serve.add_argument("--host", default=DEFAULT_HOST, help="TCP address (default: %(default)s)")
    serve.add_argument("--max-body-bytes", type=int, default=64 * 1024, help="larger bodies get 413")
    serve.add_argument(
        "--request-timeout", type=float, default=5.0, help="seconds a begun request may take (then 408)"
    )
    serve.add_argument(
        "--no-fast-path",
        action="store_true",
        help="answer every request through httptools and the Python vectorizer (for comparison)",
    )
    serve.add_argument(
        "--metrics-port",
        type=int,
        help="also serve GET /metrics, and only that, on this TCP port (for an instance on a socket)",
    )
    serve.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        help="the --metrics-port listener's address (default: %(default)s)",
    )
    _add_constants_options(serve)
    serve.set_defaults(func=cmd_serve)

    score = sub.add_parser("score", help="score payloads from a file: one JSON decision per line")
    score.add_argument(
        "file", help="JSON array of payloads, JSON lines, or test data (.json/.gz); - for stdin"
    )
    _add_index_option(score)
    _add_constants_options(score)
    score.set_defaults(func=cmd_score)

    ev = sub.add_parser(
        "eval", help="compare answers with a test-data file's expected ones (exit 1 if any differ)"
    )
    ev.add_argument(
        "file", help="test data: {stats, entries: [{request, expected_approved, expected_fraud_score}]}"
    )
    ev.add_argument("--all", action="store_true", help="list every differing payload, not the first 20")
    _add_index_option(ev)
    _add_constants_options(ev)
    ev.set_defaults(func=cmd_eval)

    _register_optional(sub)
    __import__("fraudscore.models.cli", fromlist=["register"]).register(sub)  # the models helper's group
    return parser


def cmd_balance(args: argparse.Namespace) -> int:
    from fraudscore.stack.balancer import run

    run(args.upstream, host=args.host, port=args.port)
    return 0


def cmd_stack(args: argparse.Namespace) -> int:
    from fraudscore.stack.runner import StackConfig, run

    index = ensure_index(args.index, args.references).resolve()
    run(
        StackConfig(
            index=index,
            port=args.port,
            instances=args.instances,
            balancer=args.lb,
            limits=not args.no_limits,
            host=args.host,
            log_level=args.log_level,
            metrics_port=args.metrics_port,
        )
    )
    return 0


def _register_optional(sub: Any) -> None:
    """Commands of the stack and loadtest packages."""
    from fraudscore.loadtest import command as loadtest

    balance = sub.add_parser("balance", help="the built-in load balancer: hands connections to instances")
    balance.add_argument(
        "--upstream",
        type=Path,
        action="append",
        required=True,
        help="an instance's --handoff socket (repeat)",
    )
    balance.add_argument("--port", type=int, default=DEFAULT_PORT, help="default: %(default)s")
    balance.add_argument("--host", default=DEFAULT_HOST, help="default: %(default)s")
    balance.set_defaults(func=cmd_balance)

    stack = sub.add_parser("stack", help="run the balancer and the instances as local processes, with limits")
    _add_index_option(stack)
    stack.add_argument("--port", type=int, default=DEFAULT_PORT, help="default: %(default)s")
    stack.add_argument("--host", default=DEFAULT_HOST, help="default: %(default)s")
    stack.add_argument("--instances", type=int, default=2, help="API instances (default: %(default)s)")
    stack.add_argument(
        "--lb",
        choices=["builtin", "nginx", "haproxy"],
        default="builtin",
        help="load balancer (default: builtin)",
    )
    stack.add_argument(
        "--no-limits",
        action="store_true",
        help="no cgroup per process (to run the whole stack inside one outer limit)",
    )
    stack.add_argument(
        "--metrics-port",
        type=int,
        metavar="BASE",
        help="serve instance i's GET /metrics on 127.0.0.1:BASE+i (i from 0; default: not at all)",
    )
    stack.set_defaults(func=cmd_stack)

    lt = sub.add_parser("loadtest", help="run the contract's k6 load test and print its score")
    loadtest.add_arguments(lt)
    lt.set_defaults(func=loadtest.run)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    func: Command = args.func
    try:
        return func(args)
    except FraudscoreError as exc:
        print(f"fraudscore {args.command}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"fraudscore {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `fraudscore score ... | head`: the reader left, which is fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
