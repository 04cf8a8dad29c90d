"""A small deterministic generator of raw events: customers with homes and favourite merchants.

The same arguments always give the same events (one ``random.Random(seed)``).  Customers live
around a few Brazilian cities and mostly buy from their favourite merchants, near home; some
purchases are online, some far from home.  Event times are whole seconds apart (sometimes
zero: ties happen), so a customer's 24 h window fills and empties as the stream goes on.
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

import math
import random
from dataclasses import dataclass

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
SHAPES = ("constant", "ramp", "burst", "wave")
FLOOR = 0.1  # every shape's lowest rate, as a share of its peak
BURST_SHARE = 0.1  # of each period a burst lasts
FRAUD_MCCS = ("7801", "7802", "7995")  # the riskiest codes of the contract's mcc_risk.json


@dataclass(frozen=True)
class Customer:
    id: str
    home: Point
    favourites: tuple[int, ...]  # merchant numbers
    typical_cents: int


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
    (30, True)
    """
    if not 0.0 <= fraud_share <= 1.0:
        raise ValueError(f"the fraud share must be in [0, 1], not {fraud_share}")
    rng = random.Random(seed)
    fraud_rng = random.Random(f"fraud-{seed}")
    shops = [
        Merchant(f"MERC-{m:04d}", rng.choice(MCCS), _near(rng, rng.choice(CITIES), 0.08))
        for m in range(merchants)
    ]
    people = []
    for c in range(customers):
        home = _near(rng, rng.choice(CITIES), 0.08)
        nearby = sorted(
            range(merchants),
            key=lambda m: (shops[m].location.lat - home.lat) ** 2 + (shops[m].location.lon - home.lon) ** 2,
        )
        favourites = tuple(rng.sample(nearby[:20], min(merchants, rng.randint(2, 6))))
        typical = int(100 * math.exp(rng.uniform(math.log(10), math.log(800))))
        people.append(Customer(f"C-{c:05d}", home, favourites, typical))
    seen: set[str] = set()
    frauds: set[str] = set()
    events = []
    t = start_ms
    for n in range(n_events):
        t += 1000 * int(rng.expovariate(1.0 / mean_gap_s))
        who = rng.choice(people)
        shop = shops[rng.choice(who.favourites) if rng.random() < 0.85 else rng.randrange(merchants)]
        online = rng.random() < 0.2
        present = not online and rng.random() < 0.95
        if rng.random() < 0.02:  # far from home: another city
            terminal = _near(rng, rng.choice(CITIES), 0.5)
        elif present:
            terminal = shop.location
        else:
            terminal = _near(rng, who.home, 0.02)
        first = who.id not in seen
        seen.add(who.id)
        given_home = who.home if (first and rng.random() < 0.9) or rng.random() < 0.001 else None
        cents = max(1, int(who.typical_cents * math.exp(rng.gauss(0, 0.6))))
        event = Event(
            event_id=f"ev-{seed}-{n:08d}",
            customer_id=who.id,
            cents=cents,
            installments=1 if rng.random() < 0.6 else rng.randint(2, 12),
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
        if fraud_share and not first and fraud_rng.random() < fraud_share:
            event = _fraudulent(fraud_rng, event, who, shops)
            frauds.add(event.event_id)
        events.append(event)
    return events, frozenset(frauds)


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


@dataclass(frozen=True)
class RateShape:
    """A publishing rate over wall-clock time: ``peak`` events/s at most, periodic.

    >>> [RateShape("burst", 100.0, period=10.0).rate_at(t) for t in (0.5, 5.0, 10.5)]
    [100.0, 10.0, 100.0]
    >>> [round(RateShape("ramp", 100.0, period=10.0).rate_at(t)) for t in (0.0, 5.0, 9.999)]
    [10, 55, 100]
    """

    shape: str
    peak: float
    period: float = 60.0

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
        else:
            share = 1.0
        return self.peak * share

    def schedule(self, n: int) -> list[float]:
        """When each of ``n`` events is due: the k-th when the rate's integral reaches k.

        >>> RateShape("constant", 4.0).schedule(3)
        [0.0, 0.25, 0.5]
        """
        step = self.period / 1000.0  # the rate is taken as constant over each step
        due: list[float] = []
        t = sent = 0.0  # sent: the rate's integral up to t
        while len(due) < n:
            rate = self.rate_at(t)
            reached = sent + rate * step
            while len(due) < n and len(due) < reached:
                due.append(round(t + (len(due) - sent) / rate, 6))
            t, sent = t + step, reached
        return due
