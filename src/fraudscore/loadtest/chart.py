"""``latency.png``: request rate above, p50/p90/p99 latency below (log scale), one point per second.

``style_latency_axis`` is shared with the pipeline demo's chart (``stream.demo_report``).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fraudscore.errors import ConfigError
from fraudscore.loadtest.results import Second


def check_available() -> None:
    """Fail before a run, not after it, when the chart could not be drawn."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ConfigError("matplotlib is needed for the chart: install the dev extras")


def style_latency_axis(ax: Any, label: str) -> None:
    """A latency axis as every chart here draws it: log scale in plain numbers, a grid, a legend."""
    from matplotlib.ticker import LogFormatter

    ax.set_yscale("log")
    # Plain numbers (2, 5, 20) rather than 2x10^0 on the log axis.
    ax.yaxis.set_major_formatter(LogFormatter())
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
    ax.set_ylabel(label)
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="upper left")


def write_chart(series: Sequence[Second], path: Path, result: dict[str, Any]) -> None:
    """Draw ``series`` into ``path``; the title gives the run's request count, p99 and score."""
    # matplotlib is a dev extra: imported only when a chart is drawn.
    from matplotlib.figure import Figure

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
    style_latency_axis(latency_ax, "latency (ms)")
    latency_ax.set_xlabel("seconds since the first request")
    score, lat = result["score"], result["latency_ms"]
    fig.suptitle(
        f"{result['requests']} requests to {result['url']}, p99 {lat['p99']:.2f} ms\n"
        f"score {score['final']:.2f} (p99 {score['p99']:.2f} + detection {score['detection']:.2f})"
    )
    fig.savefig(path, dpi=100)
