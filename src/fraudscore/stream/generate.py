"""A small deterministic generator of raw events: customers with homes and favourite merchants.

The same arguments always give the same events (one ``random.Random(seed)``).  Customers live
around a few Brazilian cities and buy mostly (95 %) at one to four favourite merchants, else at
another merchant of their neighbourhood; a quarter online, 1 % while travelling.  Risky MCCs
are rare (3 % of merchants), and most purchases are paid at once or in two or three
installments.  Event time follows a day's rhythm (``DIURNAL``: busy by day, quiet at night),
independently of how fast a producer sends the events; times are whole seconds apart
(sometimes zero: ties happen) unless the mean gap is under a second, so a customer's 24 h
window fills and empties as the stream goes on.
``malformed`` gives raw events that must be dead-lettered, one of each kind of mistake.
``generate_labelled`` also makes a share of the events fraudulent on purpose (a card used
online, far from home, at a risky merchant the customer never visited, for many times the usual
amount) and returns their ids: the ground truth that ``fraudscore pipeline demo`` measures the
decisions against.  The other events are exactly ``generate``'s.

``RateShape`` says how fast a producer sends them (events per second of wall-clock time, which
has nothing to do with the events' own times): constant, a ramp, bursts or a wave, repeating
every ``period`` seconds and never below a tenth of the peak.  ``RateShape.schedule(n)`` gives
the moment, from the start, at which each of n events is due.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import orjson

from fraudscore.stream.events import Event, Point, event_json

CITIES = (
    Point(-23.5505, -46.6333),  # São Paulo
    Point(-22.9068, -43.1729),  # Rio de Janeiro
    Point(-19.9167, -43.9345),  # Belo Horizonte
    Point(-30.0346, -51.2177),  # Porto Alegre
    Point(-8.0476, -34.8770),  # Recife
    Point(-15.7939, -47.8828),  # Brasília
)
MCCS = ("5411", "5812", "5912", "5944", "7801", "7802", "7995", "4511", "5311", "5999")
START_MS = 1_773_187_200_000  # 2026-03-11T00:00:00Z
SHAPES = ("constant", "ramp", "burst", "wave", "spike", "random")
RUN_SHAPES = ("constant", "wave", "spike", "random")  # `fraudscore generate --shape`
FLOOR = 0.1  # every shape's lowest rate, as a share of its peak
BURST_SHARE = 0.1  # of each period a burst lasts
SPIKE_SHARE = 0.1  # of each period a spike lasts (in its middle)
SPIKE_BASE = 0.2  # the rate between spikes, as a share of the peak
WALK_S = 1.0  # the random shape holds each level this long
WALK_STEP = 0.25  # the random shape's largest step, as a share of the peak
FRAUD_MCCS = ("7801", "7802", "7995")  # the riskiest codes of the contract's mcc_risk.json
EVERYDAY_MCCS = tuple(m for m in MCCS if m not in FRAUD_MCCS)
RISKY_MCC_SHARE = 0.03  # of the merchants
NEIGHBOURHOOD = 12  # merchants near a customer's home
FAVOURITE_SHARE = 0.95  # of a customer's purchases, at a favourite merchant
ONLINE_SHARE = 0.25
TRAVEL_SHARE = 0.01  # of legitimate purchases, in another city
# the rate of events by hour of the day (UTC), relative to the mean: quiet at night, busy by day
_HOURLY = "0.15 0.1 0.08 0.08 0.1 0.2 0.5 0.9 1.3 1.5 1.6 1.7 1.8 1.7 1.6 1.6 1.7 1.8 1.8 1.6 1.3 1.0 0.6 0.3"
DIURNAL = tuple(float(x) * 24 / sum(map(float, _HOURLY.split())) for x in _HOURLY.split())


@dataclass(frozen=True)
class Customer:
    id: str
    home: Point
    favourites: tuple[int, ...]  # merchant numbers, the most visited first
    typical_cents: int
    nearby: tuple[int, ...] = ()  # merchants near home, where a new purchase usually happens


@dataclass(frozen=True)
class Merchant:
    id: str
    mcc: str
    location: Point


def _near(rng: random.Random, p: Point, degrees: float) -> Point:
    return Point(round(p.lat + rng.gauss(0, degrees), 6), round(p.lon + rng.gauss(0, degrees), 6))


def generate(
    n_events: int,
    *,
    customers: int = 1000,
    merchants: int = 200,
    seed: int = 0,
    mean_gap_s: float = 2.0,
    start_ms: int = START_MS,
) -> list[Event]:
    """``n_events`` events in stream order, times non-decreasing from ``start_ms``."""
    events, _ = generate_labelled(
        n_events,
        customers=customers,
        merchants=merchants,
        seed=seed,
        mean_gap_s=mean_gap_s,
        start_ms=start_ms,
        fraud_share=0.0,
    )
    return events


def generate_labelled(
    n_events: int,
    *,
    customers: int = 1000,
    merchants: int = 200,
    seed: int = 0,
    mean_gap_s: float = 2.0,
    start_ms: int = START_MS,
    fraud_share: float = 0.02,
) -> tuple[list[Event], frozenset[str]]:
    """``generate``'s events with about ``fraud_share`` of them made fraudulent; their ids.

    The fraud draws come from a random generator of their own, so every other event is the
    one ``generate`` gives for the same arguments.

    >>> events, frauds = generate_labelled(2000, seed=1)
    >>> len(frauds), events[:3] == generate(3, seed=1)
    (26, True)
    """
    events: list[Event] = []
    frauds: set[str] = set()
    for event, fraud in labelled(
        n_events,
        customers=customers,
        merchants=merchants,
        seed=seed,
        mean_gap_s=mean_gap_s,
        start_ms=start_ms,
        fraud_share=fraud_share,
    ):
        events.append(event)
        if fraud:
            frauds.add(event.event_id)
    return events, frozenset(frauds)


def labelled(
    n_events: int | None,
    *,
    customers: int = 1000,
    merchants: int = 200,
    seed: int = 0,
    mean_gap_s: float = 2.0,
    start_ms: int = START_MS,
    fraud_share: float = 0.02,
    id_prefix: str | None = None,
) -> Iterator[tuple[Event, bool]]:
    """``generate_labelled``'s events one at a time, each with its ground truth (True: a fraud);
    endless when ``n_events`` is None.  Event ids are ``<id_prefix>-<n>`` (``ev-<seed>`` by
    default), so ``fraudscore generate`` tags each with its run."""
    if not 0.0 <= fraud_share <= 1.0:
        raise ValueError(f"the fraud share must be in [0, 1], not {fraud_share}")
    prefix = f"ev-{seed}" if id_prefix is None else id_prefix
    rng = random.Random(seed)
    fraud_rng = random.Random(f"fraud-{seed}")
    shops = [
        Merchant(f"MERC-{m:04d}", _mcc(rng), _near(rng, CITIES[m % len(CITIES)], 0.08))
        for m in range(merchants)
    ]
    by_city = [list(range(c, merchants, len(CITIES))) or list(range(merchants)) for c in range(len(CITIES))]
    people = []
    for c in range(customers):
        city = rng.randrange(len(CITIES))
        home = _near(rng, CITIES[city], 0.08)
        # the nearest of a sample of the city's merchants: the customer's neighbourhood
        sample = rng.sample(by_city[city], min(NEIGHBOURHOOD * 2, len(by_city[city])))
        nearby = sorted(sample, key=lambda m: _km2(shops[m].location, home))[:NEIGHBOURHOOD]
        favourites = tuple(rng.sample(nearby, min(len(nearby), rng.randint(1, 4))))
        typical = int(100 * math.exp(rng.uniform(math.log(10), math.log(800))))
        people.append(Customer(f"C-{c:05d}", home, favourites, typical, tuple(nearby)))
    seen: set[str] = set()
    t = start_ms
    n = 0
    unit = 1000 if mean_gap_s >= 1 else 1  # whole seconds apart (ties happen), unless that is too coarse
    while n_events is None or n < n_events:
        # a day's rhythm: events come faster by day than by night, in event time
        hour = (t // 3_600_000) % 24
        t += unit * int(rng.expovariate(DIURNAL[hour] / mean_gap_s) * 1000 / unit)
        who = rng.choice(people)
        draw = rng.random()
        if draw < FAVOURITE_SHARE:  # mostly the first favourites
            shop = shops[who.favourites[min(int(rng.expovariate(1.0)), len(who.favourites) - 1)]]
        else:  # now and then somewhere new, but in the neighbourhood
            shop = shops[rng.choice(who.nearby)]
        online = rng.random() < ONLINE_SHARE
        present = not online and rng.random() < 0.9
        if rng.random() < TRAVEL_SHARE:  # travelling: another city
            terminal = _near(rng, rng.choice(CITIES), 0.5)
        elif present:
            terminal = shop.location
        else:
            terminal = _near(rng, who.home, 0.02)
        first = who.id not in seen
        seen.add(who.id)
        given_home = who.home if (first and rng.random() < 0.9) or rng.random() < 0.001 else None
        cents = max(1, int(who.typical_cents * math.exp(rng.gauss(0, 0.5))))
        event = Event(
            event_id=f"{prefix}-{n:08d}",
            customer_id=who.id,
            cents=cents,
            installments=_installments(rng),
            time_ms=t,
            merchant_id=shop.id,
            mcc=shop.mcc,
            merchant_location=shop.location if rng.random() < 0.8 else None,
            is_online=online,
            card_present=present,
            terminal=terminal,
            customer_home=given_home,
        )
        # a customer's first event sets their home: it stays theirs, never a fraud
        fraud = bool(fraud_share) and not first and fraud_rng.random() < fraud_share
        if fraud:
            event = _fraudulent(fraud_rng, event, who, shops)
        yield event, fraud
        n += 1


def _km2(a: Point, b: Point) -> float:
    return (a.lat - b.lat) ** 2 + (a.lon - b.lon) ** 2


def _mcc(rng: random.Random) -> str:
    """A merchant's category: the risky ones rare."""
    return rng.choice(FRAUD_MCCS) if rng.random() < RISKY_MCC_SHARE else rng.choice(EVERYDAY_MCCS)


def _installments(rng: random.Random) -> int:
    """Mostly one payment, often two or three, now and then more."""
    draw = rng.random()
    return 1 if draw < 0.6 else rng.randint(2, 3) if draw < 0.92 else rng.randint(4, 12)


def _fraudulent(rng: random.Random, event: Event, who: Customer, shops: list[Merchant]) -> Event:
    """``event`` as a stolen card's use: online, far away, a risky unknown merchant, a big amount."""
    risky = [m for i, m in enumerate(shops) if m.mcc in FRAUD_MCCS and i not in who.favourites] or shops
    shop = rng.choice(risky)
    far = [c for c in CITIES if (c.lat - who.home.lat) ** 2 + (c.lon - who.home.lon) ** 2 > 1.0] or list(
        CITIES
    )
    return event._replace(
        cents=int(who.typical_cents * rng.uniform(8.0, 30.0)),
        installments=rng.randint(6, 12),
        merchant_id=shop.id,
        mcc=shop.mcc,
        merchant_location=shop.location,
        is_online=True,
        card_present=False,
        terminal=_near(rng, rng.choice(far), 0.3),
        customer_home=None,
    )


def raw(event: Event) -> bytes:
    """An event as the bytes a producer publishes."""
    return orjson.dumps(event_json(event))


def malformed(customer_id: str = "C-00000") -> list[tuple[bytes, str]]:
    """(raw event, a word its dead-letter reason must contain): one of each kind of mistake."""
    good = event_json(generate(1)[0]) | {"customer_id": customer_id}

    def variant(**changes: object) -> bytes:
        obj = dict(good)
        for key, value in changes.items():
            if value is ...:
                del obj[key]
            else:
                obj[key] = value
        return orjson.dumps(obj)

    return [
        (b'{"event_id": "x", "customer_id": ', "JSON"),
        (b"[1, 2, 3]", "object"),
        (variant(amount=...), "amount"),
        (variant(amount="12.50"), "amount"),
        (variant(amount=12.345), "cents"),
        (variant(installments=True), "installments"),
        (variant(event_time="yesterday"), "event_time"),
        (variant(event_time="2026-03-11T10:00:00"), "zone"),
        (variant(terminal={"lat": 91.0, "lon": 0.0}), "terminal"),
        (variant(is_online="no"), "is_online"),
        (variant(merchant_id=""), "merchant_id"),
    ]


@lru_cache(maxsize=64)
def _walk(seed: int, steps: int) -> tuple[float, ...]:
    """The ``random`` shape's first ``steps`` levels (shares of the peak): a seeded random walk
    that starts mid-way, moves by up to ``WALK_STEP`` each step and stays in [FLOOR, 1]."""
    rng = random.Random(f"walk-{seed}")
    level = (1 + FLOOR) / 2
    levels = []
    for _ in range(steps):
        levels.append(level)
        level = min(1.0, max(FLOOR, level + rng.uniform(-WALK_STEP, WALK_STEP)))
    return tuple(levels)


@dataclass(frozen=True)
class RateShape:
    """A publishing rate over wall-clock time: ``peak`` events/s at most, never below a tenth
    of it.  ``constant``; ``ramp``, ``burst``, ``wave`` and ``spike`` repeat every ``period``
    seconds; ``random`` holds a level for ``WALK_S`` seconds, then steps by a seeded random walk.

    >>> [RateShape("burst", 100.0, period=10.0).rate_at(t) for t in (0.5, 5.0, 10.5)]
    [100.0, 10.0, 100.0]
    >>> [round(RateShape("ramp", 100.0, period=10.0).rate_at(t)) for t in (0.0, 5.0, 9.999)]
    [10, 55, 100]
    >>> [RateShape("spike", 100.0, period=10.0).rate_at(t) for t in (1.0, 5.2, 9.0)]
    [20.0, 100.0, 20.0]
    >>> shape = RateShape("random", 100.0, seed=3)
    >>> again = RateShape("random", 100.0, seed=3)
    >>> [round(shape.rate_at(t)) for t in (0.0, 0.9)], shape.rate_at(7.5) == again.rate_at(7.5)
    ([55, 55], True)
    """

    shape: str
    peak: float
    period: float = 60.0
    seed: int = 0  # the ``random`` shape's walk

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"rate shape must be one of {', '.join(SHAPES)}, not {self.shape!r}")
        if not (self.peak > 0 and self.period > 0 and math.isfinite(self.peak * self.period)):
            raise ValueError("the rate and its period must be positive")

    def rate_at(self, t: float) -> float:
        """Events per second due at ``t`` seconds from the start."""
        phase = (t % self.period) / self.period
        if self.shape == "ramp":
            share = FLOOR + (1 - FLOOR) * phase
        elif self.shape == "burst":
            share = 1.0 if phase < BURST_SHARE else FLOOR
        elif self.shape == "wave":
            share = FLOOR + (1 - FLOOR) * (0.5 - 0.5 * math.cos(2 * math.pi * phase))
        elif self.shape == "spike":
            share = 1.0 if abs(phase - 0.5) < SPIKE_SHARE / 2 else SPIKE_BASE
        elif self.shape == "random":
            step = int(t // WALK_S)
            share = _walk(self.seed, 1 << max(6, step.bit_length()))[step]  # few distinct lengths cached
        else:
            share = 1.0
        return self.peak * share

    def due_times(self) -> Iterator[float]:
        """When each event is due, endlessly: the k-th when the rate's integral reaches k."""
        step = min(self.period, WALK_S) / 1000.0  # the rate is taken as constant over each step
        count = 0
        t = sent = 0.0  # sent: the rate's integral up to t
        while True:
            rate = self.rate_at(t)
            reached = sent + rate * step
            while count < reached:
                yield round(t + (count - sent) / rate, 6)
                count += 1
            t, sent = t + step, reached

    def schedule(self, n: int) -> list[float]:
        """When each of ``n`` events is due.

        >>> RateShape("constant", 4.0).schedule(3)
        [0.0, 0.25, 0.5]
        """
        return list(itertools.islice(self.due_times(), n))

    def count_within(self, seconds: float) -> int:
        """How many events are due in the first ``seconds``.

        >>> RateShape("constant", 50.0).count_within(4.0), RateShape("burst", 50.0, 10.0).count_within(10.0)
        (200, 95)
        """
        for count, due in enumerate(self.due_times()):
            if due >= seconds:
                return count
        raise AssertionError("unreachable: due_times is endless")
