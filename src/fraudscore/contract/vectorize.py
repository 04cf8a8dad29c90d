"""A transaction payload as the contract's 14-dimension vector.

The dimensions, in order (clamp is to [0, 1]; the divisors come from ``normalization.json``)::

    0  clamp(amount / max_amount)                 7  clamp(km_from_home / max_km)
    1  clamp(installments / max_installments)     8  clamp(tx_count_24h / max_tx_count_24h)
    2  clamp(amount / avg_amount / ratio)         9  is_online, 1 or 0
    3  hour of requested_at, UTC, / 23           10  card_present, 1 or 0
    4  weekday (Monday 0) / 6                     11  1 if merchant.id not in known_merchants
    5  clamp(minutes since last tx / max_minutes) 12  mcc_risk[mcc], 0.5 when the code is unknown
    6  clamp(km_from_current / max_km)            13  clamp(merchant avg_amount / max_merchant_avg_amount)

5 and 6 are -1 when ``last_transaction`` is null (or absent).  Every dimension is then
rounded to 4 decimals, the precision of the references: the contract's expected answers
are the brute force on that rounded vector (all 20,000 dev payloads agree with it; on the
unrounded vector one of them does not).  Odd but valid values have a
fixed answer: ``avg_amount`` <= 0 makes dimension 2 equal 1 when the amount is positive
(the ratio is unbounded) and 0 when it is zero; a last transaction later than this one is
0 minutes ago; a timestamp without a zone is read as UTC.

This module defines the vector.  The service's native fast path (``service/_fastpath.c``)
computes the same for payloads of the ordinary shape and declines the rest; a change here
needs the same change there, and tests/test_fastpath.py fails until both agree bit for bit.

>>> payload = {
...     "transaction": {"amount": 41.12, "installments": 2, "requested_at": "2026-03-11T18:45:53Z"},
...     "customer": {"avg_amount": 82.24, "tx_count_24h": 3, "known_merchants": ["MERC-003", "MERC-016"]},
...     "merchant": {"id": "MERC-016", "mcc": "5411", "avg_amount": 60.25},
...     "terminal": {"is_online": False, "card_present": True, "km_from_home": 29.2331036248},
...     "last_transaction": None,
... }
>>> vectorize(payload)
[0.0041, 0.1667, 0.05, 0.7826, 0.3333, -1.0, -1.0, 0.0292, 0.15, 0.0, 1.0, 0.0, 0.15, 0.006]
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

from fraudscore.errors import DataFileError, PayloadError

UNKNOWN_MCC_RISK = 0.5
FEATURES = (
    "amount",
    "installments",
    "amount_vs_avg",
    "hour",
    "weekday",
    "minutes_since_last_tx",
    "km_from_last_tx",
    "km_from_home",
    "tx_count_24h",
    "is_online",
    "card_present",
    "unknown_merchant",
    "mcc_risk",
    "merchant_avg_amount",
)
"""The names of the vector's dimensions, in order (the table above): for models and their reasons."""
NORMALIZATION_KEYS = (
    "max_amount",
    "max_installments",
    "amount_vs_avg_ratio",
    "max_minutes",
    "max_km",
    "max_tx_count_24h",
    "max_merchant_avg_amount",
)


def _read_json(path: Path | None, bundled: str) -> Any:
    try:
        if path is None:
            return json.loads(resources.files("fraudscore.contract").joinpath(bundled).read_text())
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise DataFileError(f"cannot read {path or bundled}: {exc}") from exc


@dataclass(frozen=True)
class Constants:
    """The contract's constants: the normalization divisors and the risk of each MCC."""

    max_amount: float = 10000.0
    max_installments: float = 12.0
    amount_vs_avg_ratio: float = 10.0
    max_minutes: float = 1440.0
    max_km: float = 1000.0
    max_tx_count_24h: float = 20.0
    max_merchant_avg_amount: float = 10000.0
    mcc_risk: dict[str, float] = field(default_factory=dict)

    @classmethod
    def load(cls, normalization: Path | None = None, mcc_risk: Path | None = None) -> Constants:
        """Read ``normalization.json`` and ``mcc_risk.json``; ``None`` means the copies bundled here."""
        norm_name, risk_name = str(normalization or "normalization.json"), str(mcc_risk or "mcc_risk.json")
        norm = _read_json(normalization, "normalization.json")
        risk = _read_json(mcc_risk, "mcc_risk.json")
        for name, document in ((norm_name, norm), (risk_name, risk)):
            if not isinstance(document, dict):
                raise DataFileError(f"{name}: must hold a JSON object")
        missing = [key for key in NORMALIZATION_KEYS if key not in norm]
        if missing:
            raise DataFileError(f"{norm_name}: {', '.join(missing)} missing")
        values = {key: _constant(norm[key], f"{norm_name}: {key}") for key in NORMALIZATION_KEYS}
        risks = {str(code): _constant(value, f"{risk_name}: MCC {code}") for code, value in risk.items()}
        for key, value in values.items():
            if not value > 0 or math.isinf(value):
                raise DataFileError(f"{norm_name}: {key} must be a positive number, got {value}")
        return cls(**values, mcc_risk=risks)


def _constant(value: Any, where: str) -> float:
    """A constant from a JSON file: a number (not a boolean, not a string of one)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DataFileError(f"{where} must be a number, got {value!r}")
    return float(value)


DEFAULT_CONSTANTS = Constants.load()


def round4(x: float) -> float:
    """``round(x, 4)``, without its trip through decimal strings (the costliest step of vectorizing).

    k / 10000 is the double nearest the decimal k/10^4, which is what ``round`` returns; only
    when x * 10^4 lies next to a .5 tie could the two pick different k, and then ``round`` decides.

    >>> all(round4(x) == round(x, 4) for x in (0.00005, 0.12345, 0.3333333, 2 / 23, 0.99995, -1.0))
    True
    """
    scaled = x * 10000.0
    k = math.floor(scaled + 0.5)
    if abs(scaled - k) > 0.4999:
        return round(x, 4)
    return k / 10000.0


def _clamp(x: float) -> float:
    return 0.0 if x < 0.0 else 1.0 if x > 1.0 else x


def _object(parent: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = parent.get(key)
    if not isinstance(value, dict):
        raise PayloadError(f"{where}{key} must be an object")
    return value


def _number(obj: dict[str, Any], key: str, where: str) -> float:
    value = obj.get(key)
    # bool is an int subclass; true is not a number here
    if type(value) is float:
        if math.isfinite(value):
            return value
        raise PayloadError(f"{where}.{key} must be a finite number")
    if type(value) is int:
        return float(value)
    if value is None and key not in obj:
        raise PayloadError(f"{where}.{key} is missing")
    raise PayloadError(f"{where}.{key} must be a number")


def _non_negative(obj: dict[str, Any], key: str, where: str) -> float:
    value = _number(obj, key, where)
    if value < 0:
        raise PayloadError(f"{where}.{key} must not be negative")
    return value


def _bool(obj: dict[str, Any], key: str, where: str) -> float:
    value = obj.get(key)
    if value is True:
        return 1.0
    if value is False:
        return 0.0
    raise PayloadError(f"{where}.{key} must be true or false")


def _string(obj: dict[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if isinstance(value, str):
        return value
    raise PayloadError(f"{where}.{key} must be a string")


def parse_timestamp(value: Any, where: str) -> datetime:
    """An ISO 8601 timestamp as an aware UTC datetime; one without a zone is taken as UTC.

    >>> parse_timestamp("2026-03-11T18:45:53-03:00", "x").hour
    21
    """
    if not isinstance(value, str):
        raise PayloadError(f"{where} must be an ISO 8601 timestamp string")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise PayloadError(f"{where} is not an ISO 8601 timestamp: {value[:40]!r}") from None
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC)
    except OverflowError:  # a moment that is in UTC before year 1 or after year 9999
        raise PayloadError(f"{where} is outside the years 1 to 9999 in UTC: {value[:40]!r}") from None


def vectorize(payload: Any, constants: Constants = DEFAULT_CONSTANTS) -> list[float]:
    """The 14-dimension vector of one payload (a decoded JSON object); raises PayloadError."""
    if not isinstance(payload, dict):
        raise PayloadError("the payload must be a JSON object")
    c = constants
    tx = _object(payload, "transaction", "")
    customer = _object(payload, "customer", "")
    merchant = _object(payload, "merchant", "")
    terminal = _object(payload, "terminal", "")
    last = payload.get("last_transaction")

    amount = _non_negative(tx, "amount", "transaction")
    installments = _non_negative(tx, "installments", "transaction")
    now = parse_timestamp(tx.get("requested_at"), "transaction.requested_at")

    avg_amount = _number(customer, "avg_amount", "customer")
    tx_count = _non_negative(customer, "tx_count_24h", "customer")
    known = customer.get("known_merchants")
    if not isinstance(known, list):
        raise PayloadError("customer.known_merchants must be an array")

    merchant_id = _string(merchant, "id", "merchant")
    mcc = merchant.get("mcc")
    if not isinstance(mcc, str | int) or isinstance(mcc, bool):
        raise PayloadError("merchant.mcc must be a string")
    merchant_avg = _non_negative(merchant, "avg_amount", "merchant")

    is_online = _bool(terminal, "is_online", "terminal")
    card_present = _bool(terminal, "card_present", "terminal")
    km_home = _non_negative(terminal, "km_from_home", "terminal")

    if last is None:
        minutes_dim = km_last_dim = -1.0
    elif isinstance(last, dict):
        then = parse_timestamp(last.get("timestamp"), "last_transaction.timestamp")
        minutes = (now - then).total_seconds() / 60.0
        minutes_dim = _clamp(minutes / c.max_minutes)
        km_last_dim = _clamp(_non_negative(last, "km_from_current", "last_transaction") / c.max_km)
    else:
        raise PayloadError("last_transaction must be an object or null")

    if avg_amount > 0:
        ratio_dim = _clamp((amount / avg_amount) / c.amount_vs_avg_ratio)
    else:
        ratio_dim = 1.0 if amount > 0 else 0.0

    return [
        round4(x)
        for x in (
            _clamp(amount / c.max_amount),
            _clamp(installments / c.max_installments),
            ratio_dim,
            now.hour / 23.0,
            now.weekday() / 6.0,
            minutes_dim,
            km_last_dim,
            _clamp(km_home / c.max_km),
            _clamp(tx_count / c.max_tx_count_24h),
            is_online,
            card_present,
            0.0 if merchant_id in known else 1.0,
            c.mcc_risk.get(str(mcc), UNKNOWN_MCC_RISK),
            _clamp(merchant_avg / c.max_merchant_avg_amount),
        )
    ]
