"""A live view of the pipeline, from Redis alone: what came in, what was scored, what is behind.

``snapshot`` reads, per partition: the events, results and dead letters ever added to each
stream (XINFO STREAM's entries-added, which trimming does not lower), the group's pending
entries and lag (XINFO GROUPS), and the lease's owner; and, from the newest results, the
time from enqueue to scored and the share approved.  ``line`` turns two snapshots into one
line of rates; ``fraudscore monitor`` prints one such line per interval.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
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
class Snapshot:
    taken_at: float  # time.monotonic()
    partitions: list[PartitionStats]
    latencies_ms: list[float]  # enqueue to scored, of the newest results
    approved: int  # among those results
    sampled: int

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


def snapshot(client: Client, partitions: int, group: str = GROUP, sample: int = 100) -> Snapshot:
    """The pipeline's counters now, and the latency of the newest ``sample`` results per partition."""
    stats = []
    latencies: list[float] = []
    approved = 0
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
        newest: Any = client.xrevrange(keys.results, count=sample)
        for _, fields in newest:
            latencies.append(_ms(fields[b"scored_at"]) - _ms(fields[b"enqueued_at"]))
            approved += fields[b"approved"] == b"true"
    return Snapshot(time.monotonic(), stats, latencies, approved, len(latencies))


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def line(previous: Snapshot | None, current: Snapshot) -> str:
    """One line: rates since ``previous`` (totals when there is none), backlog, latency, approvals."""
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
    if current.sampled:
        text += (
            f"; enqueue->scored p50 {_percentile(current.latencies_ms, 0.5):.0f} ms, "
            f"p99 {_percentile(current.latencies_ms, 0.99):.0f} ms; "
            f"approved {100 * current.approved / current.sampled:.0f}%"
        )
    return text
