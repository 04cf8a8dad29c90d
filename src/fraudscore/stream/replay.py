"""The oracle: a single-threaded replay of the event stream in plain Python, no Redis.

``replay`` applies events one by one, in the order given, to in-memory state that follows the
same rules as the Redis function ``fs_apply`` (``functions.py``) and returns each event's
payload.  The workers must produce exactly these payloads, whatever their number, batch sizes,
crashes and redeliveries: per-customer order is all that matters, because customer state is
touched only by that customer's events and merchant state is kept per partition (see
``events.py``), and a partition's events are replayed here in their stream order.

Malformed raw events are skipped (the workers dead-letter them); a repeated event id in a
partition is applied once, as by the workers.  State never expires here: the replay assumes
no customer stays idle longer than the workers' state TTL.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from fraudscore.errors import EventError
from fraudscore.stream.events import (
    KNOWN_MERCHANTS_CAP,
    WINDOW_CAP,
    WINDOW_MS,
    Event,
    Point,
    PreState,
    build_payload,
    effective_home,
    parse_event,
)
from fraudscore.stream.keys import partition_of


@dataclass
class _Customer:
    count: int = 0
    sum_cents: int = 0
    last_time_ms: int | None = None
    last_terminal: Point | None = None
    home: Point | None = None
    times: list[int] = field(default_factory=list)  # sorted event times in the window
    merchants: dict[str, int] = field(default_factory=dict)  # merchant -> event number


@dataclass
class Replay:
    """Replay state; ``apply`` one event at a time, or ``replay`` a whole stream."""

    partitions: int
    customers: dict[str, _Customer] = field(default_factory=dict)
    merchants: dict[tuple[int, str], list[int]] = field(default_factory=dict)  # -> [count, cents]
    seen: dict[tuple[int, str], dict[str, Any]] = field(default_factory=dict)

    def apply(self, event: Event) -> dict[str, Any]:
        """The payload of ``event`` (the first one's, for a repeated id), then its state change."""
        part = partition_of(event.customer_id, self.partitions)
        if (part, event.event_id) in self.seen:
            return self.seen[(part, event.event_id)]
        c = self.customers.setdefault(event.customer_id, _Customer())
        m = self.merchants.setdefault((part, event.merchant_id), [0, 0])
        low = event.time_ms - WINDOW_MS
        del c.times[: bisect.bisect_left(c.times, low)]
        window = bisect.bisect_right(c.times, event.time_ms) - bisect.bisect_left(c.times, low)
        pre = PreState(
            customer_count=c.count,
            sum_cents=c.sum_cents,
            last_time_ms=c.last_time_ms,
            last_terminal=c.last_terminal,
            home=c.home,
            window_count=window,
            known_merchants=tuple(sorted(c.merchants, key=c.merchants.__getitem__, reverse=True)),
            merchant_count=m[0],
            merchant_sum_cents=m[1],
        )
        payload = build_payload(event, pre)
        self.seen[(part, event.event_id)] = payload

        c.count += 1
        c.sum_cents += event.cents
        c.last_time_ms = event.time_ms
        c.last_terminal = event.terminal
        c.home = effective_home(event, pre)
        bisect.insort(c.times, event.time_ms)
        del c.times[: max(0, len(c.times) - WINDOW_CAP)]
        c.merchants.pop(event.merchant_id, None)
        c.merchants[event.merchant_id] = c.count
        if len(c.merchants) > KNOWN_MERCHANTS_CAP:
            del c.merchants[min(c.merchants, key=c.merchants.__getitem__)]
        m[0] += 1
        m[1] += event.cents
        return payload


def replay(raw_events: Iterable[bytes | str], partitions: int) -> dict[tuple[int, str], dict[str, Any]]:
    """Each valid event's payload, keyed by (partition, event id), from a stream in its order."""
    state = Replay(partitions)
    for raw in raw_events:
        try:
            event = parse_event(raw)
        except EventError:
            continue
        state.apply(event)
    return state.seen
