"""What the benchmark scripts share: the dev payloads, and a description of the machine."""

from __future__ import annotations

import gzip
import json
import os
import platform
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEV_DATA = Path(os.environ.get("FRAUDSCORE_TEST_DATA", ROOT.parent / "shared" / "data" / "dev-data.json.gz"))
INDEX = ROOT / "data" / "references.fsidx"


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


def percentile(sorted_values: list[float], p: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * p))]
