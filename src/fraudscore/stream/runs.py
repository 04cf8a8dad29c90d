"""The generator's runs: a registry in Redis that ``fraudscore monitor`` reads, and the paced run.

``fraudscore generate`` publishes one *run*: events of a labelled population
(``generate.labelled``) at the pace of a ``RateShape`` for a duration.  Each event's id is
``<run id>-<n>``, so every result names its run, and the run's ground truth (the ids of the
events made fraudulent) goes into the set ``{fs}:run:<run>:frauds`` before those events are
published, so a result never arrives before its truth.  The hash ``{fs}:run:<run>`` holds the
run's settings, its start and end (Redis's clock, ms) and its counts; ``{fs}:runs`` lists the
runs by start.  A run id is claimed once (HSETNX): reusing one would make its events repeats of
the old ones, which the workers would recognise by id and not score again.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from fraudscore.stream.events import Event
from fraudscore.stream.generate import RateShape, labelled, raw
from fraudscore.stream.keys import RUNS, run_frauds_key, run_key
from fraudscore.stream.produce import publish
from fraudscore.stream.worker import Client

RUN_ID = re.compile(r"[A-Za-z0-9_.]([A-Za-z0-9_.-]{0,62}[A-Za-z0-9_.])?")
MAX_CHUNK = 1000  # events per pipelined send
FILL_STEP = 200  # events generated ahead between two looks at the clock
LOOKAHEAD_S = 2.0  # events generated ahead of their due time while there is nothing to send
MEAN_GAP_PER_CUSTOMER_S = 8 * 3600.0  # in event time: about three purchases a day per customer


@dataclass(frozen=True)
class RunSpec:
    """What ``fraudscore generate`` was asked for."""

    run_id: str
    shape: str
    rate: float  # peak events/s
    period: float
    duration: float  # seconds
    customers: int
    fraud_share: float
    seed: int
    partitions: int

    def rate_shape(self) -> RateShape:
        return RateShape(self.shape, self.rate, self.period, seed=self.seed)


def check_run_id(run_id: str) -> str:
    """A run id: 1-64 letters, digits, ``_``, ``.`` and inner ``-`` (no ``:``: keys stay apart).

    >>> check_run_id("wave-1")
    'wave-1'
    """
    if not RUN_ID.fullmatch(run_id):
        raise ValueError(
            f"{run_id!r} is not a run id: 1-64 letters, digits, '_', '.', and '-' not at either end"
        )
    return run_id


def new_run_id() -> str:
    """A fresh run id: the UTC time, and a random suffix for two runs in one second."""
    import secrets

    return time.strftime("run-%Y%m%dT%H%M%S", time.gmtime()) + f"-{secrets.token_hex(2)}"


def redis_ms(client: Client) -> int:
    """Redis's clock, in ms: the one the stream entries' ids carry."""
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def claim(client: Client, spec: RunSpec) -> bool:
    """Register the run; False when its id is taken."""
    key = run_key(spec.run_id)
    if not client.hsetnx(key, "run_id", spec.run_id):
        return False
    fields: Any = {k: str(v) for k, v in asdict(spec).items()}
    planned = spec.rate_shape().count_within(spec.duration)
    fields |= {"planned": planned, "published": 0, "frauds": 0, "state": "starting"}
    client.hset(key, mapping=fields)
    return True


def runs(client: Client) -> list[dict[str, str]]:
    """Every registered run's hash, oldest first."""
    ids: Any = client.zrange(RUNS, 0, -1)
    found = []
    for run_id in ids:
        fields: Any = client.hgetall(run_key(run_id.decode()))
        if fields:
            found.append({k.decode(): v.decode() for k, v in fields.items()})
    return found


def run_info(client: Client, run_id: str) -> dict[str, str] | None:
    fields: Any = client.hgetall(run_key(run_id))
    return {k.decode(): v.decode() for k, v in fields.items()} if fields else None


def frauds_of(client: Client, run_id: str) -> set[str]:
    """The run's ground truth: the ids of its fraudulent events."""
    members: Any = client.smembers(run_frauds_key(run_id))
    return {m.decode() for m in members}


def _population(spec: RunSpec) -> Iterator[tuple[bytes, bool, str]]:
    """The run's events as (raw bytes, fraud, event id), endless."""
    for event, fraud in population_events(spec.customers, spec.seed, spec.fraud_share, spec.run_id):
        yield raw(event), fraud, event.event_id


def publish_run(client: Client, spec: RunSpec, stop: threading.Event | None = None) -> dict[str, int]:
    """Claim the run (``claim`` first), then publish its events at the pace of its shape until
    ``duration`` is over or ``stop`` is set; the counts (published, frauds)."""
    shape = spec.rate_shape()
    key = run_key(spec.run_id)
    source = _population(spec)
    due = shape.due_times()
    ahead: list[tuple[float, bytes, bool, str]] = []  # generated, not yet sent

    def fill(until: float, most: int) -> None:
        while len(ahead) < most and (not ahead or ahead[-1][0] < until):
            t = next(due)
            if t >= spec.duration:
                return
            ahead.append((t, *next(source)))

    fill(min(LOOKAHEAD_S, spec.duration), 1_000_000)
    started = redis_ms(client)
    client.zadd(RUNS, {spec.run_id: started})
    client.hset(key, mapping={"started_ms": started, "state": "running"})
    start = time.monotonic()
    published = frauds = 0
    done = False
    while not (stop is not None and stop.is_set()):
        now = time.monotonic() - start
        fill(now, MAX_CHUNK)  # catch up when behind
        ready = 0
        while ready < len(ahead) and ready < MAX_CHUNK and ahead[ready][0] <= now:
            ready += 1
        if ready:
            chunk, ahead[:ready] = ahead[:ready], []
            bad = [event_id for _, _, fraud, event_id in chunk if fraud]
            if bad:  # the truth first: a result never arrives before it
                client.sadd(run_frauds_key(spec.run_id), *bad)
            publish(client, [r for _, r, _, _ in chunk], spec.partitions, chunk=MAX_CHUNK)
            published += len(chunk)
            frauds += len(bad)
            pipe = client.pipeline(transaction=False)
            pipe.hincrby(key, "published", len(chunk))
            pipe.hincrby(key, "frauds", len(bad))
            pipe.execute()
            continue
        if not ahead:
            fill(spec.duration, 1)
            if not ahead:
                done = True
                break
        # nothing due: generate ahead a little at a time (then look again), else sleep
        before = len(ahead)
        fill(now + LOOKAHEAD_S, before + FILL_STEP)
        if len(ahead) > before:
            continue
        wait = ahead[0][0] - (time.monotonic() - start)
        if wait > 0:
            time.sleep(min(wait, 0.1))
    client.hset(key, mapping={"ended_ms": redis_ms(client), "state": "done" if done else "stopped"})
    return {"published": published, "frauds": frauds}


def population_events(
    customers: int, seed: int, fraud_share: float, run_id: str, n_events: int | None = None
) -> Iterator[tuple[Event, bool]]:
    """A run's events, each with its ground truth: ``generate.labelled`` for a population of
    ``customers``, whose event time advances by their habits, not by the wall-clock rate."""
    return labelled(
        n_events,
        customers=customers,
        merchants=max(50, customers // 5),
        seed=seed,
        mean_gap_s=MEAN_GAP_PER_CUSTOMER_S / customers,
        fraud_share=fraud_share,
        id_prefix=run_id,
    )
