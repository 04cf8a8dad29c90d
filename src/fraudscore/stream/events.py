"""Raw transaction events, the per-customer state before each one, and the contract payload.

A raw event is one JSON object; the producer puts its bytes in the ``event`` field of a stream
entry.  Its fields (anything else is ignored)::

    event_id            string, 1-128 chars     the idempotency key: an id seen before in the
                                                partition is a repeat of that event
    customer_id         string, 1-128 chars     decides the partition (``keys.partition_of``)
    amount              number >= 0, whole cents, < 1e10
    installments        integer >= 0
    event_time          ISO-8601 with a zone ("2026-03-11T18:45:53Z", "...-03:00"), kept to the ms;
                        event time, not wall-clock time, drives every window
    merchant_id         string, 1-128 chars
    mcc                 string (or integer) merchant category code
    merchant_location   {"lat", "lon"} or null / absent: where the merchant is (informational)
    is_online           true / false
    card_present        true / false
    terminal            {"lat", "lon"}: where the card was used
    customer_home       {"lat", "lon"}, optional: the customer's home; it is taken from the
                        latest event that carries one, and a customer whose events never carry
                        one has the terminal of their first event as home

Latitudes are in [-90, 90] and longitudes in [-180, 180] degrees.  An event that breaks any of
this is bad input (``EventError``, with the field's name) and goes to the dead-letter stream.

**State and the payload.**  The state the payload needs is, per customer: the count and sum of
their previous amounts (in cents, so sums are exact integers in Redis and in Python alike), the
time and terminal of their previous event, their home, the event times of the last 24 h
(a capped window), and their most recent merchants; per merchant: the count and sum of its
previous amounts.  ``PreState`` is that state as it was just before an event;
``build_payload`` turns an event and its ``PreState`` into exactly the contract's payload:

- ``customer.avg_amount``: the mean of the customer's previous amounts; the event's own
  amount when there are none (a neutral ratio of 1 for a first purchase).
- ``customer.tx_count_24h``: the customer's previous events (in stream order) whose event time
  lies in [t - 24 h, t].  The window keeps at most ``WINDOW_CAP`` times, far above the
  contract's clamp at 20, so the vector never sees the cap.  Times older than t - 24 h are
  dropped as each event is applied, so an event later in the stream but earlier in event time
  than its predecessors may find part of its window already dropped (the replay does the same).
- ``customer.known_merchants``: the ``KNOWN_MERCHANTS_CAP`` merchants of the customer's most
  recent previous events, most recent first.
- ``last_transaction``: the previous event's time and the haversine distance (km) between its
  terminal and this one's; null for the customer's first event.
- ``terminal.km_from_home``: haversine distance from this terminal to the customer's home.
- ``merchant.avg_amount``: the mean of the previous amounts at this merchant *in the event's
  partition*; the event's own amount when there are none.  A global running average would
  depend on how the workers of different partitions interleave, which nothing orders; a
  partition's average depends only on that partition's order, so it is the same in every run
  and in the replay.  Customers are hashed to partitions, so each partition's average is an
  unbiased sample of the merchant's; with one partition it is exactly the merchant's.

This module is pure Python: the Redis functions (``functions.py``) and the replay oracle
(``replay.py``) each compute ``PreState``, and both hand it to ``build_payload``.
"""

from __future__ import annotations

import functools
import math
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import orjson

from fraudscore.errors import EventError

WINDOW_MS = 24 * 3600 * 1000  # customer.tx_count_24h: the window, in event time
WINDOW_CAP = 200  # times kept per customer (the contract clamps the count at 20)
KNOWN_MERCHANTS_CAP = 50  # merchants kept per customer, most recent first
MAX_ID_CHARS = 128
MAX_AMOUNT = 1e10  # keeps every sum of cents an exact integer in a double (Lua) and an int64
EARTH_RADIUS_KM = 6371.0088  # mean Earth radius (IUGG)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


# NamedTuples, not frozen dataclasses: immutable alike, and several times cheaper to create,
# which the worker does a few times per event


class Point(NamedTuple):
    lat: float
    lon: float


class Event(NamedTuple):
    """A validated raw event; amounts in cents and times in ms since the epoch (UTC)."""

    event_id: str
    customer_id: str
    cents: int
    installments: int
    time_ms: int
    merchant_id: str
    mcc: str
    merchant_location: Point | None
    is_online: bool
    card_present: bool
    terminal: Point
    customer_home: Point | None


class PreState(NamedTuple):
    """A customer's and a merchant's state just before an event (what the payload is made of)."""

    customer_count: int  # the customer's previous events, all time
    sum_cents: int
    last_time_ms: int | None
    last_terminal: Point | None
    home: Point | None
    window_count: int  # previous events in [t - 24 h, t]
    known_merchants: tuple[str, ...]  # most recent first
    merchant_count: int  # the merchant's previous events in this partition
    merchant_sum_cents: int


def haversine_km(a: Point, b: Point) -> float:
    """Great-circle distance in km.

    >>> round(haversine_km(Point(-23.5505, -46.6333), Point(-22.9068, -43.1729)), 1)  # São Paulo-Rio
    360.7
    """
    lat1, lat2 = math.radians(a.lat), math.radians(b.lat)
    dlat = lat2 - lat1
    dlon = math.radians(b.lon - a.lon)
    h = math.sin(dlat / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin(dlon / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(h)))


def iso_ms(ms: int) -> str:
    """Milliseconds since the epoch as ISO-8601 UTC; the milliseconds only when not zero.

    >>> iso_ms(1773254753000), iso_ms(1773254753042)
    ('2026-03-11T18:45:53Z', '2026-03-11T18:45:53.042Z')
    """
    seconds, milli = divmod(ms, 1000)
    text = _second(seconds)
    return f"{text}.{milli:03d}Z" if milli else text + "Z"


@functools.lru_cache(maxsize=1 << 16)  # an event's time comes back as the next one's last_transaction
def _second(seconds: int) -> str:
    days, rest = divmod(seconds, 86_400)
    minutes, second = divmod(rest, 60)
    hour, minute = divmod(minutes, 60)
    return f"{_date(days)}T{hour:02d}:{minute:02d}:{second:02d}"


@functools.lru_cache(maxsize=4096)
def _date(days: int) -> str:
    return (_EPOCH + timedelta(days=days)).strftime("%Y-%m-%d")


def _field(obj: dict[str, Any], key: str) -> Any:
    if key not in obj:
        raise EventError(f"{key} is missing")
    return obj[key]


def _id(obj: dict[str, Any], key: str) -> str:
    value = _field(obj, key)
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_CHARS:
        raise EventError(f"{key} must be a string of 1 to {MAX_ID_CHARS} characters")
    return value


def _bool(obj: dict[str, Any], key: str) -> bool:
    value = _field(obj, key)
    if not isinstance(value, bool):
        raise EventError(f"{key} must be true or false")
    return value


def _real(value: Any, where: str, part: str = "") -> float:
    """A finite number; the error names ``where`` + ``part`` (formatted only then: this is hot)."""
    kind = type(value)
    if kind is float:
        if math.isfinite(value):
            return value  # type: ignore[no-any-return]
    elif kind is int:  # not bool: true is not a number here
        return float(value)
    raise EventError(f"{where}{part} must be a finite number")


def _point(value: Any, where: str) -> Point:
    if type(value) is not dict:
        raise EventError(f"{where} must be an object with lat and lon")
    lat = _real(value.get("lat"), where, ".lat")
    lon = _real(value.get("lon"), where, ".lon")
    if not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0):
        raise EventError(f"{where} is outside [-90, 90] x [-180, 180]")
    return Point(lat, lon)


def _optional_point(obj: dict[str, Any], key: str) -> Point | None:
    value = obj.get(key)
    return None if value is None else _point(value, key)


def _time_ms(value: Any) -> int:
    if not isinstance(value, str):
        raise EventError("event_time must be an ISO-8601 string")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise EventError(f"event_time is not ISO-8601: {value[:40]!r}") from None
    if moment.tzinfo is None:
        raise EventError("event_time must carry a zone (Z or an offset)")
    return (moment - _EPOCH) // _MS


def parse_event(raw: bytes | str) -> Event:
    """A raw event's JSON as an ``Event``; ``EventError`` names what is wrong."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise EventError(f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise EventError("the event must be a JSON object")
    amount = _real(_field(obj, "amount"), "amount")
    if not 0.0 <= amount < MAX_AMOUNT:
        raise EventError(f"amount must be in [0, {MAX_AMOUNT:.0f})")
    cents = round(amount * 100.0)
    if abs(amount * 100.0 - cents) > 1e-6 * max(1.0, amount):
        raise EventError("amount must be a whole number of cents")
    installments = _field(obj, "installments")
    if isinstance(installments, bool) or not isinstance(installments, int) or installments < 0:
        raise EventError("installments must be an integer >= 0")
    mcc = _field(obj, "mcc")
    if isinstance(mcc, bool) or not isinstance(mcc, str | int):
        raise EventError("mcc must be a string")
    return Event(
        event_id=_id(obj, "event_id"),
        customer_id=_id(obj, "customer_id"),
        cents=cents,
        installments=installments,
        time_ms=_time_ms(_field(obj, "event_time")),
        merchant_id=_id(obj, "merchant_id"),
        mcc=str(mcc),
        merchant_location=_optional_point(obj, "merchant_location"),
        is_online=_bool(obj, "is_online"),
        card_present=_bool(obj, "card_present"),
        terminal=_point(_field(obj, "terminal"), "terminal"),
        customer_home=_optional_point(obj, "customer_home"),
    )


def effective_home(event: Event, pre: PreState) -> Point:
    """The home this event is measured from: its own, else the stored one, else its terminal."""
    return event.customer_home or pre.home or event.terminal


def build_payload(event: Event, pre: PreState) -> dict[str, Any]:
    """The contract's payload for ``event``, from the state just before it."""
    amount = event.cents / 100.0
    avg = pre.sum_cents / pre.customer_count / 100.0 if pre.customer_count else amount
    merchant_avg = pre.merchant_sum_cents / pre.merchant_count / 100.0 if pre.merchant_count else amount
    last: dict[str, Any] | None = None
    if pre.last_time_ms is not None and pre.last_terminal is not None:
        last = {
            "timestamp": iso_ms(pre.last_time_ms),
            "km_from_current": haversine_km(pre.last_terminal, event.terminal),
        }
    return {
        "id": event.event_id,
        "transaction": {
            "amount": amount,
            "installments": event.installments,
            "requested_at": iso_ms(event.time_ms),
        },
        "customer": {
            "avg_amount": avg,
            "tx_count_24h": pre.window_count,
            "known_merchants": list(pre.known_merchants),
        },
        "merchant": {"id": event.merchant_id, "mcc": event.mcc, "avg_amount": merchant_avg},
        "terminal": {
            "is_online": event.is_online,
            "card_present": event.card_present,
            "km_from_home": haversine_km(effective_home(event, pre), event.terminal),
        },
        "last_transaction": last,
    }


def event_json(event: Event) -> dict[str, Any]:
    """The raw JSON object of an event (the inverse of ``parse_event``), for producers and tests."""

    def point(p: Point | None) -> dict[str, float] | None:
        return None if p is None else {"lat": p.lat, "lon": p.lon}

    obj: dict[str, Any] = {
        "event_id": event.event_id,
        "customer_id": event.customer_id,
        "amount": event.cents / 100.0,
        "installments": event.installments,
        "event_time": iso_ms(event.time_ms),
        "merchant_id": event.merchant_id,
        "mcc": event.mcc,
        "merchant_location": point(event.merchant_location),
        "is_online": event.is_online,
        "card_present": event.card_present,
        "terminal": point(event.terminal),
    }
    if event.customer_home is not None:
        obj["customer_home"] = point(event.customer_home)
    return obj
