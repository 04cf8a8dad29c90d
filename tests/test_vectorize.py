"""The contract's 14 dimensions, each clamp and sentinel, and every bad payload."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from fraudscore import PayloadError, vectorize
from fraudscore.contract.vectorize import Constants

BASE: dict[str, Any] = {
    "id": "tx-1329056812",
    "transaction": {"amount": 41.12, "installments": 2, "requested_at": "2026-03-11T18:45:53Z"},
    "customer": {"avg_amount": 82.24, "tx_count_24h": 3, "known_merchants": ["MERC-003", "MERC-016"]},
    "merchant": {"id": "MERC-016", "mcc": "5411", "avg_amount": 60.25},
    "terminal": {"is_online": False, "card_present": True, "km_from_home": 29.2331036248},
    "last_transaction": None,
}


def with_(path: str, value: Any) -> dict[str, Any]:
    payload = copy.deepcopy(BASE)
    *parents, key = path.split(".")
    node = payload
    for p in parents:
        node = node[p]
    if value is KeyError:
        del node[key]
    else:
        node[key] = value
    return payload


def test_worked_example(example_payloads: list[dict[str, Any]]) -> None:
    expected = [0.0041, 0.1667, 0.05, 0.7826, 0.3333, -1, -1, 0.0292, 0.15, 0, 1, 0, 0.15, 0.006]
    assert example_payloads[0]["id"] == "tx-1329056812"
    assert vectorize(example_payloads[0]) == expected
    assert vectorize(BASE) == expected


def test_last_transaction_fills_5_and_6() -> None:
    v = vectorize(with_("last_transaction", {"timestamp": "2026-03-11T12:45:53Z", "km_from_current": 18.86}))
    assert v[5] == round(360 / 1440, 4)
    assert v[6] == round(18.86 / 1000, 4)


def test_missing_last_transaction_is_the_sentinel() -> None:
    v = vectorize(with_("last_transaction", KeyError))
    assert v[5] == v[6] == -1


def test_fractional_minutes_come_from_seconds() -> None:
    v = vectorize(with_("last_transaction", {"timestamp": "2026-03-11T18:44:23Z", "km_from_current": 0}))
    assert v[5] == round(1.5 / 1440, 4)


@pytest.mark.parametrize(
    ("path", "value", "dim", "expected"),
    [
        ("transaction.amount", 25000.0, 0, 1.0),
        ("transaction.installments", 30, 1, 1.0),
        ("transaction.amount", 5000.0, 2, 1.0),  # 5000 / 82.24 / 10 > 1
        ("terminal.km_from_home", 4000.0, 7, 1.0),
        ("customer.tx_count_24h", 45, 8, 1.0),
        ("merchant.avg_amount", 20000.0, 13, 1.0),
        ("transaction.amount", 0, 0, 0.0),
    ],
)
def test_each_clamp(path: str, value: Any, dim: int, expected: float) -> None:
    assert vectorize(with_(path, value))[dim] == expected


def test_minutes_and_km_from_last_clamp() -> None:
    far = {"timestamp": "2026-03-01T00:00:00Z", "km_from_current": 5000}
    v = vectorize(with_("last_transaction", far))
    assert (v[5], v[6]) == (1.0, 1.0)
    future = {"timestamp": "2026-03-12T00:00:00Z", "km_from_current": 0}
    assert vectorize(with_("last_transaction", future))[5] == 0.0


def test_hour_and_weekday_are_utc() -> None:
    v = vectorize(with_("transaction.requested_at", "2026-03-15T23:30:00-03:00"))  # Monday 02:30 UTC
    assert v[3] == round(2 / 23, 4)
    assert v[4] == 0.0
    assert (
        vectorize(with_("transaction.requested_at", "2026-03-15T12:00:00"))[4] == 1.0
    )  # naive = UTC, Sunday


def test_binary_dimensions() -> None:
    v = vectorize(with_("terminal.is_online", True))
    assert (v[9], v[10]) == (1.0, 1.0)
    assert vectorize(with_("merchant.id", "MERC-999"))[11] == 1.0


def test_known_merchants_may_repeat_or_be_empty() -> None:
    assert vectorize(with_("customer.known_merchants", ["MERC-016", "MERC-016"]))[11] == 0.0
    assert vectorize(with_("customer.known_merchants", []))[11] == 1.0


def test_mcc_risk_and_unknown_mcc() -> None:
    assert vectorize(with_("merchant.mcc", "7995"))[12] == 0.85
    assert vectorize(with_("merchant.mcc", "0000"))[12] == 0.5
    assert vectorize(with_("merchant.mcc", 5411))[12] == 0.15


def test_zero_or_negative_customer_average() -> None:
    assert vectorize(with_("customer.avg_amount", 0))[2] == 1.0
    assert vectorize(with_("customer.avg_amount", -10.0))[2] == 1.0
    zero_amount = with_("customer.avg_amount", 0)
    zero_amount["transaction"]["amount"] = 0
    assert vectorize(zero_amount)[2] == 0.0


def test_every_dimension_is_rounded_to_4_decimals() -> None:
    v = vectorize(with_("terminal.km_from_home", 123.456789))
    assert v[7] == 0.1235
    assert all(round(x, 4) == x for x in v)


def test_custom_constants() -> None:
    c = Constants(max_amount=100.0, mcc_risk={"5411": 0.9})
    v = vectorize(BASE, c)
    assert v[0] == 0.4112
    assert v[12] == 0.9


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("transaction", KeyError, "transaction must be an object"),
        ("transaction.amount", KeyError, "transaction.amount is missing"),
        ("transaction.amount", "41.12", "transaction.amount must be a number"),
        ("transaction.amount", True, "transaction.amount must be a number"),
        ("transaction.amount", float("nan"), "finite"),
        ("transaction.amount", float("inf"), "finite"),
        ("transaction.amount", -1, "must not be negative"),
        ("transaction.requested_at", "yesterday", "not an ISO 8601 timestamp"),
        ("transaction.requested_at", 1710000000, "ISO 8601 timestamp string"),
        ("customer.known_merchants", "MERC-001", "must be an array"),
        ("customer.avg_amount", None, "must be a number"),
        ("merchant.id", 16, "merchant.id must be a string"),
        ("merchant.mcc", None, "merchant.mcc must be a string"),
        ("terminal.is_online", "false", "must be true or false"),
        ("terminal.card_present", 1, "must be true or false"),
        ("last_transaction", [], "must be an object or null"),
        ("last_transaction", {"timestamp": "bad", "km_from_current": 1}, "last_transaction.timestamp"),
        ("last_transaction", {"timestamp": "2026-03-11T18:00:00Z"}, "km_from_current is missing"),
    ],
)
def test_bad_payloads_say_which_field(path: str, value: Any, message: str) -> None:
    with pytest.raises(PayloadError, match=message):
        vectorize(with_(path, value))


def test_payload_must_be_an_object() -> None:
    bads: tuple[object, ...] = ([], "x", 1, None)
    for bad in bads:
        with pytest.raises(PayloadError):
            vectorize(bad)


@pytest.mark.parametrize("stamp", ["9999-12-31T23:00:00-03:00", "0001-01-01T00:00:00+03:00"])
def test_timestamps_past_the_calendar_in_utc_name_the_field(stamp: str) -> None:
    # valid ISO 8601, but their UTC moment is after 9999 or before year 1: no datetime holds it
    with pytest.raises(PayloadError, match=r"transaction\.requested_at is outside the years 1 to 9999"):
        vectorize(with_("transaction.requested_at", stamp))
    last = {"timestamp": stamp, "km_from_current": 1}
    with pytest.raises(PayloadError, match=r"last_transaction\.timestamp is outside the years 1 to 9999"):
        vectorize(with_("last_transaction", last))


def test_timestamps_at_the_calendar_edges_in_utc_are_scored() -> None:
    for stamp in ("9999-12-31T23:59:59Z", "0001-01-01T00:00:00Z", "9999-12-31T23:00:00+03:00"):
        assert len(vectorize(with_("transaction.requested_at", stamp))) == 14
