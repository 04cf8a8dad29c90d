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

**A batch** of a partition goes through three phases, each one call for all owned partitions
at once: read up to ``batch`` entries (or claim them, when recovering), dead-lettering the
malformed ones, those delivered more than ``max_deliveries`` times and those routed to the wrong
partition; one ``fs_apply`` for the whole batch (events applied in stream order, each idempotent
by event id, returning the state before it); then each payload and vector built exactly as
``/fraud-score`` does, every event scored in one ``scorer.scores`` call, and one ``fs_results``
per partition (each result written once per event id, the entries acknowledged in the same
atomic call).  ``Worker.step_all`` moves every batch in hand one phase on: it sends the
applies, scores the batches applied last time while Redis runs them, then sends results and
the next reads, so Redis and the worker work at the same time.  A kill
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
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import hiredis
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
from fraudscore.stream.keys import DEFAULT_BATCH, GROUP, META, WORKERS, PartitionKeys, partition_of

if TYPE_CHECKING:
    from fraudscore.models.live import LiveModels

log = logging.getLogger("fraudscore.stream")

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
DEFAULT_PARTITIONS = 8
Decided = tuple[float, bool, str]
"""An event's score, whether it is approved, and the scorer that decided ("kind:name:version")."""

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
    batch: int = DEFAULT_BATCH
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


def wait_until_answering(client: Client, timeout_s: float, process: Any = None) -> None:
    """Return once Redis answers PING; TransientError after ``timeout_s``, or at once when
    ``process`` (the redis-server just started, if any) has exited."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.ping()
            return
        except redis.ConnectionError:  # not listening yet
            if (process is not None and process.poll() is not None) or time.monotonic() > deadline:
                raise TransientError(f"Redis did not answer within {timeout_s:g} s") from None
            time.sleep(0.05)


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


def decode_pre(reply: Sequence[Any]) -> PreState:
    """One event's part of ``fs_apply``'s reply: the state as it was before the event."""
    n, cents, t, lat, lon, hlat, hlon, window, merchant_n, merchant_cents = reply[:10]
    return PreState(
        int(n),
        int(cents),
        int(t) if t else None,
        Point(float(lat), float(lon)) if lat else None,
        Point(float(hlat), float(hlon)) if hlat else None,
        window,
        tuple(map(bytes.decode, reply[10:])),
        int(merchant_n),
        int(merchant_cents),
    )


def apply_call(keys: PartitionKeys, token: str, events: Sequence[Event], config: WorkerConfig) -> list[Any]:
    """The arguments of the ``fs_apply`` call of a batch of events, for ``client.fcall(*...)``."""
    names: list[str] = [keys.lease]
    args: list[Any] = [token, WINDOW_CAP, KNOWN_MERCHANTS_CAP, config.state_ttl_s, config.record_ttl_s]
    for event in events:
        names += (
            keys.record(event.event_id),
            keys.customer(event.customer_id),
            keys.merchant(event.merchant_id),
        )
        home = event.customer_home
        terminal = event.terminal
        args += (
            event.event_id,
            event.time_ms,
            event.time_ms - WINDOW_MS,
            event.cents,
            event.merchant_id,
            repr(terminal.lat),
            repr(terminal.lon),
            "" if home is None else repr(home.lat),
            "" if home is None else repr(home.lon),
        )
    return ["fs_apply", len(names), *names, *args]


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


class _Calls:
    """Function calls sent now and their replies read later, in order (errors as values).

    On one Redis, they go out on one connection as soon as they are sent, so Redis runs them
    while the worker goes on; on a cluster, they are a pipeline sent at ``receive``.
    """

    def __init__(self, client: Client) -> None:
        self.client = client
        self.sent = 0
        self.pipe: Any = None
        self.conn: Any = None
        if isinstance(client, RedisCluster):
            self.pipe = client.pipeline(transaction=False)  # type: ignore[no-untyped-call]

    def send(self, call: list[Any]) -> None:
        self.sent += 1
        if self.pipe is not None:
            self.pipe.execute_command("FCALL", *call)
            return
        if self.conn is None:
            assert isinstance(self.client, redis.Redis)
            self.conn = self.client.connection_pool.get_connection()
        try:
            # hiredis packs the whole call in C (redis-py's packer first walks every argument in Python)
            self.conn.send_packed_command([hiredis.pack_command(("FCALL", *call))], check_health=False)
        except BaseException:
            self._drop()
            raise

    def receive(self) -> list[Any]:
        if self.pipe is not None:
            return self.pipe.execute(raise_on_error=False) if self.sent else []
        replies: list[Any] = []
        try:
            for _ in range(self.sent):
                try:
                    replies.append(self.conn.read_response())
                except redis.ResponseError as exc:
                    replies.append(exc)
        except BaseException:
            self._drop()
            raise
        if self.conn is not None:
            self.client.connection_pool.release(self.conn)  # type: ignore[union-attr]
            self.conn = None
        return replies

    def _drop(self) -> None:
        """A connection with replies unread is of no use to anyone: closed, then given back."""
        if self.conn is not None:
            self.conn.disconnect()
            self.client.connection_pool.release(self.conn)  # type: ignore[union-attr]
            self.conn = None


@dataclass
class _Batch:
    """One partition's entries in one ``Worker.step_all``, through its phases."""

    part: _Partition
    deliveries: dict[bytes, int]  # of claimed entries: their delivery counts
    events: list[tuple[bytes, Event, bytes]] = field(default_factory=list)  # (entry, event, raw)
    dead: list[_Dead] = field(default_factory=list)
    pres: Sequence[Any] = ()  # fs_apply's reply: per event, the state before it, or 0 when done
    lost: bool = False  # the lease turned out to be another worker's
    done: list[tuple[bytes, Event]] = field(default_factory=list)  # results written, ack missing
    scored: list[tuple[bytes, Event, dict[str, Any]]] = field(default_factory=list)


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
        self.parsed: list[_Batch] = []  # read, to be applied by the next step_all
        self.ready: list[_Batch] = []  # applied, to be scored and finished by the next step_all

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
                if self.owned or self.parsed or self.ready:
                    worked = self.step_all(list(self.owned.values()))
                backoff = 0.05
                if worked:
                    idle_since = time.monotonic()
                elif max_idle_s is not None and time.monotonic() - idle_since > max_idle_s:
                    break
                else:
                    self.wait_for_events()
            except (AuthenticationError, NoPermissionError) as exc:
                raise ConfigError(f"redis refuses the worker: {exc}") from None
            except TRANSIENT_ERRORS as exc:
                log.warning("redis: %s; retrying in %.2f s", exc, backoff)
                self.forget_batches()
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
                self.forget_batches()
        try:
            self.drain()
        except TRANSIENT_ERRORS as exc:  # left pending: whoever takes the partitions redoes them
            log.warning("redis: %s; leaving the batches in hand pending", exc)
        self.release_all()
        log.info(
            "worker %s stops: %d events scored, %d dead-lettered",
            self.token,
            self.processed,
            self.dead_lettered,
        )

    def forget_batches(self) -> None:
        """After a failure: every batch in hand is dropped, and each partition recovers from its
        oldest pending entry (so nothing newer is applied before an older entry left pending)."""
        self.parsed, self.ready = [], []
        for part in self.owned.values():
            part.recovering, part.cursor = True, "0-0"

    def wait_for_events(self) -> None:
        """Nothing came: wait up to ``poll_s`` for a new entry in an owned stream.

        A plain XREAD (it changes nothing, so it needs no fencing) wakes the worker as soon as
        an entry arrives, where a sleep would add up to ``poll_s`` to its latency.  An entry that
        came between the last read and this wait is found after ``poll_s`` at the latest.  On a
        cluster the streams may live on different nodes: there, a sleep.
        """
        poll_ms = max(1, int(self.config.poll_s * 1000))
        if isinstance(self.r, RedisCluster) or not self.owned:
            time.sleep(poll_ms / 1000)
            return
        self.r.xread({part.keys.events: "$" for part in self.owned.values()}, count=1, block=poll_ms)

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
        """One batch of one partition (``step_all`` of it alone); the entries seen."""
        return self.step_all([part])

    def step_all(self, parts: Sequence[_Partition], read: bool = True) -> int:
        """Move every batch in hand one phase on, and read the next of each of ``parts``.

        A batch goes through three calls of this: read (or, recovering, claim), apply (one
        ``fs_apply`` per partition), then score and write its results (one ``fs_results`` per
        partition, and its dead letters).  Each call sends the applies first, then scores the
        batches applied in the previous call while Redis runs those applies, then sends their
        results and the next reads; so Redis and this process work at the same time, and there
        are two round trips per call whatever the number of partitions and events.  One
        ``scorer.scores`` call scores every event of the call.  A partition whose lease turns out
        to be lost is dropped, its entries left pending for its new owner.  The entries seen
        (read, applied or finished) are returned: 0 means there was nothing to do.
        """
        c = self.config
        calls = _Calls(self.r)
        try:
            # a batch read before its partition changed hands (even back to this worker) is not
            # applied: its partition's recovery redoes those entries after the older pending ones
            applying = [b for b in self.parsed if b.events and self.owned.get(b.part.keys.index) is b.part]
            for b in applying:
                calls.send(apply_call(b.part.keys, self.token, [e for _, e, _ in b.events], c))
            work = sum(len(b.events) for b in self.parsed)
            finished = [b for b in self.parsed if not b.events]  # dead letters only
            finished += self.ready
            work += sum(len(b.events) for b in self.ready)

            vectors: list[list[float]] = []
            for b in self.ready:
                self._payloads(b, vectors)
            customers = [event.customer_id for b in self.ready for _, event, _ in b.scored]
            decided = self._decide(customers, vectors)
            scored_at = iso_ms(int(time.time() * 1000))
            position = 0
            for b in finished:
                for call in self._finish(b, decided[position : position + len(b.scored)], scored_at):
                    calls.send(call)
                position += len(b.scored)
            finishing = calls.sent - len(applying)

            reading = list(parts) if read else []
            for part in reading:
                keys = part.keys
                if part.recovering:
                    claim = (keys.lease, keys.events, self.token, c.group, self.token, part.cursor, c.batch)
                    calls.send(["fs_claim", 2, *claim])
                else:
                    calls.send(
                        ["fs_read", 2, keys.lease, keys.events, self.token, c.group, self.token, c.batch]
                    )

            replies = calls.receive()
        finally:
            self.parsed, self.ready = [], []  # on a failure, left pending: the recovery redoes them
        try:
            return work + self._received(applying, finishing, reading, replies)
        except BaseException:
            self.parsed, self.ready = [], []
            raise

    def _received(
        self, applying: list[_Batch], finishing: int, reading: list[_Partition], replies: list[Any]
    ) -> int:
        """``step_all``'s replies: applied batches become ready, read ones parsed; the entries read."""
        work = 0
        for b, reply in zip(applying, replies, strict=False):
            if not self._lost(b.part, reply):
                b.pres = reply
                self.ready.append(b)
        for reply in replies[len(applying) : len(applying) + finishing]:
            if isinstance(reply, Exception):
                raise reply
        for part, reply in zip(reading, replies[len(applying) + finishing :], strict=True):
            if self._lost(part, reply):
                continue
            if part.recovering:
                cursor, entries, rows, deleted = reply
                part.cursor = cursor.decode()
                if part.cursor == "0-0":
                    part.recovering = False
                deliveries = {row[0]: int(row[3]) for row in rows}
                if deleted:  # only an XDEL or XTRIM from outside can do that: fs_trim keeps pending entries
                    log.error(
                        "partition %d: %d pending entries were deleted unscored",
                        part.keys.index,
                        len(deleted),
                    )
            else:
                entries = reply[0][1] if reply else []
                deliveries = {}
            work += len(entries)
            if entries:
                self.parsed.append(self._sort(part, entries, deliveries))
        return work

    def drain(self) -> None:
        """Finish every batch in hand (applied or only read), reading nothing new."""
        while self.parsed or self.ready:
            self.step_all([], read=False)

    def _lost(self, part: _Partition, reply: Any) -> bool:
        """Whether a pipelined call's reply says the partition is another worker's now (and drop it)."""
        if not isinstance(reply, Exception):
            return False
        if isinstance(reply, redis.ResponseError) and "FSLEASE" in str(reply):
            log.info("partition %d is another worker's now", part.keys.index)
            self.owned.pop(part.keys.index, None)
            return True
        raise reply

    def _sort(self, part: _Partition, entries: Sequence[Any], deliveries: dict[bytes, int]) -> _Batch:
        """The entries to apply, and those to dead-letter: malformed, delivered too often, misrouted."""
        c = self.config
        b = _Batch(part, deliveries)
        for entry_id, fields in entries:
            if fields is None:  # trimmed while pending (never, with fs_trim): nothing to score
                continue
            count = deliveries.get(entry_id, 1)
            raw = _field(fields, b"event")
            if raw is None:
                b.dead.append(_Dead(entry_id, "the entry has no event field", b"", count))
                continue
            if count > c.max_deliveries:
                b.dead.append(_Dead(entry_id, f"not done after {count - 1} deliveries", raw, count))
                continue
            try:
                event = parse_event(raw)
            except EventError as exc:
                b.dead.append(_Dead(entry_id, str(exc), raw, count))
                continue
            home = partition_of(event.customer_id, c.partitions)
            if home != part.keys.index:
                b.dead.append(_Dead(entry_id, f"customer_id belongs to partition {home}", raw, count))
                continue
            b.events.append((entry_id, event, raw))
        return b

    def _payloads(self, b: _Batch, vectors: list[list[float]]) -> None:
        """Each applied event's payload and vector (``vectors`` grows); the events already done."""
        for (entry_id, event, raw), pre in zip(b.events, b.pres, strict=True):
            if pre == 0:  # its result is written: only the acknowledgement is missing
                b.done.append((entry_id, event))
                continue
            payload = build_payload(event, decode_pre(pre))
            try:
                vectors.append(vectorize(payload, self.constants))
            except BadInputError as exc:
                b.dead.append(_Dead(entry_id, f"payload: {exc}", raw, b.deliveries.get(entry_id, 1)))
                continue
            b.scored.append((entry_id, event, payload))

    def _decide(self, customers: list[str], vectors: list[list[float]]) -> list[Decided]:
        """(score, approved, scorer) of each vector in one batch call (one per A/B arm when the
        worker follows a registry)."""
        if not vectors:
            return []
        if self.live is not None:
            return self.live.score_batch(customers, vectors)
        approves, name = self.scorer.approves, self.scorer_name
        return [(score, approves(score), name) for score in self.scorer.scores(vectors)]

    def _finish(self, b: _Batch, decided: Sequence[Decided], scored_at: str) -> list[list[Any]]:
        """The batch's ``fs_results`` and ``fs_dead`` calls."""
        c = self.config
        keys = b.part.keys
        calls: list[list[Any]] = []
        if b.scored or b.done:
            records: list[str] = []
            args: list[Any] = [c.group, c.results_maxlen, c.record_ttl_s, len(RESULT_FIELDS), *RESULT_FIELDS]
            for (entry_id, event, payload), (score, approved, scorer_name) in zip(
                b.scored, decided, strict=True
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
            for entry_id, event in b.done:
                records.append(keys.record(event.event_id))
                args += (entry_id, *[""] * len(RESULT_FIELDS))
            calls.append(["fs_results", 2 + len(records), keys.results, keys.events, *records, *args])
        now = iso_ms(int(time.time() * 1000))
        for d in b.dead:
            calls.append(
                [
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
                ]
            )
        self.processed += len(b.scored)
        self.dead_lettered += len(b.dead)
        return calls


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
