"""One load-test run: check what it needs, run k6, read its results, write result.json and the chart."""

from __future__ import annotations

import json
import logging
import tempfile
import urllib.error
import urllib.request
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fraudscore.contract import testdata
from fraudscore.contract.testdata import Entry
from fraudscore.defaults import SCORE_PATH
from fraudscore.errors import DataFileError, LoadTestError, TransientError
from fraudscore.loadtest import chart, k6, results
from fraudscore.loadtest.contest import detection_score, final_score, p99_score
from fraudscore.loadtest.profile import MAX_VUS, Profile

log = logging.getLogger(__name__)


def load_test(
    *,
    url: str,
    data: Path,
    profile: Profile,
    path: str = SCORE_PATH,
    out_dir: Path,
    k6_binary: str | None,
    cycle: bool = False,
    draw_chart: bool = True,
) -> dict[str, Any]:
    """Run k6 against url + path with the entries of data; write result.json (and with draw_chart, k6's
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
            url + path,
            planned,
            len(entries),
        )
        samples = workdir / "samples.json.gz" if draw_chart else None
        summary = k6.run_k6(
            k6_path,
            url=url,
            path=path,
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
        "path": path,
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
        raise TransientError(f"the service does not answer at {url}: {reason}") from None


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
