"""Render ``deploy/rinha/docker-compose.yml`` from ``limits.py``, so the deployed limits are the tested ones.

``python -m fraudscore.stack.compose`` rewrites the file; ``--check`` only compares and exits 1 on a
difference (for CI). The YAML is written as text: the layout is fixed and small, and it spares a
PyYAML dependency.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from fraudscore.defaults import PORT
from fraudscore.stack.limits import DEFAULT_STACK, ServiceLimits, StackLimits, check

REPO_ROOT = Path(__file__).resolve().parents[3]
COMPOSE_PATH = REPO_ROOT / "deploy" / "rinha" / "docker-compose.yml"

IMAGE = "fraudscore:local"
# Where the image keeps the index built at image build time (see the Dockerfile).
INDEX_PATH = "/app/data/references.fsidx"
# A named volume shared by every service: the APIs listen on unix sockets here, the balancer connects.
SOCKET_DIR = "/sockets"
NETWORK = "backend"


def socket_path(service: ServiceLimits) -> str:
    return f"{SOCKET_DIR}/{service.name}.sock"


def api_command(service: ServiceLimits) -> list[str]:
    # the built-in balancer hands connections over this socket (SCM_RIGHTS)
    return ["fraudscore", "serve", "--index", INDEX_PATH, "--handoff", socket_path(service)]


def balancer_command(stack: StackLimits) -> list[str]:
    argv = ["fraudscore", "balance", "--port", str(PORT)]
    for api in stack.apis:
        argv += ["--upstream", socket_path(api)]
    return argv


def _yaml_flow_list(items: Sequence[str]) -> str:
    # JSON strings and arrays are valid YAML flow scalars/sequences, and json quotes safely.
    return "[" + ", ".join(json.dumps(item) for item in items) + "]"


def _service_lines(
    service: ServiceLimits,
    command: list[str],
    *,
    build_context: str | None,
    extra: Sequence[str] = (),
) -> list[str]:
    lines = [f"  {service.name}:", f"    image: {IMAGE}"]
    if build_context is not None:
        lines += ["    build:", f"      context: {build_context}", "      dockerfile: Dockerfile"]
    lines += [
        f"    command: {_yaml_flow_list(command)}",
        # tini as PID 1, so SIGTERM from `docker compose down` reaches Python and stops it at once.
        "    init: true",
        *extra,
        "    volumes:",
        f"      - sockets:{SOCKET_DIR}",
        "    networks:",
        f"      - {NETWORK}",
        "    deploy:",
        "      resources:",
        "        limits:",
        f'          cpus: "{service.compose_cpus}"',
        f'          memory: "{service.compose_memory}"',
    ]
    return lines


def render(stack: StackLimits = DEFAULT_STACK, *, build_context: str | None = "../..") -> str:
    """The compose file's text. ``build_context=None`` drops ``build:`` (for a pushed image)."""
    check(stack)
    shares = " + ".join(f"{s.name} {s.compose_cpus} CPU/{s.memory_mib} MiB" for s in stack.services)
    lines = [
        "# Generated from src/fraudscore/stack/limits.py; do not edit by hand:",
        "# change limits.py and run `python -m fraudscore.stack.compose`.",
        f"# {shares} = {stack.total_cpus:.2f} CPU / {stack.total_memory_mib} MiB",
        '# (compose reads "MB" as MiB).',
        "services:",
    ]
    lb_extra = [
        "    ports:",
        f'      - "{PORT}:{PORT}"',
        "    depends_on:",
        *(f"      - {api.name}" for api in stack.apis),
    ]
    lines += _service_lines(
        stack.balancer, balancer_command(stack), build_context=build_context, extra=lb_extra
    )
    for api in stack.apis:
        lines += _service_lines(api, api_command(api), build_context=build_context)
    lines += [
        "networks:",
        f"  {NETWORK}:",
        "    driver: bridge",
        "volumes:",
        "  sockets:",
    ]
    return "\n".join(lines) + "\n"


def generated_file_command(
    argv: Sequence[str] | None, *, module: str, doc: str | None, out: Path, render: Callable[[], str]
) -> int:
    """``python -m MODULE [--check] [--out PATH]``: write what ``render`` gives to ``out``, or with
    --check exit 1 (showing the diff) when the committed file differs: one command for every
    generated deployment file."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc)
    parser.add_argument("--check", action="store_true", help="exit 1 if the file differs from the rendering")
    parser.add_argument("--out", type=Path, default=out, help="the file (default: %(default)s)")
    args = parser.parse_args(argv)
    wanted = render()
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current == wanted:
            return 0
        diff = difflib.unified_diff(
            current.splitlines(keepends=True), wanted.splitlines(keepends=True), str(args.out), "rendered"
        )
        sys.stderr.write("".join(diff))
        sys.stderr.write(f"{args.out} is stale: run `python -m {module}`\n")
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(wanted)
    print(f"wrote {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return generated_file_command(
        argv, module="fraudscore.stack.compose", doc=__doc__, out=COMPOSE_PATH, render=render
    )


if __name__ == "__main__":
    raise SystemExit(main())
