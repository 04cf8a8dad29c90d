"""The stream worker: events in, features from Redis functions, one scored result per event out.

**Ordering.**  Events are partitioned by customer (``keys.partition_of``), and a partition has
at most one consumer at a time: the worker holding its lease (``{fs:p<i>}:lease``, a token with
a TTL of ``claim_idle_ms``, renewed every third of it).  Every call that reads, claims or applies
is fenced by that lease inside Redis (``functions.py``), so a worker that lost its lease can do
nothing more to the partition.  A worker that acquires a partition first claims every pending
entry of the group (XAUTOCLAIM from ``0-0``, whoever held them: the lease says they are dead)
and processes them in stream order, and only then reads new entries.  So a customer's events
are applied in stream order, whatever the workers, batches, kills and redeliveries: after any
failure (a kill, a lost lease, a Redis error) the partition's next owner, or the same worker,
restarts from the oldest unacknowledged entry, and events already applied are recognised by
their event id and give back the state stored when they were first applied.  A dead consumer's
entries are thus reclaimed once its lease has been idle for ``claim_idle_ms``.

**One batch** (``Worker.step``): read up to ``batch`` entries (or claim them, when recovering);
dead-letter the malformed ones, those delivered more than ``max_deliveries`` times and those
routed to the wrong partition; one pipelined ``fs_apply`` per event (idempotent by event id,
returning the state before the event); build each payload and vector exactly as ``/fraud-score``
does; score them in one ``scorer.scores`` call; one ``fs_results`` call for the batch (each
result is written once per event id, and its entry acknowledged in the same atomic call).  A kill
between any two steps leaves the entries pending, and the next owner redoes the batch with the
same features, so it writes the results that are missing and no others.  An event whose state
was applied but which is dead-lettered after too many deliveries keeps its state change.

**Sharing the work.**  Workers heartbeat in ``{fs}:workers``; each takes at most its fair share,
ceil(partitions / live workers), releasing extras and acquiring free partitions every third of
``claim_idle_ms``.  It also trims each owned events stream below what every group acknowledged.

**Failures.**  Connection errors, timeouts and a Redis still loading its data are retried with
exponential backoff (redis-py's own retries are off: a blindly retried read would skip entries);
the worker then recovers every partition it holds.  SIGTERM and SIGINT finish the batch in hand,
release the leases and exit.
"""

from __future__ import annotations

import logging
import math
import os
import random
import secrets
import signal
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import orjson
import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import (
    AuthenticationError,
    ClusterDownError,
    NoPermissionError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    TryAgainError,
)
from redis.retry import Retry

from fraudscore.contract.vectorize import DEFAULT_CONSTANTS, Constants, vectorize
from fraudscore.errors import BadInputError, ConfigError, EventError, TransientError
from fraudscore.scorer import Scorer
from fraudscore.stream.events import (
    KNOWN_MERCHANTS_CAP,
    WINDOW_CAP,
    WINDOW_MS,
    Event,
    Point,
    PreState,
    build_payload,
    iso_ms,
    parse_event,
)
from fraudscore.stream.functions import LIBRARY, LIBRARY_NAME
from fraudscore.stream.keys import GROUP, META, WORKERS, PartitionKeys, partition_of

if TYPE_CHECKING:
    from fraudscore.models.live import LiveModels

log = logging.getLogger("fraudscore.stream")

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
DEFAULT_PARTITIONS = 8
RESULT_FIELDS = (
    "event_id",  # the raw event's id
    "entry",  # the events stream entry it came in
    "approved",  # "true" / "false"
    "fraud_score",  # the scorer's score
    "scorer",  # kind:name:version
    "event_time",  # ISO-8601 UTC, to the ms
    "enqueued_at",  # the entry id's time: when Redis took the event
    "scored_at",  # the worker's wall clock after scoring
    "payload",  # the contract payload that was scored (JSON)
)
# "not now": no connection, no answer, Redis loading its data (BusyLoadingError is a ConnectionError),
# out of memory, a replica, a cluster resharding or without a primary
TRANSIENT_ERRORS = (
    redis.ConnectionError,
    redis.TimeoutError,
    OutOfMemoryError,
    ReadOnlyError,
    TryAgainError,
    ClusterDownError,
)
BUSY_REPLY = "BUSY"  # a script or function running too long; redis-py has no class for it
MAX_BACKOFF_S = 2.0


@dataclass(frozen=True)
class WorkerConfig:
    redis_url: str = DEFAULT_REDIS_URL
    cluster: bool = False  # redis_url is a node of a Redis Cluster
    partitions: int = DEFAULT_PARTITIONS
    batch: int = 100
    claim_idle_ms: int = 5000  # the lease TTL: how long a silent owner keeps its partitions
    max_deliveries: int = 5
    group: str = GROUP
    state_ttl_s: int = 30 * 86400  # customer and merchant state, after its last event
    record_ttl_s: int = 7 * 86400  # idempotency records: how long a repeat is recognised
    results_maxlen: int = 1_000_000  # per partition, approximate
    dead_maxlen: int = 100_000
    poll_s: float = 0.02  # sleep when no owned partition had anything

    def check(self) -> None:
        for name in ("partitions", "batch", "claim_idle_ms", "max_deliveries"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")


class LeaseLost(Exception):
    """A fenced call was refused: another worker owns the partition now."""


Client = redis.Redis | RedisCluster


def connect(url: str, cluster: bool = False) -> Client:
    """A client without automatic retries: every retry is the worker's own, and knows what it redoes.

    With ``cluster``, ``url`` is any node of a Redis Cluster; the client sends each call to the
    node serving its keys' slot (one slot per call: the keys share their partition's hash tag).
    """
    options: dict[str, Any] = {"socket_timeout": 10.0, "socket_connect_timeout": 2.0}
    if cluster:
        try:  # the client learns the cluster's slots now, from the node given
            return RedisCluster.from_url(url, retry=Retry(NoBackoff(), 0), **options)
        except (redis.RedisError, RedisClusterException) as exc:
            raise TransientError(f"cannot reach the Redis Cluster at {url}: {exc}") from None
    client: redis.Redis = redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0), **options)
    return client


def prepare(client: Client, partitions: int, group: str = GROUP) -> None:
    """Load the function library, fix the partition count, create the consumer groups."""
    try:
        client.function_load(LIBRARY, replace=True)
    except TRANSIENT_ERRORS:  # out of memory, a replica...: the caller retries
        raise
    except redis.ResponseError as exc:  # not Redis 7, or Lua disabled
        raise ConfigError(f"redis cannot load the {LIBRARY_NAME} function library: {exc}") from None
    client.hsetnx(META, "partitions", partitions)
    stored = int(client.hget(META, "partitions") or partitions)
    if stored != partitions:
        raise ConfigError(f"--partitions is {partitions} but Redis ({META}) holds {stored}")
    for i in range(partitions):
        try:
            client.xgroup_create(PartitionKeys(i).events, group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise


def decode_pre(reply: bytes) -> PreState:
    """``fs_apply``'s reply: the state as it was before the event."""
    s = orjson.loads(reply)

    def point(lat: str, lon: str) -> Point | None:
        return Point(float(lat), float(lon)) if lat else None

    return PreState(
        count=int(s["n"]),
        sum_cents=int(s["sum"]),
        last_time_ms=int(s["t"]) if s["t"] else None,
        last_terminal=point(s["lat"], s["lon"]),
        home=point(s["hlat"], s["hlon"]),
        window_count=int(s["w"]),
        known_merchants=tuple(s["k"]) if s["k"] else (),  # Lua's cjson writes an empty list as {}
        merchant_count=int(s["mn"]),
        merchant_sum_cents=int(s["msum"]),
    )


def apply_call(keys: PartitionKeys, token: str, event: Event, config: WorkerConfig) -> list[Any]:
    """The arguments of the ``fs_apply`` call of one event, for ``client.fcall(*...)``."""
    home = event.customer_home
    cid = event.customer_id
    return [
        "fs_apply",
        6,
        keys.lease,
        keys.record(event.event_id),
        keys.customer(cid),
        keys.window(cid),
        keys.known(cid),
        keys.merchant(event.merchant_id),
        token,
        event.event_id,
        event.time_ms,
        event.cents,
        event.merchant_id,
        repr(event.terminal.lat),
        repr(event.terminal.lon),
        "" if home is None else repr(home.lat),
        "" if home is None else repr(home.lon),
        event.time_ms - WINDOW_MS,
        -(WINDOW_CAP + 1),
        KNOWN_MERCHANTS_CAP,
        config.state_ttl_s,
        config.record_ttl_s,
    ]


def _field(fields: Sequence[bytes], name: bytes) -> bytes | None:
    """A field of a stream entry as a function returns it: a flat list of names and values."""
    for i in range(0, len(fields) - 1, 2):
        if fields[i] == name:
            return fields[i + 1]
    return None


@dataclass
class _Partition:
    keys: PartitionKeys
    recovering: bool = True
    cursor: str = "0-0"


@dataclass
class _Dead:
    entry: bytes
    reason: str
    raw: bytes
    deliveries: int


class Worker:
    """One worker process's loop over the partitions it holds."""

    def __init__(
        self,
        client: Client,
        scorer: Scorer,
        config: WorkerConfig,
        constants: Constants = DEFAULT_CONSTANTS,
        live: LiveModels | None = None,
    ) -> None:
        config.check()
        self.r = client
        self.scorer = scorer
        # with a registry: each event is scored by its customer's arm of the live versions
        # (models.live), which follow the registry; else by ``scorer``
        self.live = live
        self.config = config
        self.constants = constants
        self.token = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        scorer_id = scorer.id
        self.scorer_name = f"{scorer_id.kind}:{scorer_id.name}:{scorer_id.version}"
        self.owned: dict[int, _Partition] = {}
        self.stopping = False
        self.next_housekeeping = 0.0
        self.processed = 0
        self.dead_lettered = 0

    # -- lifecycle ------------------------------------------------------------------------

    def stop(self, signum: int = 0, frame: FrameType | None = None) -> None:
        """Finish the batch in hand, then exit (the signal handler)."""
        self.stopping = True

    def run(self, max_idle_s: float | None = None) -> None:
        """Work until ``stop`` (or, with ``max_idle_s``, until nothing came for that long)."""
        if threading.current_thread() is threading.main_thread():  # only there can Python take signals
            signal.signal(signal.SIGTERM, self.stop)
            signal.signal(signal.SIGINT, self.stop)
        backoff = 0.05
        idle_since = time.monotonic()
        prepared = False
        while not self.stopping:
            try:
                if not prepared:
                    prepare(self.r, self.config.partitions, self.config.group)
                    prepared = True
                worked = 0
                if time.monotonic() >= self.next_housekeeping:
                    self.housekeep()
                for part in list(self.owned.values()):
                    if self.stopping:
                        break
                    if time.monotonic() >= self.next_housekeeping:
                        self.housekeep()  # leases are renewed between batches, not only between rounds
                    if self.owned.get(part.keys.index) is part:
                        worked += self.step(part)
                backoff = 0.05
                if worked:
                    idle_since = time.monotonic()
                elif max_idle_s is not None and time.monotonic() - idle_since > max_idle_s:
                    break
                else:
                    time.sleep(self.config.poll_s)
            except (AuthenticationError, NoPermissionError) as exc:
                raise ConfigError(f"redis refuses the worker: {exc}") from None
            except TRANSIENT_ERRORS as exc:
                log.warning("redis: %s; retrying in %.2f s", exc, backoff)
                for part in self.owned.values():
                    part.recovering, part.cursor = True, "0-0"
                time.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
            except redis.ResponseError as exc:
                if "function not found" in str(exc).lower():
                    log.warning("redis lost the function library (%s): loading it again", exc)
                    prepared = False
                elif str(exc).startswith(BUSY_REPLY):
                    log.warning("redis: %s; retrying in %.2f s", exc, backoff)
                    time.sleep(backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF_S)
                else:
                    raise
                for part in self.owned.values():
                    part.recovering, part.cursor = True, "0-0"
        self.release_all()
        log.info(
            "worker %s stops: %d events scored, %d dead-lettered",
            self.token,
            self.processed,
            self.dead_lettered,
        )

    def release_all(self) -> None:
        try:
            for part in self.owned.values():
                self.r.fcall("fs_lease", 1, part.keys.lease, self.token, "release", 0)
            self.r.zrem(WORKERS, self.token)
        except TRANSIENT_ERRORS as exc:  # the leases expire by themselves
            log.warning("redis: %s; leaving the leases to expire", exc)
        self.owned.clear()

    # -- sharing the partitions -------------------------------------------------------------

    def housekeep(self) -> None:
        """Heartbeat, renew leases, release extras, acquire free partitions, trim streams."""
        c = self.config
        self.next_housekeeping = time.monotonic() + c.claim_idle_ms / 3000.0
        now = int(time.time() * 1000)
        self.r.zadd(WORKERS, {self.token: now + c.claim_idle_ms})
        self.r.zremrangebyscore(WORKERS, "-inf", now)
        live = max(1, int(self.r.zcard(WORKERS)))
        fair = math.ceil(c.partitions / live)
        for index, part in list(self.owned.items()):
            if not self.r.fcall("fs_lease", 1, part.keys.lease, self.token, "renew", c.claim_idle_ms):
                log.info("lost the lease of partition %d", index)
                del self.owned[index]
        while len(self.owned) > fair:
            index, part = self.owned.popitem()
            self.r.fcall("fs_lease", 1, part.keys.lease, self.token, "release", 0)
            log.info("released partition %d (fair share %d)", index, fair)
        if len(self.owned) < fair:
            free = [i for i in range(c.partitions) if i not in self.owned]
            random.shuffle(free)
            for index in free:
                keys = PartitionKeys(index)
                if self.r.fcall("fs_lease", 1, keys.lease, self.token, "acquire", c.claim_idle_ms):
                    log.info("acquired partition %d", index)
                    self.owned[index] = _Partition(keys)
                    if len(self.owned) >= fair:
                        break
        for part in self.owned.values():
            self.r.fcall("fs_trim", 1, part.keys.events, c.claim_idle_ms)

    # -- one batch ------------------------------------------------------------------------

    def step(self, part: _Partition) -> int:
        """Read (or, recovering, claim) one batch of a partition and process it; the entries seen."""
        c = self.config
        keys = part.keys
        entries: Sequence[Any] = []
        try:
            if part.recovering:
                cursor, entries, rows, deleted = self.r.fcall(
                    "fs_claim",
                    2,
                    keys.lease,
                    keys.events,
                    self.token,
                    c.group,
                    self.token,
                    part.cursor,
                    c.batch,
                )
                part.cursor = cursor.decode()
                if part.cursor == "0-0":
                    part.recovering = False
                deliveries = {row[0]: int(row[3]) for row in rows}
                if deleted:  # only an XDEL or XTRIM from outside can do that: fs_trim keeps pending entries
                    log.error(
                        "partition %d: %d pending entries were deleted unscored", keys.index, len(deleted)
                    )
            else:
                reply = self.r.fcall(
                    "fs_read", 2, keys.lease, keys.events, self.token, c.group, self.token, c.batch
                )
                entries = reply[0][1] if reply else []
                deliveries = {}
            self.process(part, entries, deliveries)
        except LeaseLost:
            log.info("partition %d is another worker's now", keys.index)
            self.owned.pop(keys.index, None)
        except redis.ResponseError as exc:
            if "FSLEASE" not in str(exc):
                raise
            log.info("partition %d is another worker's now", keys.index)
            self.owned.pop(keys.index, None)
        return len(entries) if part.keys.index in self.owned else 0

    def process(self, part: _Partition, entries: Sequence[Any], deliveries: dict[bytes, int]) -> None:
        c = self.config
        keys = part.keys
        dead: list[_Dead] = []
        events: list[tuple[bytes, Event, bytes]] = []
        for entry_id, fields in entries:
            if fields is None:  # trimmed while pending (never, with fs_trim): nothing to score
                continue
            count = deliveries.get(entry_id, 1)
            raw = _field(fields, b"event")
            if raw is None:
                dead.append(_Dead(entry_id, "the entry has no event field", b"", count))
                continue
            if count > c.max_deliveries:
                dead.append(_Dead(entry_id, f"not done after {count - 1} deliveries", raw, count))
                continue
            try:
                event = parse_event(raw)
            except EventError as exc:
                dead.append(_Dead(entry_id, str(exc), raw, count))
                continue
            home = partition_of(event.customer_id, c.partitions)
            if home != keys.index:
                dead.append(_Dead(entry_id, f"customer_id belongs to partition {home}", raw, count))
                continue
            events.append((entry_id, event, raw))

        pipe = self.r.pipeline(transaction=False)
        for _, event, _ in events:
            pipe.fcall(*apply_call(keys, self.token, event, c))
        replies = pipe.execute(raise_on_error=False) if events else []

        done: list[tuple[bytes, Event]] = []
        scored: list[tuple[bytes, Event, dict[str, Any]]] = []
        vectors: list[list[float]] = []
        for (entry_id, event, raw), reply in zip(events, replies, strict=True):
            if isinstance(reply, redis.ResponseError) and "FSLEASE" in str(reply):
                raise LeaseLost(str(reply))
            if isinstance(reply, Exception):
                raise reply
            if reply == b"!done":
                done.append((entry_id, event))
                continue
            payload = build_payload(event, decode_pre(reply))
            try:
                vectors.append(vectorize(payload, self.constants))
            except BadInputError as exc:
                dead.append(_Dead(entry_id, f"payload: {exc}", raw, deliveries.get(entry_id, 1)))
                continue
            scored.append((entry_id, event, payload))
        if self.live is not None:
            decided = self.live.score_batch([e.customer_id for _, e, _ in scored], vectors)
        else:
            scores = self.scorer.scores(vectors) if vectors else []
            decided = [(s, self.scorer.approves(s), self.scorer_name) for s in scores]
        scored_at = iso_ms(int(time.time() * 1000))

        pipe = self.r.pipeline(transaction=False)
        if scored or done:
            records: list[str] = []
            args: list[Any] = [c.group, c.results_maxlen, c.record_ttl_s, len(RESULT_FIELDS), *RESULT_FIELDS]
            for (entry_id, event, payload), (score, approved, scorer_name) in zip(
                scored, decided, strict=True
            ):
                records.append(keys.record(event.event_id))
                args += (
                    entry_id,
                    event.event_id,
                    entry_id,
                    "true" if approved else "false",
                    repr(score),
                    scorer_name,
                    payload["transaction"]["requested_at"],
                    iso_ms(int(entry_id.split(b"-")[0])),
                    scored_at,
                    orjson.dumps(payload),
                )
            for entry_id, event in done:  # their results exist: only the acknowledgement is missing
                records.append(keys.record(event.event_id))
                args += (entry_id, *[""] * len(RESULT_FIELDS))
            pipe.fcall("fs_results", 2 + len(records), keys.results, keys.events, *records, *args)
        now = iso_ms(int(time.time() * 1000))
        for d in dead:
            pipe.fcall(
                "fs_dead",
                2,
                keys.dead,
                keys.events,
                c.group,
                d.entry,
                c.dead_maxlen,
                "entry",
                d.entry,
                "reason",
                d.reason,
                "deliveries",
                d.deliveries,
                "dead_at",
                now,
                "event",
                d.raw,
            )
        if scored or done or dead:
            pipe.execute()
        self.processed += len(scored)
        self.dead_lettered += len(dead)


def run_worker(
    config: WorkerConfig, index: Path, max_idle_s: float | None = None, registry: Path | None = None
) -> Worker:
    """Open the scorer and Redis, and work until stopped; the finished worker, for its counts.
    With ``registry``, score with its live versions instead, following it (SIGHUP: check now)."""
    from fraudscore.scorer import KnnScorer

    config.check()
    with KnnScorer.open(index) as scorer:
        live, stop_live = _follow_registry(registry, scorer)
        try:
            worker = Worker(connect(config.redis_url, config.cluster), scorer, config, live=live)
            worker.run(max_idle_s=max_idle_s)
        finally:
            stop_live()
    return worker


def _follow_registry(registry: Path | None, knn: Any) -> tuple[LiveModels | None, Any]:
    """The live versions of ``registry`` (None: none), following it, and what stops them."""
    if registry is None:
        return None, lambda: None
    from fraudscore.models.live import InstanceFile, LiveModels, follow_with_file
    from fraudscore.models.registry import Registry

    live = LiveModels(Registry(registry), knn=knn)
    live.start()
    if live.current.production is None:
        live.stop()
        raise ConfigError(f"--registry {registry}: no version in production (see: fraudscore model promote)")
    instance = InstanceFile(live.registry or Registry(registry), "worker", None)
    follow_with_file(live, instance, dict)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGHUP, lambda signum, frame: live.reload())

    def stop() -> None:
        live.stop()
        instance.remove()

    return live, stop
