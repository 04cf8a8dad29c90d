"""What the benchmark scripts share: the dev payloads, and a description of the machine."""

from __future__ import annotations

import gzip
import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from fraudscore.defaults import SCORE_PATH
from fraudscore.loadtest.profile import TARGET_RATE

ROOT = Path(__file__).resolve().parent.parent
DEV_DATA = Path(os.environ.get("FRAUDSCORE_TEST_DATA", ROOT.parent / "shared" / "data" / "dev-data.json.gz"))
INDEX = ROOT / "data" / "references.fsidx"


def scoring_request(payload: Any, path: str = SCORE_PATH) -> bytes:
    """One whole POST request to path, compact JSON body, headers as a load tester sends."""
    body = json.dumps(payload, separators=(",", ":")).encode()
    head = b"POST %s HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n" % path.encode()
    return head + b"Content-Length: %d\r\n\r\n" % len(body) + body


def dev_entries(path: Path = DEV_DATA) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = json.loads(gzip.decompress(path.read_bytes()))["entries"]
    return entries


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    system = f"{platform.system()} {platform.release()}"
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, {system}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def fraudscore(command: str, *args: str, log_level: str = "WARNING") -> list[str]:
    """The argv of `fraudscore COMMAND ARGS` on the test address, with this Python."""
    return [
        sys.executable,
        "-m",
        "fraudscore.cli",
        "--log-level",
        log_level,
        command,
        "--index",
        str(INDEX),
        "--host",
        "127.0.0.1",
        *args,
    ]


def proc_status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def cpu_seconds(pid: int) -> float:
    parts = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(parts[11]) + int(parts[12])  # utime + stime
    return ticks / 100.0


def loadtest(
    url: str, target: float, duration: float, out: Path, *, chart: bool = True, path: str = SCORE_PATH
) -> dict[str, object]:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "fraudscore.cli",
            "loadtest",
            "--url",
            url,
            "--path",
            path,
            "--data",
            str(DEV_DATA),
            "--rate-multiplier",
            f"{target / TARGET_RATE:.6f}",
            "--duration",
            str(duration),
            "--cycle",
            "--out",
            str(out),
            *([] if chart else ["--no-chart"]),
        ],
        check=True,
    )
    result: dict[str, Any] = json.loads((out / "result.json").read_text())
    return result
