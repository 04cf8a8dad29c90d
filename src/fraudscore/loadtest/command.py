"""`fraudscore loadtest`: run the contract's k6 load test against a service and score the run.

Python does what k6 cannot: it gunzips the test data into the plain JSON that k6's ``open()`` reads,
finds the binary, and checks that the service answers (``k6.py``).  k6 runs ``loadtest.js`` with the
profile of ``profile.py``, judges every answer, and hands back its end-of-test summary and, for the
chart, every latency sample (read by ``results.py``).  From those this command writes the contest's
score (``contest.py``) into ``result.json`` and draws ``latency.png`` (``chart.py``).

The score comes from the summary alone.  Writing and compressing every sample costs k6 CPU on the
machine it measures, which shows in the tail (BENCHMARKS.md): ``--no-chart`` leaves the samples and
the chart out, for a run closer to plain k6 with only its summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fraudscore.contract import testdata
from fraudscore.contract.testdata import Entry
from fraudscore.errors import DataFileError, FraudscoreError, LoadTestError
from fraudscore.loadtest import chart, k6, results
from fraudscore.loadtest.contest import detection_score, final_score, p99_score
from fraudscore.loadtest.profile import DURATION_S, MAX_VUS, START_RATE, TARGET_RATE, Profile

log = logging.getLogger(__name__)

DEFAULT_URL = "http://localhost:9999"
DEFAULT_OUT = "loadtest-results"
SHARED_DATA = Path("../shared/data/dev-data.json.gz")
LOCAL_DATA = Path("data/dev-data.json.gz")


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
        help=f"multiply the start and target rates ({START_RATE:g} -> {TARGET_RATE:g} req/s) by X; "
        "each entry is still sent at most once (default: 1)",
    )
    parser.add_argument(
        "--duration",
        type=_positive,
        default=DURATION_S,
        metavar="SECONDS",
        help="length of the ramp; once the entries run out the rest of the ramp sends nothing "
        f"(default: {DURATION_S:g})",
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
            profile=Profile(rate_multiplier=args.rate_multiplier, duration_s=args.duration),
            out_dir=Path(args.out),
            k6_binary=args.k6,
            cycle=args.cycle,
            draw_chart=not args.no_chart,
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
    profile: Profile,
    out_dir: Path,
    k6_binary: str | None,
    cycle: bool = False,
    draw_chart: bool = True,
) -> dict[str, Any]:
    """Run k6 against url with the entries of data; write result.json (and with draw_chart, k6's
    samples read into per-second figures and latency.png); return the result."""
    k6_path = k6.find_k6(k6_binary)
    if draw_chart:
        chart.check_available()
    entries = load_entries(data)
    check_url(url)
    planned = profile.iterations if cycle else min(len(entries), profile.iterations)
    with tempfile.TemporaryDirectory(prefix="fraudscore-loadtest-") as tmp:
        workdir = Path(tmp)
        log.info(
            "k6: %g -> %g req/s over %g s against %s; sending %d of %d entries",
            profile.start_rate,
            profile.target_rate,
            profile.duration_s,
            url,
            planned,
            len(entries),
        )
        samples = workdir / "samples.json.gz" if draw_chart else None
        summary = k6.run_k6(
            k6_path,
            url=url,
            entries=entries,
            profile=profile,
            workdir=workdir,
            cycle=cycle,
            samples_file=samples,
        )
        log.info("k6 finished; reading its results")
        series = results.read_series(samples) if samples is not None else []
    counts = results.read_counts(summary)
    if counts.requests == 0:
        raise LoadTestError("k6 sent no request: is the data file empty or the duration too short?")
    sent = results.counter(summary, "http_reqs")
    if counts.requests != sent:
        log.warning("%d requests judged but k6 sent %d", counts.requests, sent)
    dropped = results.counter(summary, "dropped_iterations")
    if dropped:
        # Dropped iterations take no entry: the entries they would have sent are sent later, or not at all.
        log.warning("k6 dropped %d iterations: all %d VUs were busy waiting for answers", dropped, MAX_VUS)
    latency = results.read_latency(summary)
    result: dict[str, Any] = {
        "url": url,
        "data": str(data),
        "entries": len(entries),
        "profile": {**profile.describe(), "cycle": cycle},
        "requests": counts.requests,
        "counts": asdict(counts),
        "fraud_score_mismatches": results.counter(summary, "fraud_score_mismatches"),
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
    if draw_chart:
        chart.write_chart(series, out_dir / "latency.png", result)
    return result


def load_entries(path: Path) -> list[Entry]:
    """The test data's entries; each request must be a JSON object, the body k6 posts."""
    if not path.exists():
        raise DataFileError(f"test data not found: {path}")
    entries = testdata.load(path)
    for i, entry in enumerate(entries):
        if not isinstance(entry.request, dict):
            raise DataFileError(f"{path}: entry {i} has a field of the wrong type")
    return entries


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


# --- reporting ----------------------------------------------------------------------------------------


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
