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
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
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
