"""A live view of the pipeline, from Redis alone: what came in, what was scored, what is behind.

``snapshot`` reads, per partition: the events, results and dead letters ever added to each
stream (XINFO STREAM's entries-added, which trimming does not lower), the group's pending
entries and lag (XINFO GROUPS), and the lease's owner; and the results themselves: the newest
``sample`` per partition for a first snapshot, every result written since the previous one's
for the next (``since``).  Each result read is a ``Decision``: its event, whether it was
approved, the scorer, and the time from enqueue to scored.  ``line`` turns two snapshots into
one line of rates; ``fraudscore monitor`` prints one such line per interval, and
``fraudscore pipeline demo`` keeps the snapshots for its report and chart.

Latencies go into a ``LatencyHistogram``: log-spaced buckets that merge by adding counts, so
the percentiles of a whole run are those of its intervals' histograms merged.

The live view (``LiveView``, ``render``, ``compact``) adds each worker's rate (a partition's
results count for its lease's owner), decisions by scorer and A/B arm, and precision/recall
against the ground truth of ``fraudscore generate``'s runs (``Truth``: the run's set of fraud
ids in Redis, the run named by the event id).  ``run_stats`` gives one run's figures from all
of its results.
"""

from __future__ import annotations

import math
import time
from collections.abc import Container, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import redis

from fraudscore.stream.keys import GROUP, PartitionKeys
from fraudscore.stream.worker import Client


@dataclass(frozen=True)
class PartitionStats:
    index: int
    published: int  # entries ever added to the events stream
    scored: int  # results ever written
    dead: int  # dead letters ever written
    pending: int  # delivered to a worker, not acknowledged
    lag: int | None  # not yet delivered (None when Redis cannot tell)
    owner: str | None  # the worker holding the lease


@dataclass(frozen=True)
class Decision:
    """One result as the monitor reads it."""

    event_id: str
    approved: bool
    scorer: str  # kind:name:version
    latency_ms: float  # enqueue (the events entry's id) to scored (the worker's clock)


class LatencyHistogram:
    """Counts of latencies in log-spaced buckets, each 1/16 of a doubling (4.4 %) wide.

    A quantile is the upper bound of the bucket it falls in: at most 4.4 % above the true
    value, and the same whether the histograms were merged first or not.

    >>> h = LatencyHistogram.of([1.0, 2.0, 3.0, 4.0, 100.0])
    >>> [round(h.quantile(q), 2) for q in (0.5, 0.99)], h.count
    ([3.04, 101.73], 5)
    """

    PER_DOUBLING = 16
    FLOOR_MS = 0.01  # the first bucket holds everything at or below this

    def __init__(self, counts: dict[int, int] | None = None) -> None:
        self.counts: dict[int, int] = dict(counts or {})

    @classmethod
    def of(cls, values: Iterable[float]) -> LatencyHistogram:
        h = cls()
        for v in values:
            h.add(v)
        return h

    @property
    def count(self) -> int:
        return sum(self.counts.values())

    def add(self, ms: float) -> None:
        b = 0 if ms <= self.FLOOR_MS else math.ceil(math.log2(ms / self.FLOOR_MS) * self.PER_DOUBLING - 1e-9)
        self.counts[b] = self.counts.get(b, 0) + 1

    def merge(self, other: LatencyHistogram) -> None:
        for b, n in other.counts.items():
            self.counts[b] = self.counts.get(b, 0) + n

    def upper_ms(self, bucket: int) -> float:
        return self.FLOOR_MS * 2 ** (bucket / self.PER_DOUBLING)

    def quantile(self, q: float) -> float | None:
        """The upper bound of the bucket of the ``q`` quantile (the ceil(q*n)-th value); None if empty."""
        total = self.count
        if not total:
            return None
        rank = max(1, math.ceil(q * total - 1e-9))
        seen = 0
        for b in sorted(self.counts):
            seen += self.counts[b]
            if seen >= rank:
                return self.upper_ms(b)
        raise AssertionError("unreachable: rank <= total")


@dataclass(frozen=True)
class Snapshot:
    taken_at: float  # time.monotonic()
    partitions: list[PartitionStats]
    decisions: list[Decision]  # the newest results (a first snapshot), or those since ``since``
    cursor: tuple[bytes | None, ...]  # per partition: the newest result read (None: none yet)
    skipped: bool = False  # results were passed over (more than ``limit`` in a partition)
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)

    def __post_init__(self) -> None:
        self.latency.merge(LatencyHistogram.of(d.latency_ms for d in self.decisions))

    @property
    def latencies_ms(self) -> list[float]:
        return [d.latency_ms for d in self.decisions]

    @property
    def approved(self) -> int:
        return sum(d.approved for d in self.decisions)

    @property
    def sampled(self) -> int:
        return len(self.decisions)

    def total(self, name: str) -> int:
        return sum(getattr(p, name) or 0 for p in self.partitions)


def _added(client: Client, key: str) -> int:
    try:
        info: dict[str, Any] = client.xinfo_stream(key)
    except redis.ResponseError:  # no such stream yet
        return 0
    return int(info.get("entries-added", info.get("length", 0)))


def _ms(iso: bytes) -> float:
    return datetime.fromisoformat(iso.decode()).timestamp() * 1000.0


def _decision(fields: dict[bytes, bytes]) -> Decision:
    return Decision(
        event_id=fields[b"event_id"].decode(),
        approved=fields[b"approved"] == b"true",
        scorer=fields[b"scorer"].decode(),
        latency_ms=_ms(fields[b"scored_at"]) - _ms(fields[b"enqueued_at"]),
    )


def _read_since(
    client: Client, key: str, after: bytes | None, limit: int | None, page: int = 1000
) -> tuple[list[Any], bool]:
    """The results after entry ``after`` (all of them when None), oldest first, at most ``limit``
    and then the newest (those between are passed over: True)."""
    rows: list[Any] = []
    low = b"-" if after is None else b"(" + after
    while limit is None or len(rows) < limit:
        count = page if limit is None else min(page, limit - len(rows))
        chunk: Any = client.xrange(key, min=low, count=count)
        rows += chunk
        if len(chunk) < count:
            return rows, False
        low = b"(" + chunk[-1][0]
    newest: Any = client.xrevrange(key, count=1)
    if newest[0][0] == rows[-1][0]:
        return rows, False
    return [*rows, newest[0]], True


def snapshot(
    client: Client,
    partitions: int,
    group: str = GROUP,
    sample: int = 100,
    since: Snapshot | None = None,
    limit: int | None = 20_000,
) -> Snapshot:
    """The pipeline's counters now, and results: the newest ``sample`` per partition, or (given
    ``since``) every one written after ``since`` read them, at most ``limit`` per partition."""
    stats = []
    decisions: list[Decision] = []
    cursor: list[bytes | None] = []
    skipped = False
    for i in range(partitions):
        keys = PartitionKeys(i)
        pending, lag = 0, None
        try:
            groups: Any = client.xinfo_groups(keys.events)
            for g in groups:
                if g["name"].decode() == group:
                    pending, lag = int(g["pending"]), g.get("lag")
        except redis.ResponseError:
            pass
        owner: Any = client.get(keys.lease)
        stats.append(
            PartitionStats(
                index=i,
                published=_added(client, keys.events),
                scored=_added(client, keys.results),
                dead=_added(client, keys.dead),
                pending=pending,
                lag=None if lag is None else int(lag),
                owner=None if owner is None else owner.decode(),
            )
        )
        rows: Any
        if since is None:
            newest: Any = client.xrevrange(keys.results, count=sample)
            rows = newest[::-1]
        else:
            rows, more = _read_since(client, keys.results, since.cursor[i], limit)
            skipped = skipped or more
        decisions += [_decision(fields) for _, fields in rows]
        cursor.append(rows[-1][0] if rows else None if since is None else since.cursor[i])
    return Snapshot(time.monotonic(), stats, decisions, tuple(cursor), skipped)


def line(previous: Snapshot | None, current: Snapshot) -> str:
    """One line: rates since ``previous`` (totals when there is none), backlog, and the latency and
    approvals of the results ``current`` read."""
    published, scored = current.total("published"), current.total("scored")
    if previous is None:
        rates = f"published {published}, scored {scored}"
    else:
        seconds = max(current.taken_at - previous.taken_at, 1e-9)
        rates = (
            f"published {(published - previous.total('published')) / seconds:,.0f}/s, "
            f"scored {(scored - previous.total('scored')) / seconds:,.0f}/s"
        )
    text = (
        f"{rates}; dead {current.total('dead')}; pending {current.total('pending')}, "
        f"lag {current.total('lag')}; owned {sum(p.owner is not None for p in current.partitions)}"
        f"/{len(current.partitions)}"
    )
    p50, p99 = current.latency.quantile(0.5), current.latency.quantile(0.99)
    if p50 is not None and p99 is not None:
        text += (
            f"; enqueue->scored p50 {p50:.0f} ms, p99 {p99:.0f} ms; "
            f"approved {100 * current.approved / current.sampled:.0f}%"
        )
    return text


# --- runs, ground truth, decisions by scorer and arm, per-worker rates ---------------------------

PRODUCTION_ARM = "production"  # every event's arm without a registry's A/B candidate
CANDIDATE_ARM = "candidate"
QUANTILES = (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))


def run_of(event_id: str) -> str:
    """The run an event belongs to: ``fraudscore generate`` names events ``<run id>-<n>``.

    >>> run_of("wave-1-00000042")
    'wave-1'
    """
    return event_id.rsplit("-", 1)[0]


def arm_of_scorer(scorer: str, candidate: str | None) -> str:
    """A result's A/B arm: the candidate's when its scorer is the registry's candidate version.

    The results carry the scorer ("kind:name:version"), not the arm; the arm follows from the
    version, as the candidate and production are different versions.

    >>> arm_of_scorer("model:gbt:v7", "v7"), arm_of_scorer("knn:knn:v1", "v7")
    ('candidate', 'production')
    """
    return (
        CANDIDATE_ARM if candidate is not None and scorer.rsplit(":", 1)[-1] == candidate else PRODUCTION_ARM
    )


def decisions_by_scorer(decisions: Iterable[Decision], candidate: str | None = None) -> list[dict[str, Any]]:
    """Approved and declined counts per (scorer, arm), sorted."""
    counts: dict[tuple[str, str], dict[str, int]] = {}
    for d in decisions:
        row = counts.setdefault(
            (d.scorer, arm_of_scorer(d.scorer, candidate)), {"approved": 0, "declined": 0}
        )
        row["approved" if d.approved else "declined"] += 1
    return [{"scorer": s, "arm": a, **c} for (s, a), c in sorted(counts.items())]


@dataclass
class Quality:
    """Decisions against the ground truth; a declined event is a positive."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def add(self, approved: bool, fraud: bool) -> None:
        if fraud:
            self.fn += approved
            self.tp += not approved
        else:
            self.tn += approved
            self.fp += not approved

    @classmethod
    def of(cls, decisions: Iterable[Decision], frauds: Container[str]) -> Quality:
        q = cls()
        for d in decisions:
            q.add(d.approved, d.event_id in frauds)
        return q

    def as_json(self) -> dict[str, Any]:
        return {
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
            "tn": self.tn,
            "precision": self.tp / (self.tp + self.fp) if self.tp + self.fp else None,
            "recall": self.tp / (self.tp + self.fn) if self.tp + self.fn else None,
        }


def latency_json(h: LatencyHistogram) -> dict[str, Any]:
    return {"count": h.count, **{name: h.quantile(q) for name, q in QUANTILES}}


class Truth:
    """Which results are frauds, from the runs' ground-truth sets in Redis (``stream.runs``).

    A decision counts only when its event belongs to a registered run; the run's set is
    written before its events are published, so it is complete for every result read."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.known: dict[str, bool] = {}  # run id: registered

    def labels(self, decisions: Sequence[Decision]) -> list[tuple[Decision, bool]]:
        """(decision, is a fraud) for each decision of a registered run."""
        from fraudscore.stream.keys import run_frauds_key, run_key

        by_run: dict[str, list[Decision]] = {}
        for d in decisions:
            by_run.setdefault(run_of(d.event_id), []).append(d)
        labelled: list[tuple[Decision, bool]] = []
        for run, ds in by_run.items():
            if run not in self.known:
                self.known[run] = bool(self.client.exists(run_key(run)))
            if not self.known[run]:
                continue
            flags: Any = self.client.smismember(run_frauds_key(run), [d.event_id for d in ds])
            labelled += [(d, bool(f)) for d, f in zip(ds, flags, strict=True)]
        return labelled


def worker_rates(
    previous: Snapshot, current: Snapshot, live: Sequence[str] = ()
) -> dict[str, dict[str, Any]]:
    """Each worker's results per second between two snapshots: a partition has one owner at a
    time (its lease), so a partition's results in the interval count for its current owner.
    ``live``: the workers registered as alive, listed even when they own nothing."""
    seconds = max(current.taken_at - previous.taken_at, 1e-9)
    rates: dict[str, dict[str, Any]] = {w: {"partitions": [], "results": 0} for w in live}
    for before, now in zip(previous.partitions, current.partitions, strict=True):
        if now.owner is None:
            continue
        row = rates.setdefault(now.owner, {"partitions": [], "results": 0})
        row["partitions"].append(now.index)
        row["results"] += now.scored - before.scored
    for row in rates.values():
        row["per_s"] = row["results"] / seconds
    return dict(sorted(rates.items()))


def live_workers(client: Client) -> list[str]:
    from fraudscore.stream.keys import WORKERS

    tokens: Any = client.zrangebyscore(WORKERS, int(time.time() * 1000), "+inf")
    return [t.decode() for t in tokens]


@dataclass
class LiveView:
    """What ``fraudscore monitor`` shows: the latest interval, and totals since it started."""

    candidate: str | None = None  # the registry's A/B candidate version, if any
    decisions: list[dict[str, Any]] = field(default_factory=list)
    quality: Quality = field(default_factory=Quality)
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)  # since the start
    _counts: dict[tuple[str, str], dict[str, int]] = field(default_factory=dict)

    def update(
        self, previous: Snapshot, current: Snapshot, truth: Truth, live: Sequence[str]
    ) -> dict[str, Any]:
        """Fold in an interval; the view as JSON."""
        for d, fraud in truth.labels(current.decisions):
            self.quality.add(d.approved, fraud)
        self.latency.merge(current.latency)
        for row in decisions_by_scorer(current.decisions, self.candidate):
            counts = self._counts.setdefault((row["scorer"], row["arm"]), {"approved": 0, "declined": 0})
            counts["approved"] += row["approved"]
            counts["declined"] += row["declined"]
        self.decisions = [{"scorer": s, "arm": a, **c} for (s, a), c in sorted(self._counts.items())]
        seconds = max(current.taken_at - previous.taken_at, 1e-9)

        def rate(name: str) -> float:
            return (current.total(name) - previous.total(name)) / seconds

        return {
            "in_per_s": rate("published"),
            "out_per_s": rate("scored"),
            "dead_per_s": rate("dead"),
            "published": current.total("published"),
            "results": current.total("scored"),
            "dead_letters": current.total("dead"),
            "pending": current.total("pending"),
            "backlog": current.total("lag"),
            "latency_ms": latency_json(current.latency),
            "latency_ms_since_start": latency_json(self.latency),
            "workers": worker_rates(previous, current, live),
            "decisions": self.decisions,
            "truth": self.quality.as_json(),
            "skipped": current.skipped,
        }


def totals_json(s: Snapshot) -> dict[str, Any]:
    """A snapshot's counters: what ``fraudscore monitor --json`` prints first."""
    return {
        "published": s.total("published"),
        "results": s.total("scored"),
        "dead_letters": s.total("dead"),
        "pending": s.total("pending"),
        "backlog": s.total("lag"),
        "owners": {p.index: p.owner for p in s.partitions},
    }


def compact(previous: Snapshot, current: Snapshot, view: dict[str, Any]) -> str:
    """The view on one line (``line``'s, then p95, the workers and the detection quality)."""
    text = line(previous, current)
    p95 = view["latency_ms"]["p95"]
    if p95 is not None:
        text += f"; p95 {p95:.0f} ms"
    if view["workers"]:
        text += "; workers " + ", ".join(f"{t} {w['per_s']:,.0f}/s" for t, w in view["workers"].items())
    truth = view["truth"]
    shares = [("precision", truth["precision"]), ("recall", truth["recall"])]
    if any(v is not None for _, v in shares):
        text += "; " + ", ".join(f"{n} {'-' if v is None else f'{100 * v:.1f}%'}" for n, v in shares)
    return text


def render(view: dict[str, Any]) -> str:
    """The live view as a few lines of text."""

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f} %"

    lat, total, truth = view["latency_ms"], view["latency_ms_since_start"], view["truth"]
    lines = [
        f"in {view['in_per_s']:,.0f}/s  out {view['out_per_s']:,.0f}/s  "
        f"backlog {view['backlog']:,}  pending {view['pending']:,}  dead letters {view['dead_letters']:,}",
        f"enqueue->result ms: p50 {ms(lat['p50'])}  p95 {ms(lat['p95'])}  p99 {ms(lat['p99'])} "
        f"(last interval, {lat['count']}); since start p99 {ms(total['p99'])} ({total['count']})",
    ]
    for token, w in view["workers"].items():
        lines.append(f"worker {token}: {w['per_s']:,.0f}/s, partitions {w['partitions']}")
    for d in view["decisions"]:
        lines.append(f"{d['scorer']} ({d['arm']}): {d['approved']:,} approved, {d['declined']:,} declined")
    lines.append(
        f"against the generator's truth: precision {pct(truth['precision'])}, recall {pct(truth['recall'])} "
        f"(tp {truth['tp']}, fp {truth['fp']}, fn {truth['fn']}, tn {truth['tn']})"
    )
    return "\n".join(lines)


def _entries(
    client: Client, key: str, low: str, page: int = 2000
) -> Iterator[tuple[bytes, dict[bytes, bytes]]]:
    """A stream's entries from ``low`` on, a page at a time (a run's results may be millions)."""
    start: Any = low
    while True:
        chunk: Any = client.xrange(key, min=start, count=page)
        yield from chunk
        if len(chunk) < page:
            return
        start = b"(" + chunk[-1][0]


def run_stats(
    client: Client, partitions: int, run_id: str, candidate: str | None = None
) -> dict[str, Any] | None:
    """A whole run's figures, from its registry entry and every result and dead letter of its
    events (read from the run's start on); None when no such run is registered."""
    import orjson

    from fraudscore.stream.runs import frauds_of, run_info

    info = run_info(client, run_id)
    if info is None:
        return None
    frauds = frauds_of(client, run_id)
    start = info.get("started_ms", "0")
    prefix = (run_id + "-").encode()
    decisions: list[Decision] = []
    dead = 0
    for i in range(partitions):
        keys = PartitionKeys(i)
        decisions += [
            _decision(f)
            for _, f in _entries(client, keys.results, start)
            if f[b"event_id"].startswith(prefix)
        ]
        for _, f in _entries(client, keys.dead, start):
            try:
                event_id = orjson.loads(f[b"event"]).get("event_id")
            except (orjson.JSONDecodeError, AttributeError):
                continue
            dead += isinstance(event_id, str) and event_id.encode().startswith(prefix)
    latency = LatencyHistogram.of(d.latency_ms for d in decisions)
    started, ended = int(start), int(info.get("ended_ms") or 0)
    return {
        "run": info,
        "published": int(info.get("published", 0)),
        "results": len(decisions),
        "dead_letters": dead,
        "in_per_s": int(info.get("published", 0)) * 1000 / (ended - started) if ended > started else None,
        "latency_ms": latency_json(latency),
        "decisions": decisions_by_scorer(decisions, candidate),
        "truth": {"frauds": len(frauds), **Quality.of(decisions, frauds).as_json()},
    }


def render_stats(stats: dict[str, Any]) -> str:
    run, lat, truth = stats["run"], stats["latency_ms"], stats["truth"]
    rate = "-" if stats["in_per_s"] is None else f"{stats['in_per_s']:,.0f}/s"
    lines = [
        f"run {run['run_id']} ({run.get('state', '?')}): {run['shape']} up to {float(run['rate']):g}/s for "
        f"{float(run['duration']):g} s; published {stats['published']:,} ({rate}), results "
        f"{stats['results']:,}, dead letters {stats['dead_letters']:,}",
        "enqueue->result ms: "
        + ", ".join(f"{n} {'-' if lat[n] is None else f'{lat[n]:.1f}'}" for n, _ in QUANTILES),
    ]
    for d in stats["decisions"]:
        lines.append(f"{d['scorer']} ({d['arm']}): {d['approved']:,} approved, {d['declined']:,} declined")
    p, r = truth["precision"], truth["recall"]
    lines.append(
        f"against the run's {truth['frauds']} frauds: precision {'-' if p is None else f'{100 * p:.1f} %'}, "
        f"recall {'-' if r is None else f'{100 * r:.1f} %'} (tp {truth['tp']}, fp {truth['fp']}, "
        f"fn {truth['fn']}, tn {truth['tn']})"
    )
    return "\n".join(lines)


def render_runs(found: Sequence[dict[str, str]]) -> str:
    if not found:
        return "no runs"
    lines = [f"{'run':32} {'state':8} {'shape':8} {'rate/s':>8} {'s':>6} {'published':>10} {'frauds':>7}"]
    for r in found:
        lines.append(
            f"{r['run_id']:32} {r.get('state', '?'):8} {r.get('shape', '?'):8} {float(r.get('rate', 0)):8g} "
            f"{float(r.get('duration', 0)):6g} {int(r.get('published', 0)):10,} {int(r.get('frauds', 0)):7,}"
        )
    return "\n".join(lines)
