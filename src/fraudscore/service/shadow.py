"""After ``/v1/score`` has answered: drift observations and shadow scoring, off the response path.

``AfterAnswer.put`` only appends to a list (O(1)); the work runs in a callback the event loop
calls after the current one, i.e. after the answer was written: a flush is scheduled with
``call_soon`` when ``BATCH`` requests are waiting, else ``DELAY_SECONDS`` after the first.  The
flush feeds each version's drift tracker (O(1) per request, on the loop) and hands the shadow
versions one batch in a thread of their own (the model's batch call releases the GIL), one batch
at a time.  The queue is bounded: while a batch is scoring and ``CAPACITY`` requests wait, more
are dropped and counted (``fraudscore_shadow_dropped_total``) rather than queued, so overload
costs shadow samples, never the answers' latency or the process's memory.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from fraudscore.models.live import DriftLike, LiveModels, Loaded

BATCH = 64  # requests per shadow batch call
DELAY_SECONDS = 0.005  # the longest a request waits for its batch to fill
CAPACITY = 4096  # requests waiting at most; more are dropped (counted)
SCORE_BUCKETS = 20  # score histograms in steps of 0.05
SERVED, SHADOW = "served", "shadow"

_Item = tuple[DriftLike, list[float], float, bool, tuple[Loaded, ...]]


class ScoreHistogram:
    """Counts of scores in [0, 1] in SCORE_BUCKETS equal buckets, and their sum."""

    def __init__(self) -> None:
        self.counts = [0] * SCORE_BUCKETS
        self.total = 0.0

    def add(self, score: float) -> None:
        self.counts[min(SCORE_BUCKETS - 1, max(0, int(score * SCORE_BUCKETS)))] += 1
        self.total += score

    def buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for i, count in enumerate(self.counts):
            running += count
            out.append(("+Inf" if i == SCORE_BUCKETS - 1 else repr((i + 1) / SCORE_BUCKETS), running))
        return out


class AfterAnswer:
    """The bounded queue of answered requests, and what the shadows made of them."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        batch: int = BATCH,
        capacity: int = CAPACITY,
        delay: float = DELAY_SECONDS,
    ) -> None:
        self.loop = loop
        self.batch = batch
        self.capacity = capacity
        self.delay = delay
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="shadow")
        self.items: list[_Item] = []
        self.dropped = 0
        self.scored: Counter[str] = Counter()
        self.disagreed: Counter[str] = Counter()
        self.histograms: dict[tuple[str, str], ScoreHistogram] = {}
        self._scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._busy = False

    def put(
        self,
        drift: DriftLike,
        vector: list[float],
        score: float,
        approved: bool,
        shadows: tuple[Loaded, ...],
    ) -> None:
        """Queue one answered request (called on the loop, before its answer is written)."""
        if len(self.items) >= self.capacity:
            self.dropped += 1
            return
        self.items.append((drift, vector, score, approved, shadows))
        if len(self.items) >= self.batch:
            if not self._scheduled:
                self._scheduled = True
                self.loop.call_soon(self.flush)
        elif self._timer is None and not self._scheduled:
            self._timer = self.loop.call_later(self.delay, self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._busy or not self.items:
            return  # the batch in hand flushes again when it is done
        items, self.items = self.items, []
        work: dict[tuple[Loaded, ...], list[tuple[Sequence[float], float, bool]]] = {}
        for drift, vector, score, approved, shadows in items:
            drift.observe(vector, score)
            if shadows:
                work.setdefault(shadows, []).append((vector, score, approved))
        if not work:
            return
        held = [s for shadows in work for s in shadows if s.acquire()]
        self._busy = True
        future = self.loop.run_in_executor(self.executor, _score, work, held)
        future.add_done_callback(lambda f: self._done(f, held))

    def _done(
        self,
        future: asyncio.Future[list[tuple[str, list[float], list[float], list[bool]]]],
        held: list[Loaded],
    ) -> None:
        self._busy = False
        for loaded in held:
            loaded.release()
        if not future.cancelled() and future.exception() is None:
            for version, served, scores, agree in future.result():
                self.scored[version] += len(scores)
                self.disagreed[version] += agree.count(False)
                shadow = self.histograms.setdefault((version, SHADOW), ScoreHistogram())
                for score in scores:
                    shadow.add(score)
                served_hist = self.histograms.setdefault((version, SERVED), ScoreHistogram())
                for score in served:
                    served_hist.add(score)
        if self.items and not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self.flush)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.executor.shutdown(wait=True, cancel_futures=True)

    def status(self) -> dict[str, object]:
        return {
            "queued": len(self.items),
            "dropped": self.dropped,
            "scored": dict(self.scored),
            "disagreed": dict(self.disagreed),
        }


def _score(
    work: dict[tuple[Loaded, ...], list[tuple[Sequence[float], float, bool]]], held: list[Loaded]
) -> list[tuple[str, list[float], list[float], list[bool]]]:
    """In the shadow thread: each held shadow's scores of its requests, and whether its decision
    agrees with the one answered."""
    out = []
    for shadows, requests in work.items():
        vectors = [r[0] for r in requests]
        served = [r[1] for r in requests]
        for loaded in shadows:
            if loaded not in held:
                continue  # closed before the batch began: it left the live set
            scores = loaded.scorer.scores(vectors)
            approves = loaded.scorer.approves
            agree = [approves(s) == r[2] for s, r in zip(scores, requests, strict=True)]
            out.append((loaded.version, served, scores, agree))
    return out


class LifecycleCollector:
    """``/metrics``' share of the lifecycle: the versions served, swaps, failures and shadows."""

    def __init__(self, live: LiveModels, after: AfterAnswer | None) -> None:
        self.live = live
        self.after = after

    def collect(self) -> Iterator[Metric]:
        serving = GaugeMetricFamily(
            "fraudscore_model_serving",
            "Versions this instance serves now (1), by arm: production, candidate, beside, shadow.",
            labels=["version", "arm"],
        )
        for row in self.live.current.describe():
            serving.add_metric([row["version"], row["arm"]], 1)
        yield serving
        yield CounterMetricFamily(
            "fraudscore_model_swaps", "Live model sets swapped in without a restart.", value=self.live.swaps
        )
        yield CounterMetricFamily(
            "fraudscore_model_swap_failures",
            "Registry changes refused because a version failed to load (the current set kept serving).",
            value=len(self.live.failures),
        )
        after = self.after
        if after is None:
            return
        yield CounterMetricFamily(
            "fraudscore_shadow_dropped",
            "Requests not shadow-scored because the shadow queue was full.",
            value=after.dropped,
        )
        scored = CounterMetricFamily(
            "fraudscore_shadow_scored", "Requests scored by a shadow version.", labels=["version"]
        )
        disagreed = CounterMetricFamily(
            "fraudscore_shadow_disagreements",
            "Requests whose shadow decision differs from the decision answered.",
            labels=["version"],
        )
        for version, count in after.scored.items():
            scored.add_metric([version], count)
            disagreed.add_metric([version], after.disagreed[version])
        yield scored
        yield disagreed
        scores = HistogramMetricFamily(
            "fraudscore_shadow_score",
            "Scores of the shadow-scored requests: the shadow's, and the served model's.",
            labels=["version", "role"],
        )
        for (version, role), histogram in after.histograms.items():
            scores.add_metric([version, role], histogram.buckets(), histogram.total)
        yield scores
