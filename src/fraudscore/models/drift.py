"""Drift: how far recent requests are from the data a model was trained on.

For every feature of the contract's vector and for the model's score, the population stability
index (PSI) of the recent requests against the reference distribution stored in the model's
``meta.json`` (``models/train.py``, ``drift_reference``: decile bins per feature, 20 bins of the
score), over two sliding windows: the last ``window`` requests (the *count* window) and the
requests of the last ``seconds`` (the *time* window).

PSI = sum over bins of (p - q) * ln(p / q), p the window's share of a bin and q the reference's.
A bin that is empty on one side would make it infinite, so both shares are floored at
``EPSILON`` (1e-4, i.e. one request in 10,000) first: a bin empty on both sides adds nothing, and
a bin empty on one side adds a large but finite amount.  The usual reading: < 0.1 stable,
0.1-0.2 a shift to watch, > 0.2 (``THRESHOLD``) a significant shift.

Bins are the reference's: (-inf, e0], (e0, e1], ..., (e_last, inf), a value equal to an edge in
the bin the edge closes, exactly as training counted them (``searchsorted``, side "left"): a
value's bin is the number of edges strictly below it, compared as the same doubles.  The
contract's vector is rounded to 4 decimals (``vectorize``) and so were the references, so a flag
(0 or 1), the -1 sentinel or an MCC risk level lands in the same bin here as in training, bit for
bit.  No categorical bins are needed for the flags: training's deciles of a 0/1 flag are the
edges [0, 1], i.e. the bins (-inf, 0], (0, 1] and an always empty (1, inf), and the dev
payloads' flags land in them as the references' did (PSI 0.01-0.05 for the flags).

Cost on the answer path: ``Drift.observe`` is the native ``_drift.Tracker.observe`` itself
(models/_drift.c): one call bins the request (a scan of at most 10 edges per feature), reads
CLOCK_MONOTONIC (``time.monotonic``'s clock) and counts the request's 15 codes into both windows;
about 0.3 us (bench/drift_overhead.py).  The count window is a ring of the last ``window``
requests' codes with a running count per bin; the time window is ``TIME_SLOTS`` slots of
``seconds / TIME_SLOTS`` each, so it spans the last ``seconds`` to within one slot.  The PSI
(numpy) is computed every ``BATCH`` requests, to check the alerts, and at every snapshot.
Binning batches with numpy instead cost about 1 us per request once the request path had cooled
its caches, more than the 3 % budget of a ~40 us request.

A PSI over few requests is noise (over 256 of the dev payloads, in their own order, up to 0.24
against the training data), so a window's PSI is only computed once it holds
``MIN_OBSERVATIONS`` requests (1,000: at most 0.09 there).  A series alerts when a window's PSI
exceeds the threshold, logged once as a warning; it clears (logged once) when both windows are
back at or below ``CLEAR_FRACTION`` of it, so a PSI hovering at the threshold does not flap.

Not thread-safe: ``observe`` and ``snapshot`` (and the collector, which calls it at scrape time)
run on the service's one event-loop thread.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from prometheus_client.core import GaugeMetricFamily, Metric

from fraudscore.contract.vectorize import FEATURES
from fraudscore.errors import ModelFormatError, UsageError
from fraudscore.models import _drift

log = logging.getLogger(__name__)

THRESHOLD = 0.2  # PSI above which a feature has drifted (the usual rule of thumb)
CLEAR_FRACTION = 0.8  # an alert clears when the PSI falls back to this fraction of the threshold
EPSILON = 1e-4  # floor of both shares in the PSI, so an empty bin counts as finite
BATCH = 1024  # the alerts are checked every BATCH requests (and at every snapshot)
MIN_OBSERVATIONS = 1000  # a window's PSI is reported from this many requests on
TIME_SLOTS = 30  # the time window's resolution: seconds / TIME_SLOTS
WINDOWS = ("count", "time")
SCORE = "score"  # the score's series name, beside the features'
SERIES = (*FEATURES, SCORE)

Ints = npt.NDArray[np.integer[Any]]
Floats = npt.NDArray[np.float64]


def psi(observed: Sequence[float] | Floats, reference: Sequence[float] | Floats) -> float:
    """The PSI of shares ``observed`` against ``reference`` (same bins), both floored at EPSILON.

    >>> round(psi([0.5, 0.5], [0.5, 0.5]), 6)
    0.0
    >>> round(psi([0.9, 0.1], [0.5, 0.5]), 4)
    0.8789
    """
    p = np.maximum(np.asarray(observed, dtype=np.float64), EPSILON)
    q = np.maximum(np.asarray(reference, dtype=np.float64), EPSILON)
    return float(np.sum((p - q) * np.log(p / q)))


def _reference(meta: dict[str, Any]) -> tuple[list[Floats], list[Floats]]:
    """(edges, shares) per series, in SERIES order, from a version's meta.json."""
    version = meta.get("version", "?")
    drift = meta.get("drift")
    if not isinstance(drift, dict):
        raise ModelFormatError(
            f"{version}: meta.json holds no drift reference (only trained models have one)"
        )
    features = drift.get("features")
    if not isinstance(features, dict):
        raise ModelFormatError(f"{version}: meta.json's drift reference has no features")
    all_edges, all_shares = [], []
    for name in SERIES:
        entry = drift.get(SCORE) if name == SCORE else features.get(name)
        try:
            edges = np.asarray(entry["edges"], dtype=np.float64)  # type: ignore[index]
            shares = np.asarray(entry["shares"], dtype=np.float64)  # type: ignore[index]
        except (TypeError, KeyError, ValueError) as exc:
            raise ModelFormatError(f"{version}: meta.json's drift reference of {name} is malformed") from exc
        if (
            edges.ndim != 1
            or len(shares) != len(edges) + 1
            or np.any(np.diff(edges) <= 0)
            or not np.all(np.isfinite(edges))
            or np.any(shares < 0)
            or not shares.sum() > 0
        ):
            raise ModelFormatError(f"{version}: meta.json's drift reference of {name} is malformed")
        all_edges.append(edges)
        all_shares.append(shares / shares.sum())  # stored rounded to 6 decimals
    return all_edges, all_shares


class Drift:
    """PSI of recent requests against one model version's training distribution."""

    def __init__(
        self,
        version: str,
        edges: Sequence[Floats],
        shares: Sequence[Floats],
        *,
        window: int = 5000,
        seconds: float = 300.0,
        threshold: float = THRESHOLD,
        min_observations: int = MIN_OBSERVATIONS,
        clock: Callable[[], float] = time.monotonic,
        log_alerts: bool = True,
    ) -> None:
        if window < 1:
            raise UsageError(f"the drift window must hold at least 1 request, got {window}")
        if not seconds > 0 or math.isinf(seconds):
            raise UsageError(f"the drift time window must be a positive number of seconds, got {seconds}")
        if not threshold > 0:
            raise UsageError(f"the drift threshold must be positive, got {threshold}")
        self.version = version
        self.window = window
        self.seconds = float(seconds)
        self.threshold = float(threshold)
        self.min_observations = max(1, min_observations)
        self._clock = clock
        self._log_alerts = log_alerts
        self._slot_seconds = self.seconds / TIME_SLOTS
        sizes = [len(s) for s in shares]
        self._starts = np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64)
        self._bins = int(sum(sizes))
        self._sentinel = self._bins  # the code of "no observation": counted in a bin nobody reads
        self._reference = np.maximum(np.concatenate(shares), EPSILON)
        self._log_reference = np.log(self._reference)
        # both windows' counts, kept natively on the answer path (_drift.c) in these arrays
        width = self._bins + 1  # the last code marks a ring row not yet written
        ring = bytearray(2 * window * len(SERIES))
        counts = bytearray(8 * width)
        slot_counts = bytearray(8 * TIME_SLOTS * width)
        slot_ids = bytearray(8 * TIME_SLOTS)
        # the count window: a ring of the last `window` requests' codes, and the count per code
        np.frombuffer(ring, dtype=np.int16)[:] = self._sentinel
        self._counts = np.frombuffer(counts, dtype=np.int64)
        # the time window: per-slot counts per code, each slot tagged with its number (time // slot)
        self._slot_counts = np.frombuffer(slot_counts, dtype=np.int64).reshape(TIME_SLOTS, width)
        self._slot_ids = np.frombuffer(slot_ids, dtype=np.int64)
        self._slot_ids[:] = -(1 << 62)
        self._tracker = _drift.Tracker(
            [[float(e) for e in series] for series in edges],
            ring,
            counts,
            slot_counts,
            slot_ids,
            self._slot_seconds,
            BATCH,
            None if clock is time.monotonic else clock,  # None: the same clock, read natively
            self._update_alerts,
        )
        # the answer path's call: the native method itself, no Python frame in between
        self.observe: Callable[[list[float], float], None] = self._tracker.observe
        """Count one request: its contract vector (a list of the 14 floats ``vectorize`` makes)
        and the model's score (probability).  ValueError if the vector is not such a list."""
        self._alerts = np.zeros(len(SERIES), dtype=bool)

    @classmethod
    def for_meta(
        cls,
        meta: dict[str, Any],
        *,
        window: int = 5000,
        seconds: float = 300.0,
        threshold: float = THRESHOLD,
        min_observations: int = MIN_OBSERVATIONS,
        clock: Callable[[], float] = time.monotonic,
        log_alerts: bool = True,
    ) -> Drift:
        """The drift of a model version, against the reference in its meta.json."""
        edges, shares = _reference(meta)
        return cls(
            str(meta.get("version", "?")),
            edges,
            shares,
            window=window,
            seconds=seconds,
            threshold=threshold,
            min_observations=min_observations,
            clock=clock,
            log_alerts=log_alerts,
        )

    # -- the answer path ---------------------------------------------------------------------

    @property
    def observed(self) -> int:
        """Requests observed since the start."""
        return self._tracker.observed

    # -- reading -----------------------------------------------------------------------------

    def _time_counts(self) -> Ints:
        """Counts per bin of the slots within the last ``seconds`` (the current slot included)."""
        now = math.floor(self._clock() / self._slot_seconds)
        live = self._slot_ids > now - TIME_SLOTS
        counts: Ints = self._slot_counts[live].sum(axis=0)
        return counts

    def _psi(self, counts: Ints, n: int) -> Floats | None:
        """PSI per series of a window holding ``n`` requests with ``counts`` per bin; None if too few."""
        if n < self.min_observations:
            return None
        p = counts[: self._bins] * (1.0 / n)
        np.maximum(p, EPSILON, out=p)
        terms: Floats = np.add.reduceat(
            (p - self._reference) * (np.log(p) - self._log_reference), self._starts
        )
        return terms

    def _windows(self) -> dict[str, tuple[int, Floats | None]]:
        time_counts = self._time_counts()
        n_time = int(time_counts[self._starts[-1] : self._bins].sum())  # each request has one score bin
        return {
            "count": (self._tracker.filled, self._psi(self._counts, self._tracker.filled)),
            "time": (n_time, self._psi(time_counts, n_time)),
        }

    def _update_alerts(self) -> None:
        windows = self._windows()
        worst = np.zeros(len(SERIES))
        for _, values in windows.values():
            if values is not None:
                worst = np.maximum(worst, values)
        raised = ~self._alerts & (worst > self.threshold)
        cleared = self._alerts & (worst <= self.threshold * CLEAR_FRACTION)
        self._alerts = (self._alerts | raised) & ~cleared
        if not self._log_alerts:
            return
        for i in np.flatnonzero(raised):
            where = [f"{w} {v[i]:.3f}" for w, (_, v) in windows.items() if v is not None]
            log.warning(
                "drift alert: %s of %s has PSI %s, above %g",
                SERIES[i],
                self.version,
                ", ".join(where),
                self.threshold,
            )
        for i in np.flatnonzero(cleared):
            log.info(
                "drift cleared: %s of %s has PSI %.3f, back under %g",
                SERIES[i],
                self.version,
                worst[i],
                self.threshold,
            )

    def snapshot(self) -> dict[str, Any]:
        """The PSI of every series over both windows, the alerts and the windows' sizes (JSON-ready).

        The alerts are brought up to date first (the windows may have moved on since the last check)."""
        self._update_alerts()
        windows = self._windows()
        series = {}
        for i, name in enumerate(SERIES):
            series[name] = {
                "psi": {w: (None if v is None else round(float(v[i]), 6)) for w, (_, v) in windows.items()},
                "alert": bool(self._alerts[i]),
            }
        return {
            "version": self.version,
            "threshold": self.threshold,
            "observed": self.observed,
            "windows": {
                "count": {"size": self.window, "observations": windows["count"][0]},
                "time": {"seconds": self.seconds, "observations": windows["time"][0]},
            },
            "min_observations": self.min_observations,
            "series": series,
            "alerts": [name for i, name in enumerate(SERIES) if self._alerts[i]],
        }


class DriftCollector:
    """prometheus_client collector of the drift of the versions ``source()`` returns, at scrape time.

    ``fraudscore_drift_psi{version, feature, window}`` (absent while a window holds fewer than
    ``min_observations`` requests), ``fraudscore_drift_alert{version, feature}`` (1 while
    alerting) and ``fraudscore_drift_observations{version, window}``.  ``feature`` is one of the
    contract's 14 or ``score``."""

    def __init__(self, source: Callable[[], Iterable[Drift]]) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        psi_family = GaugeMetricFamily(
            "fraudscore_drift_psi",
            "PSI of recent requests against the training data, per feature (and score) and window.",
            labels=["version", "feature", "window"],
        )
        alert = GaugeMetricFamily(
            "fraudscore_drift_alert",
            "1 while a feature's PSI is above the drift threshold (0.2 by default) in a window.",
            labels=["version", "feature"],
        )
        observations = GaugeMetricFamily(
            "fraudscore_drift_observations",
            "Requests in each drift window.",
            labels=["version", "window"],
        )
        for drift in self._source():
            snap = drift.snapshot()
            version = snap["version"]
            for window in WINDOWS:
                observations.add_metric([version, window], snap["windows"][window]["observations"])
            for name, entry in snap["series"].items():
                for window, value in entry["psi"].items():
                    if value is not None:
                        psi_family.add_metric([version, name, window], value)
                alert.add_metric([version, name], 1.0 if entry["alert"] else 0.0)
        yield psi_family
        yield alert
        yield observations


def offline(meta: dict[str, Any], vectors: Sequence[list[float]], scores: Sequence[float]) -> dict[str, Any]:
    """The drift snapshot of a whole set of requests (a payload file) against a version: one window
    holding them all (the time window is the same requests, so it is left out)."""
    if len(vectors) != len(scores):
        raise ValueError("one score per vector")
    drift = Drift.for_meta(
        meta, window=max(1, len(vectors)), min_observations=1, clock=lambda: 0.0, log_alerts=False
    )
    for vector, score in zip(vectors, scores, strict=True):
        drift.observe(vector, score)
    snap = drift.snapshot()
    for entry in snap["series"].values():
        entry["psi"] = {"count": entry["psi"]["count"]}
    del snap["windows"]["time"]
    return snap
