"""The stack's limits, and the files generated from them: the compose file and the Dockerfile it builds."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from fraudscore.errors import LimitsError
from fraudscore.stack import compose
from fraudscore.stack.limits import (
    CONTRACT_CPUS,
    CONTRACT_MEMORY_MIB,
    DEFAULT_STACK,
    ServiceLimits,
    StackLimits,
    check,
    scaled,
)

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "deploy" / "rinha" / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"


def _scalar(text: str) -> Any:
    if text[0] in '["':
        return json.loads(text)
    return {"true": True, "false": False}.get(text, text)


def parse_yaml(text: str) -> dict[str, Any]:
    """Just enough YAML for the generated compose file: block maps, block lists, JSON-style scalars."""
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    root: dict[str, Any] = {}
    stack: list[tuple[int, Any]] = [(-1, root)]
    for i, line in enumerate(lines):
        indent = len(line) - len(line.lstrip())
        body = line.strip()
        while stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1]
        if body.startswith("- "):
            parent.append(_scalar(body[2:]))
            continue
        key, _, value = body.partition(":")
        if value.strip():
            parent[key] = _scalar(value.strip())
            continue
        following = lines[i + 1] if i + 1 < len(lines) else ""
        if not following or len(following) - len(following.lstrip()) <= indent:
            parent[key] = None  # a key with an empty value, e.g. a volume with default options
            continue
        parent[key] = [] if following.strip().startswith("- ") else {}
        stack.append((indent, parent[key]))
    return root


def stages(dockerfile: str) -> list[tuple[str, str]]:
    """(FROM line, body) per build stage, ignoring comments and joining continued lines."""
    text = re.sub(r"\\\n", " ", dockerfile)
    found: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            found.append((line, []))
        elif found:
            found[-1][1].append(line)
    return [(head, "\n".join(body)) for head, body in found]


# Limits


def test_default_stack_fits_the_contract() -> None:
    assert DEFAULT_STACK.total_cpus <= CONTRACT_CPUS
    assert DEFAULT_STACK.total_memory_mib <= CONTRACT_MEMORY_MIB
    assert check(DEFAULT_STACK) is DEFAULT_STACK
    assert [(s.name, s.cpus, s.memory_mib) for s in DEFAULT_STACK.services] == [
        ("lb", 0.10, 20),
        ("api1", 0.45, 165),
        ("api2", 0.45, 165),
    ]


@pytest.mark.parametrize("n", range(1, 9))
def test_scaled_splits_what_the_balancer_leaves(n: int) -> None:
    stack = scaled(n)
    assert len(stack.apis) == n and stack.balancer == DEFAULT_STACK.balancer
    assert len({(a.cpus, a.memory_mib) for a in stack.apis}) == 1
    assert stack.total_cpus <= CONTRACT_CPUS and stack.total_memory_mib <= CONTRACT_MEMORY_MIB
    # Rounding down loses less than one unit per instance.
    assert CONTRACT_CPUS - stack.total_cpus < 0.001 * n + 1e-9
    assert CONTRACT_MEMORY_MIB - stack.total_memory_mib < n


def test_over_the_ceiling_is_refused_with_the_numbers() -> None:
    apis = (ServiceLimits("api1", 0.45, 165), ServiceLimits("api2", 0.45, 165))
    greedy = StackLimits(ServiceLimits("lb", 0.2, 50), apis)
    with pytest.raises(LimitsError, match=r"1\.1 CPU and 380 MiB.*CPU is 0\.1 over; memory is 30 MiB over"):
        check(greedy)
    with pytest.raises(LimitsError, match="unique"):
        check(StackLimits(ServiceLimits("api1", 0.1, 10), (ServiceLimits("api1", 0.1, 10),)))
    with pytest.raises(LimitsError, match="too little"):
        scaled(1000)
    with pytest.raises(LimitsError, match="memory"):
        ServiceLimits("api1", 0.5, 0)


# The compose file


def test_committed_compose_file_is_the_rendering_of_the_limits(tmp_path: Path) -> None:
    assert COMPOSE_FILE.read_text() == compose.render(), "run `python -m fraudscore.stack.compose`"
    assert compose.main(["--check"]) == 0
    stale = tmp_path / "docker-compose.yml"
    stale.write_text(compose.render().replace('"0.45"', '"0.50"'))
    assert compose.main(["--check", "--out", str(stale)]) == 1
    assert compose.main(["--out", str(stale)]) == 0
    assert stale.read_text() == compose.render()


def test_compose_services_limits_and_network() -> None:
    text = COMPOSE_FILE.read_text()
    doc = parse_yaml(text)
    services = doc["services"]
    assert list(services) == ["lb", "api1", "api2"]
    for limits in DEFAULT_STACK.services:
        service = services[limits.name]
        # The same numbers the runner's cgroups use.
        assert service["deploy"]["resources"]["limits"] == {
            "cpus": limits.compose_cpus,
            "memory": f"{limits.memory_mib}MB",
        }
        assert float(service["deploy"]["resources"]["limits"]["cpus"]) == limits.cpus
        assert service["networks"] == ["backend"]
        assert service["volumes"] == ["sockets:/sockets"]
        assert service["image"] == services["lb"]["image"]
    assert doc["networks"] == {"backend": {"driver": "bridge"}}
    assert "sockets" in doc["volumes"]
    assert "privileged" not in text and "network_mode" not in text and "cap_add" not in text

    lb = services["lb"]
    assert lb["ports"] == ["9999:9999"]
    assert lb["depends_on"] == ["api1", "api2"]
    assert lb["command"][:2] == ["fraudscore", "balance"]
    for name in ("api1", "api2"):
        api = services[name]
        assert "ports" not in api
        assert api["command"] == [
            "fraudscore",
            "serve",
            "--index",
            "/app/data/references.fsidx",
            "--handoff",
            f"/sockets/{name}.sock",
        ]
        assert f"/sockets/{name}.sock" in lb["command"]
    declared = [services[s.name]["deploy"]["resources"]["limits"] for s in DEFAULT_STACK.services]
    assert sum(float(x["cpus"]) for x in declared) <= CONTRACT_CPUS
    assert sum(int(x["memory"].removesuffix("MB")) for x in declared) <= CONTRACT_MEMORY_MIB


# The Dockerfile


def test_dockerfile_builds_in_one_stage_and_runs_in_another_without_a_compiler() -> None:
    found = stages(DOCKERFILE.read_text())
    assert len(found) == 2
    (build_from, build), (run_from, run) = found
    assert build_from.endswith(" AS build") and run_from.endswith(" AS runtime")
    assert "gcc" in build and "pip install" in build
    assert "fraudscore index build --references data/references.json.gz" in build
    for compiler in ("gcc", "g++", "clang", "build-essential", "apt-get install"):
        assert compiler not in run
    assert "COPY --from=build /opt/venv" in run
    # The runtime image holds the index where the compose file's commands look for it.
    assert f"COPY --from=build /opt/index/references.fsidx {compose.INDEX_PATH}" in run
    assert "EXPOSE 9999" in run
    users = re.findall(r"^USER (\S+)$", run, re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in DOCKERFILE.read_text()


def test_dockerignore_keeps_local_artefacts_out_of_the_build() -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    ignored = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    for pattern in (".git", ".venv", "**/*.fsidx", "**/*.so", "**/*.egg-info", "build"):
        assert pattern in ignored
    assert not any("references.json" in p or p in ("data", "src") for p in ignored)
