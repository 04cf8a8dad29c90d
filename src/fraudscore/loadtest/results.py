"""Reading what k6 hands back: its end-of-test summary (counts, latency) and its per-request samples.

``loadtest.js`` counts each judged answer in its own counters (``fraud_tp`` ...); the latency is
k6's own ``http_req_duration``.  The samples (``--out json``) give the per-second series of the chart.
"""

from __future__ import annotations

import gzip
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from fraudscore.errors import LoadTestError
from fraudscore.loadtest.contest import Counts

SUMMARY_TREND_STATS = ("avg", "min", "med", "max", "p(50)", "p(90)", "p(99)")
"""The statistics k6's summary computes for each trend; ``read_latency`` reads four of them."""


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


def _values(summary: dict[str, Any], metric: str) -> dict[str, Any]:
    """A metric's values in k6's summary; a counter never added to is absent, and reads as empty."""
    entry = summary["metrics"].get(metric)
    values = entry.get("values") if isinstance(entry, dict) else None
    return values if isinstance(values, dict) else {}


def counter(summary: dict[str, Any], metric: str) -> int:
    """A counter's total in k6's summary (0 when it was never added to).

    >>> counter({"metrics": {"http_reqs": {"values": {"count": 7, "rate": 3.5}}}}, "http_reqs")
    7
    """
    return int(_values(summary, metric).get("count", 0))


def read_counts(summary: dict[str, Any]) -> Counts:
    """TP/TN/FP/FN/HTTP errors as counted by loadtest.js.

    >>> read_counts({"metrics": {"fraud_tp": {"values": {"count": 3}}, "fraud_fn": {"values": {"count": 1}}}})
    Counts(tp=3, tn=0, fp=0, fn=1, http_errors=0)
    """
    return Counts(
        tp=counter(summary, "fraud_tp"),
        tn=counter(summary, "fraud_tn"),
        fp=counter(summary, "fraud_fp"),
        fn=counter(summary, "fraud_fn"),
        http_errors=counter(summary, "fraud_http_errors"),
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
    """(time, ms) of every http_req_duration sample in k6's --out json file (gzipped)."""
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


def read_series(samples: Path) -> list[Second]:
    """The per-second series of k6's samples file; a file k6 left unreadable is a LoadTestError."""
    try:
        return per_second(read_latency_samples(samples))
    except (OSError, EOFError, ValueError, KeyError, TypeError) as exc:
        raise LoadTestError(f"cannot read k6's samples: {exc}") from None
