"""``fraudscore``: the command line.  Every command has ``--help``; paths default to ``data/``.

Defaults can be set by environment: FRAUDSCORE_INDEX, FRAUDSCORE_REFERENCES, FRAUDSCORE_PORT,
FRAUDSCORE_HOST, FRAUDSCORE_LOG_LEVEL.

Errors: a command that fails prints one line, ``fraudscore <command>: <message>`` naming the
file, field, flag or variable, and exits with ``errors.exit_code`` of its error's category
(2 bad configuration or command line, 3 bad input, 4 transient, 5 a bug; ``eval`` exits 1 when
answers differ).  Everything else on stderr is a log record (``LOG_FORMAT``).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import orjson

from fraudscore.defaults import LOG_FORMAT, PORT
from fraudscore.errors import (
    EXIT_CHECK_FAILED,
    EXIT_CODES,
    EXIT_INTERRUPTED,
    EXIT_OK,
    Category,
    ConfigError,
    FraudscoreError,
    TransientError,
    UsageError,
    exit_code,
)
from fraudscore.flags import parse_port, port_arg, positive_float, positive_int

log = logging.getLogger("fraudscore")

DEFAULT_INDEX = Path(os.environ.get("FRAUDSCORE_INDEX", "data/references.fsidx"))
DEFAULT_REFERENCES = Path(os.environ.get("FRAUDSCORE_REFERENCES", "data/references.json.gz"))
DEFAULT_HOST = os.environ.get("FRAUDSCORE_HOST", "0.0.0.0")
# Variables that must be parsed are read when a command needs them (``env_port``,
# ``env_log_level``), never at import: a bad value must not break ``--help``.
PORT_VARIABLE, FALLBACK_PORT = "FRAUDSCORE_PORT", PORT
LOG_LEVEL_VARIABLE, FALLBACK_LOG_LEVEL = "FRAUDSCORE_LOG_LEVEL", "INFO"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

Command = Callable[[argparse.Namespace], int]


# -- values of flags and variables ------------------------------------------------------------


def log_level_arg(text: str) -> str:
    """argparse ``type=`` for ``--log-level``: one of LOG_LEVELS, in any case."""
    if text.strip().upper() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(LOG_LEVELS)}, got {text!r}")
    return text.strip().upper()


def env_port() -> int:
    """$FRAUDSCORE_PORT, else 9999; UsageError naming the variable when it is not a port."""
    text = os.environ.get(PORT_VARIABLE)
    if text is None:
        return FALLBACK_PORT
    try:
        return parse_port(text)
    except ValueError as exc:
        raise UsageError(f"{PORT_VARIABLE} {exc}") from None


def env_log_level() -> str:
    """$FRAUDSCORE_LOG_LEVEL (any case), else INFO; UsageError naming the variable otherwise."""
    text = os.environ.get(LOG_LEVEL_VARIABLE)
    if text is None or not text.strip():
        return FALLBACK_LOG_LEVEL
    try:
        return log_level_arg(text)
    except argparse.ArgumentTypeError as exc:
        raise UsageError(f"{LOG_LEVEL_VARIABLE} {exc}") from None


class Parser(argparse.ArgumentParser):
    """argparse with the project's error rule: one line naming the flag, BAD_CONFIG's status."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_CODES[Category.BAD_CONFIG], f"{self.prog}: {message} (see {self.prog} --help)\n")


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


# -- output paths, checked before any long work -------------------------------------------------

UNIX_PATH_MAX = 107  # sun_path's 108 bytes, less the terminating NUL


def check_output_dir(path: Path, flag: str) -> None:
    """UsageError naming ``flag`` unless ``path`` is, or can be made, a writable directory."""
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"{flag} {path}: exists and is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise UsageError(f"{flag} {path}: directory is not writable")
        return
    parent = next(p for p in path.absolute().parents if p.exists())
    if not parent.is_dir():
        raise UsageError(f"{flag} {path}: cannot create it: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: cannot create it: {parent} is not writable")


def check_socket_path(path: Path, flag: str) -> None:
    """UsageError naming ``flag`` unless a unix socket can be created at ``path``: its directory
    exists, the path fits in sun_path, and nothing but an old socket is there (which is replaced)."""
    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        raise UsageError(f"{flag} {path}: longer than a unix socket path may be ({UNIX_PATH_MAX} bytes)")
    if not path.parent.is_dir():
        raise UsageError(f"{flag} {path}: directory {path.parent} does not exist")
    if (path.exists() or path.is_symlink()) and not path.is_socket():
        raise UsageError(f"{flag} {path}: exists and is not a socket (not replacing it)")


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
    from fraudscore.service.v1 import resolve_registry

    port = args.port
    if args.uds is None and args.handoff is None and port is None:
        port = env_port()
    for flag, path in (("--uds", args.uds), ("--handoff", args.handoff)):
        if path is not None:
            check_socket_path(path, flag)
    native_loop = args.native_loop
    if native_loop is None:  # on where it applies: handed-over connections, with the fast path
        native_loop = args.handoff is not None and not args.no_fast_path
    config = ServiceConfig(
        index_path=ensure_index(args.index, args.references),
        host=args.host,
        port=port,
        uds=args.uds,
        handoff=args.handoff,
        constants=_constants(args),
        registry=resolve_registry(args.registry),
        max_body_bytes=args.max_body_bytes,
        max_url_bytes=args.max_url_bytes,
        max_header_bytes=args.max_header_bytes,
        max_headers=args.max_headers,
        request_timeout=args.request_timeout,
        fast_path=not args.no_fast_path,
        native_loop=native_loop,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
    )
    run(config)
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    """One JSON line per record, in order; bad records get an error line naming their position,
    and the command fails at the end (after every good answer) with one line about them."""
    from fraudscore.contract.testdata import read_records
    from fraudscore.offline import failure, score_records

    records = read_records(args.file)
    with _open_scorer(args) as scorer:
        results = score_records(scorer, records, _constants(args))
    out = sys.stdout.buffer
    for result in results:
        out.write(orjson.dumps(result.as_json()) + b"\n")
    failed = [r for r in results if r.error is not None]
    if failed:
        out.flush()
        raise failure(args.file, failed, len(results), "payloads")
    return EXIT_OK


def cmd_eval(args: argparse.Namespace) -> int:
    """The summary on stdout; 1 if answers differ, the error's code if entries could not be scored."""
    from fraudscore.contract.testdata import read_json
    from fraudscore.offline import evaluate, failure

    document = read_json(args.file)
    with _open_scorer(args) as scorer:
        result = evaluate(scorer, document, _constants(args), source=args.file)
    summary = result.as_json()
    if not args.all:
        summary["differing"] = summary["differing"][:20]
        summary["unscored"] = summary["unscored"][:20]
    print(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode())
    if summary["references_match"] is False:
        log.warning("the test data was made from other references than this index's")
    if result.unscored:
        sys.stdout.flush()
        raise failure(args.file, result.unscored, result.total, "entries")
    return EXIT_CHECK_FAILED if result.score_differs else EXIT_OK


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


def _add_registry_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--registry",
        type=Path,
        help="model registry for POST /v1/score (default: env FRAUDSCORE_REGISTRY, else data/registry "
        "if it exists, else the kNN alone)",
    )


def _add_constants_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--normalization", type=Path, help="normalization.json (default: the bundled copy)")
    p.add_argument("--mcc-risk", type=Path, help="mcc_risk.json (default: the bundled copy)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="fraudscore",
        description="Exact 5-nearest-neighbour card-fraud scoring (Rinha de Backend 2026 contract).",
    )
    parser.add_argument(
        "--log-level",
        type=log_level_arg,
        metavar="{" + ",".join(LOG_LEVELS) + "}",
        help=f"log verbosity (default: ${LOG_LEVEL_VARIABLE}, else {FALLBACK_LOG_LEVEL})",
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
    listen.add_argument(
        "--port", type=port_arg, help=f"TCP port (default: ${PORT_VARIABLE}, else {FALLBACK_PORT})"
    )
    listen.add_argument("--uds", type=Path, help="listen on this unix socket instead")
    listen.add_argument("--handoff", type=Path, help="take connections passed by `fraudscore balance` here")
    serve.add_argument("--host", default=DEFAULT_HOST, help="TCP address (default: %(default)s)")
    serve.add_argument(
        "--max-body-bytes",
        type=positive_int,
        default=64 * 1024,
        help="larger bodies get 413 (default: %(default)s)",
    )
    serve.add_argument(
        "--max-url-bytes",
        type=positive_int,
        default=8192,
        help="longest request target (default: %(default)s)",
    )
    serve.add_argument(
        "--max-header-bytes",
        type=positive_int,
        default=16384,
        help="most bytes of request headers (default: %(default)s)",
    )
    serve.add_argument(
        "--max-headers", type=positive_int, default=100, help="most request headers (default: %(default)s)"
    )
    serve.add_argument(
        "--request-timeout",
        type=positive_float,
        default=5.0,
        help="seconds a begun request may take, then 408 (default: %(default)s)",
    )
    serve.add_argument(
        "--native-loop",
        action=argparse.BooleanOptionalAction,
        help="with --handoff: serve handed-over connections on a native thread, moving a connection to "
        "Python at its first read the fast path declines (default: on with --handoff and the fast path)",
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
    _add_registry_option(serve)
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
    from fraudscore.models import cli as models_cli
    from fraudscore.stream import cli as stream_cli

    models_cli.register(sub)
    stream_cli.register(sub)
    return parser


def cmd_balance(args: argparse.Namespace) -> int:
    from fraudscore.stack.balancer import run

    run(args.upstream, host=args.host, port=env_port() if args.port is None else args.port)
    return 0


def cmd_stack(args: argparse.Namespace) -> int:
    from fraudscore.service.v1 import resolve_registry
    from fraudscore.stack.runner import StackConfig, run

    index = ensure_index(args.index, args.references).resolve()
    # checked here, once; without --registry each instance finds its default itself
    registry = resolve_registry(args.registry) if args.registry else None
    run(
        StackConfig(
            index=index,
            port=env_port() if args.port is None else args.port,
            instances=args.instances,
            registry=registry.resolve() if registry else None,
            balancer=args.lb,
            limits=not args.no_limits,
            host=args.host,
            log_level=args.log_level,
            metrics_port=args.metrics_port,
            native_loop=args.native_loop,
        )
    )
    return 0


def cmd_loadtest(args: argparse.Namespace) -> int:
    """The load test, once its output directory is known to be usable: not after minutes of k6."""
    check_output_dir(Path(args.out), "--out")
    run: Command = args.run_loadtest
    return run(args)


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
    balance.add_argument("--port", type=port_arg, help=f"default: ${PORT_VARIABLE}, else {FALLBACK_PORT}")
    balance.add_argument("--host", default=DEFAULT_HOST, help="default: %(default)s")
    balance.set_defaults(func=cmd_balance)

    stack = sub.add_parser("stack", help="run the balancer and the instances as local processes, with limits")
    _add_index_option(stack)
    stack.add_argument("--port", type=port_arg, help=f"default: ${PORT_VARIABLE}, else {FALLBACK_PORT}")
    stack.add_argument("--host", default=DEFAULT_HOST, help="default: %(default)s")
    stack.add_argument(
        "--instances", type=positive_int, default=2, help="API instances (default: %(default)s)"
    )
    stack.add_argument(
        "--lb",
        choices=["builtin", "nginx", "haproxy"],
        default="builtin",
        help="load balancer (default: builtin)",
    )
    _add_registry_option(stack)
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
    stack.add_argument(
        "--native-loop",
        action=argparse.BooleanOptionalAction,
        help="the instances serve handed-over connections on their native loop (--lb builtin; default: "
        "the instances' default, on)",
    )
    stack.set_defaults(func=cmd_stack)

    lt = sub.add_parser("loadtest", help="run the contract's k6 load test and print its score")
    loadtest.add_arguments(lt)
    lt.set_defaults(func=cmd_loadtest, run_loadtest=loadtest.run)


def _os_error(exc: OSError) -> FraudscoreError:
    """An OSError that reached the command line, as one of ours: one line naming the file.

    The readers of input files turn their OSErrors into DataFileError themselves, so what
    arrives here is a path or address from a flag (a socket, an output directory): BAD_CONFIG,
    except a port in use, TRANSIENT.
    """
    what = exc.strerror or str(exc)
    names = [str(n) for n in (exc.filename, exc.filename2) if n is not None]
    message = f"{' -> '.join(names)}: {what}" if names else what
    if exc.errno == errno.EADDRINUSE:  # a busy port: the taxonomy's TRANSIENT, it may be free later
        return TransientError(message)
    return ConfigError(message)


def _quiet_stdout() -> None:
    """Point stdout at /dev/null: its reader left, and the interpreter's own flush at exit
    must not complain about the bytes still buffered for it."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; every failure ends as one line on stderr and ``exit_code``'s status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # these groups' errors name the action too: `fraudscore index build`, `fraudscore pipeline demo`
    action = getattr(args, f"{args.command}_command", None) if args.command in ("index", "pipeline") else None
    prog = " ".join(["fraudscore", args.command, *([action] if action else [])])
    if args.log_level is None:
        try:
            args.log_level = env_log_level()
        except UsageError as exc:
            print(f"{prog}: {exc}", file=sys.stderr)
            return exit_code(exc)
    logging.basicConfig(level=args.log_level, format=LOG_FORMAT, stream=sys.stderr)
    func: Command = args.func
    try:
        status = func(args)
        sys.stdout.flush()  # a reader that left shows up here, while we can still handle it
        return status
    except BrokenPipeError:  # `fraudscore score ... | head`: the reader left, which is not an error
        _quiet_stdout()
        return EXIT_OK
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except FraudscoreError as exc:
        error: BaseException = exc
    except OSError as exc:
        error = _os_error(exc)
    except Exception as exc:  # a bug: one line by default, the traceback when asked for
        log.debug("the traceback of an internal error", exc_info=True)
        print(
            f"{prog}: internal error: {type(exc).__name__}: {_one_line(str(exc))} "
            "(a bug; rerun with --log-level DEBUG for the traceback)",
            file=sys.stderr,
        )
        return exit_code(exc)
    print(f"{prog}: {_one_line(str(error))}", file=sys.stderr)
    return exit_code(error)


def _one_line(text: str) -> str:
    """A message as one line: whatever spans lines (a child's output, a parser's) is joined."""
    return " | ".join(line.strip() for line in text.splitlines() if line.strip()) or "(no message)"


if __name__ == "__main__":
    sys.exit(main())
