"""What ``fraudscore pipeline demo`` reports: a series per interval, the totals, and the chart.

Every figure comes from the monitor's snapshots (``stream.monitor``), taken once per interval:
the rates from the streams' entries-added counters, the latency from the results each snapshot
read (a ``LatencyHistogram`` per interval; the run's percentiles are those histograms merged),
the decisions from the same results.  The target rate is the generator's own schedule
(``RateShape.schedule``): the events due within each interval.  The ground truth is the set of
event ids ``generate_labelled`` made fraudulent; a declined event is a positive.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fraudscore.stream.monitor import PRODUCTION_ARM, QUANTILES, Decision, LatencyHistogram, Quality, Snapshot


@dataclass(frozen=True)
class Interval:
    """One interval of the run (one second by default)."""

    t_s: float  # its end, in seconds since the generator started
    target_per_s: float  # the generator's schedule: events due in the interval per second
    in_per_s: float  # events added to the streams per second
    out_per_s: float  # results written per second
    dead: int  # dead letters written in the interval
    results: int  # results read in the interval: the latency's sample (all of them)
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None


def interval(previous: Snapshot, current: Snapshot, start: float, due: Sequence[float]) -> Interval:
    """The interval between two snapshots; ``start`` is the generator's start (monotonic clock)."""
    t0, t1 = previous.taken_at - start, current.taken_at - start
    seconds = max(t1 - t0, 1e-9)
    scheduled = bisect.bisect_right(due, t1) - bisect.bisect_right(due, t0)
    p50, p95, p99 = (current.latency.quantile(q) for _, q in QUANTILES)
    return Interval(
        t_s=round(t1, 3),
        target_per_s=scheduled / seconds,
        in_per_s=(current.total("published") - previous.total("published")) / seconds,
        out_per_s=(current.total("scored") - previous.total("scored")) / seconds,
        dead=current.total("dead") - previous.total("dead"),
        results=current.sampled,
        p50_ms=p50,
        p95_ms=p95,
        p99_ms=p99,
    )


def _rate(series: Sequence[Interval], name: str, total: int) -> dict[str, float]:
    """Mean (``total`` over the seconds up to the last interval with any) and peak of a rate."""
    values = [getattr(s, name) for s in series]
    active = [s.t_s for s, v in zip(series, values, strict=True) if v > 0]
    span = active[-1] if active else 0.0
    return {"mean": total / span if span else 0.0, "peak": max(values, default=0.0)}


def build(
    *,
    events: int,
    published: int,
    scored: int,
    dead: int,
    due: Sequence[float],
    series: Sequence[Interval],
    histograms: Sequence[LatencyHistogram],
    decisions: Sequence[Decision],
    frauds: frozenset[str],
    arms: Mapping[str, str],
    shape: dict[str, Any],
    redis: str,
    chart: Path | None,
) -> dict[str, Any]:
    """The report, as the JSON ``--json`` prints; ``arms``: each event's A/B arm where it is not
    production."""
    merged = LatencyHistogram()
    for h in histograms:
        merged.merge(h)
    by_arm: dict[tuple[str, str], dict[str, int]] = {}
    for d in decisions:
        arm = arms.get(d.event_id, PRODUCTION_ARM)
        counts = by_arm.setdefault((d.scorer, arm), {"approved": 0, "declined": 0})
        counts["approved" if d.approved else "declined"] += 1
    target_span = due[-1] if due else 0.0
    return {
        "events": events,
        "published": published,
        "results": scored,
        "results_read": len(decisions),
        "dead_letters": dead,
        "redis": redis,
        "shape": shape,
        "rate_per_s": {
            "target": {
                "mean": events / target_span if target_span else 0.0,
                "peak": max((s.target_per_s for s in series), default=0.0),
            },
            "in": _rate(series, "in_per_s", published),
            "out": _rate(series, "out_per_s", scored),
        },
        "latency_ms": {"count": merged.count, **{name: merged.quantile(q) for name, q in QUANTILES}},
        "decisions": [
            {"scorer": scorer, "arm": arm, **counts} for (scorer, arm), counts in sorted(by_arm.items())
        ],
        "truth": {"frauds": len(frauds), **Quality.of(decisions, frauds).as_json()},
        "per_second": [asdict(s) for s in series],
        "chart": None if chart is None else str(chart),
    }


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def text(report: dict[str, Any]) -> str:
    """The report for people: a few lines."""
    rate, lat, truth = report["rate_per_s"], report["latency_ms"], report["truth"]
    lines = [
        f"pipeline demo: {report['events']} events generated, {report['published']} published, "
        f"{report['results']} results, {report['dead_letters']} dead letters",
        "rate (events/s, mean / peak): "
        + ", ".join(
            f"{name} {rate[name]['mean']:,.0f} / {rate[name]['peak']:,.0f}"
            for name in ("target", "in", "out")
        ),
        f"enqueue->result ({lat['count']} results): "
        + ", ".join(f"{name} {_ms(lat[name])}" for name, _ in QUANTILES),
    ]
    for d in report["decisions"]:
        lines.append(
            f"decisions of {d['scorer']} ({d['arm']}): {d['approved']} approved, {d['declined']} declined"
        )
    lines.append(
        f"against the generator's {truth['frauds']} frauds: precision {_share(truth['precision'])}, "
        f"recall {_share(truth['recall'])} (tp {truth['tp']}, fp {truth['fp']}, fn {truth['fn']})"
    )
    return "\n".join(lines)


def write_chart(report: dict[str, Any], path: Path) -> None:
    """Rates above (target, in, out), enqueue-to-result percentiles below (log scale), per interval."""
    from matplotlib.figure import Figure

    from fraudscore.loadtest.chart import style_latency_axis

    series = report["per_second"]
    fig = Figure(figsize=(10, 6.5), layout="constrained")
    rate_ax, latency_ax = fig.subplots(2, 1, sharex=True)
    seconds = [s["t_s"] for s in series]
    for name, label, style in (
        ("target_per_s", "target", {"color": "tab:gray", "linestyle": "--"}),
        ("in_per_s", "in (published)", {"color": "tab:blue", "linewidth": 3, "alpha": 0.5}),
        ("out_per_s", "out (results)", {"color": "tab:green"}),
    ):
        rate_ax.plot(seconds, [s[name] for s in series], label=label, **style)
    rate_ax.set_ylim(bottom=0)
    rate_ax.set_ylabel("events / s")
    rate_ax.grid(alpha=0.3)
    rate_ax.legend(loc="upper left")
    for name, color in (("p50", "tab:green"), ("p95", "tab:orange"), ("p99", "tab:red")):
        values = [math.nan if s[f"{name}_ms"] is None else s[f"{name}_ms"] for s in series]
        latency_ax.plot(seconds, values, label=name, color=color)
    style_latency_axis(latency_ax, "enqueue -> result (ms)")
    latency_ax.set_xlabel("seconds since the generator started")
    lat = report["latency_ms"]
    fig.suptitle(
        f"{report['results']} results of {report['events']} events, {report['dead_letters']} dead letters; "
        f"p50 {_ms(lat['p50'])}, p99 {_ms(lat['p99'])}"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
