"""The native fast path against the Python path, which defines every answer.

The fast path may decline anything (the Python path then answers); what it accepts it must
answer exactly as the Python path would.  The HTTP tests run over both paths as well
(conftest.server); these check the parts one by one, on many more inputs.
"""

from __future__ import annotations

import json
import math
import random
import struct
from dataclasses import replace
from typing import Any

import orjson
import pytest

from fraudscore.contract.vectorize import (
    DEFAULT_CONSTANTS,
    NORMALIZATION_KEYS,
    UNKNOWN_MCC_RISK,
    Constants,
    vectorize,
)
from fraudscore.contract.vectorize import round4 as python_round4
from fraudscore.errors import PayloadError
from fraudscore.index.search import Index
from fraudscore.scorer import KnnScorer
from fraudscore.service import responses
from fraudscore.service._fastpath import FastPath, round4
from fraudscore.service.memory import memory_connection
from fraudscore.service.protocol import fast_path
from fraudscore.service.state import ServiceConfig, ServiceState

from .budget import scaled

MAX_BODY = 16384


@pytest.fixture
def fast(index: Index) -> FastPath:
    # per test: a FastPath keeps the native index, and so the session's mapping, alive
    return fast_path(KnnScorer(index), DEFAULT_CONSTANTS, MAX_BODY)


def python_vector(body: bytes, constants: Constants = DEFAULT_CONSTANTS) -> list[float] | None:
    try:
        return vectorize(orjson.loads(body), constants)
    except (orjson.JSONDecodeError, PayloadError):
        return None


def request(body: bytes, head: bytes = b"POST /fraud-score HTTP/1.1\r\nHost: x\r\n") -> bytes:
    return head + b"Content-Length: %d\r\n\r\n" % len(body) + body


def bits(vector: list[float] | None) -> list[bytes] | None:
    """Compare doubles bit for bit (0.0 and -0.0 differ here)."""
    return None if vector is None else [struct.pack("<d", x) for x in vector]


# -- rounding ---------------------------------------------------------------------------------


def test_round4_is_the_python_vectorizers() -> None:
    rng = random.Random(4)
    values = [rng.uniform(-1, 1) for _ in range(100_000)]
    values += [rng.randrange(-20_000, 20_000) / 20_000 for _ in range(50_000)]  # ties and near ties
    values += [(k + 0.5) / 10_000 for k in range(-10_001, 10_001)]  # exact binary ties, e.g. 0.03125
    values += [math.nextafter(x, s) for x in values[-20_002:] for s in (-2.0, 2.0)]
    values += [0.0, -0.0, 1.0, -1.0, 5e-324, 0.99995, 0.00005, 2 / 23, 1 / 3]
    assert [x for x in values if bits([round4(x)]) != bits([python_round4(x)])] == []
    assert [x for x in values if round4(x) != round(x, 4)] == []  # equal, though 0.0 may be -0.0


# -- vectors ------------------------------------------------------------------------------------


def test_every_dev_payload_vectorizes_identically(fast: FastPath, dev_entries: list[dict[str, Any]]) -> None:
    for entry in dev_entries[: scaled(len(dev_entries), 1000)]:
        for body in (orjson.dumps(entry["request"]), json.dumps(entry["request"], indent=2).encode()):
            native = fast.vectorize(body)
            assert native is not None, body
            assert bits(native) == bits(python_vector(body)), body


def test_constants_are_the_services(index: Index, example_payloads: list[dict[str, Any]]) -> None:
    constants = Constants(
        max_amount=5000.0, max_km=250.0, max_minutes=60.0, mcc_risk={"5411": 0.9, "9999": 0.05}
    )
    native = fast_path(KnnScorer(index), constants, MAX_BODY)
    for payload in example_payloads:
        body = orjson.dumps(payload)
        assert bits(native.vectorize(body)) == bits(python_vector(body, constants))


def _leaf_paths(obj: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if isinstance(obj, dict):
        return [path] + [p for key, value in obj.items() for p in _leaf_paths(value, (*path, key))]
    return [path]


_ODD_VALUES: list[Any] = [
    None, True, False, 0, -1, -0.0, 0.5, 1e308, 10**30, 2**64, "", "x", "5411", [], {}, {"a": [1, {}]},
    ["MERC-001", 7], "2026-03-11T18:45:53", "2024-02-29T23:59:59Z", "2026-02-29T00:00:00Z",
    "2026-03-11 18:45:53Z", "2026-03-11T18:45:53+00:00", "2026-03-11T18:45:53-03:00",
    "2026-03-11T18:45:53.250Z", "0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z", "0000-01-01T00:00:00Z",
    "2026-13-01T00:00:00Z", "2026-03-11T24:00:00Z", "2026-03-11T18:60:00Z", "2026-03-11T18:45:60Z",
    "MERC-é", "MERC\u0000", "mcc\t", 1e-320, -1e-320, 123456789.123456789,
]  # fmt: skip

# raw JSON number texts, valid and not
_NUMBER_TEXTS = [
    b"0", b"-0", b"-0.0", b"1E2", b"1e-2", b"2.5e+1", b"0.10", b"00", b"01", b"1.", b".5", b"+1", b"1e",
    b"-", b"1e400", b"-1e400", b"1e-400", b"123456789012345678901234567890", b"0.000050000000000000001",
    b"Infinity", b"NaN", b"0x10", b"1_000",
]  # fmt: skip


def _mutations(payload: dict[str, Any], rng: random.Random) -> list[bytes]:
    """Structural and textual changes of one payload, from the ordinary to the broken."""
    out: list[bytes] = []
    leaves = [p for p in _leaf_paths(payload) if p]
    for _ in range(6):
        copy = json.loads(json.dumps(payload))
        path = rng.choice(leaves)
        parent = copy
        for key in path[:-1]:
            parent = parent[key]
        action = rng.random()
        if action < 0.25:
            del parent[path[-1]]
        elif action < 0.8:
            parent[path[-1]] = rng.choice(_ODD_VALUES)
        else:
            parent["extra_" + str(rng.randrange(3))] = rng.choice(_ODD_VALUES)
        out.append(json.dumps(copy, ensure_ascii=rng.random() < 0.5).encode())
    body = orjson.dumps(payload)
    for _ in range(4):  # a number's text replaced
        for name in (b'"amount":', b'"km_from_home":', b'"tx_count_24h":'):
            start = body.find(name) + len(name)
            end = min(i for i in (body.find(b",", start), body.find(b"}", start)) if i >= 0)
            out.append(body[:start] + rng.choice(_NUMBER_TEXTS) + body[end:])
    for _ in range(6):  # bytes flipped, dropped or doubled
        i = rng.randrange(len(body))
        choice = rng.random()
        if choice < 0.4:
            out.append(body[:i] + bytes([rng.randrange(256)]) + body[i + 1 :])
        elif choice < 0.7:
            out.append(body[:i] + body[i + 1 :])
        else:
            out.append(body[:i] + body[i : i + 8] + body[i:])
    # a member twice, an escape where a plain string was, a trailing comma, trailing bytes
    out.append(body.replace(b'"merchant":', b'"merchant":{"id":"x"},"merchant":', 1))
    out.append(body.replace(b'"amount":', b'"amount":1,"amount":', 1))
    out.append(body.replace(b'"MERC-', b'"\\u004dERC-', 1))
    out.append(body.replace(b"]", b",]", 1))
    out.append(body + b" ")
    out.append(body + b"{}")
    out.append(b"[" + body + b"]")
    return out


def test_mutated_payloads_are_declined_or_answered_alike(
    fast: FastPath, dev_entries: list[dict[str, Any]]
) -> None:
    rng = random.Random(7)
    accepted = declined = 0
    for entry in rng.sample(dev_entries, scaled(1500, 150)):
        for body in _mutations(entry["request"], rng):
            native = fast.vectorize(body)
            if native is None:
                declined += 1
                continue
            accepted += 1
            assert bits(native) == bits(python_vector(body)), body
    # both outcomes well represented: the check above is not vacuous, nor is declining
    assert min(accepted, declined) > scaled(10_000, 1_000), (accepted, declined)


# -- requests -----------------------------------------------------------------------------------


def test_answers_are_the_python_paths(
    fast: FastPath, index: Index, dev_entries: list[dict[str, Any]]
) -> None:
    for entry in dev_entries[: scaled(3000, 300)]:
        body = json.dumps(entry["request"]).encode()
        vector = python_vector(body)
        assert vector is not None
        assert fast.answer(request(body)) is responses.SCORES[index.fraud_count(vector)]


@pytest.mark.parametrize(
    "head",
    [
        b"POST /fraud-score HTTP/1.1\r\n",
        b"POST /fraud-score HTTP/1.1\r\nhost: x\r\nCONNECTION: Keep-Alive\r\ncontent-type:text/json\r\n",
        b"POST /fraud-score HTTP/1.1\r\nUser-Agent: k6/1.0 (https://k6.io/)\r\nX-Empty:\r\nX-Tab:\ta\tb \r\n",
    ],
)
def test_ordinary_requests_are_answered(
    fast: FastPath, example_payloads: list[dict[str, Any]], head: bytes
) -> None:
    assert fast.answer(request(orjson.dumps(example_payloads[0]), head)) in responses.SCORES


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"POST /fraud-score HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{",  # body still coming
        b"POST /fraud-score HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}{",  # more than one request
        b"POST /fraud-score HTTP/1.1\r\nHost: x\r\n",  # headers still coming
        b"GET /ready HTTP/1.1\r\n\r\n",
    ],
)
def test_partial_and_other_requests_are_declined(fast: FastPath, data: bytes) -> None:
    assert fast.answer(data) is None


@pytest.mark.parametrize(
    "head",
    [
        b"POST /fraud-score HTTP/1.0\r\n",
        b"POST /fraud-score?x=1 HTTP/1.1\r\n",
        b"post /fraud-score HTTP/1.1\r\n",
        b"PUT /fraud-score HTTP/1.1\r\n",
        b"POST /fraud-score HTTP/1.1\r\nConnection: close\r\n",
        b"POST /fraud-score HTTP/1.1\r\nConnection: keep-alive, Upgrade\r\n",
        b"POST /fraud-score HTTP/1.1\r\nTransfer-Encoding: chunked\r\n",
        b"POST /fraud-score HTTP/1.1\r\nExpect: 100-continue\r\n",
        b"POST /fraud-score HTTP/1.1\r\nUpgrade: h2c\r\n",
        b"POST /fraud-score HTTP/1.1\r\nContent-Length: 1\r\n",  # two lengths
        b"POST /fraud-score HTTP/1.1\r\nX-Folded: a\r\n b\r\n",
        b"POST /fraud-score HTTP/1.1\r\nX-Latin: caf\xe9\r\n",
        b"POST /fraud-score HTTP/1.1\r\nBad Name: x\r\n",
        b"POST /fraud-score HTTP/1.1\r\nX-Bare-LF: x\n",
        b"POST /fraud-score HTTP/1.1\r\n: empty name\r\n",
    ],
)
def test_unusual_requests_are_declined(
    fast: FastPath, example_payloads: list[dict[str, Any]], head: bytes
) -> None:
    assert fast.answer(request(orjson.dumps(example_payloads[0]), head)) is None


def test_bodies_over_the_limit_and_bad_lengths_are_declined(
    fast: FastPath, example_payloads: list[dict[str, Any]]
) -> None:
    body = orjson.dumps(example_payloads[0])
    head = b"POST /fraud-score HTTP/1.1\r\n"
    assert fast.answer(request(body + b" " * (MAX_BODY - len(body)), head)) is not None
    assert fast.answer(request(body + b" " * (MAX_BODY + 1 - len(body)), head)) is None
    for length in (
        b"",
        b"-1",
        b"+5",
        b"1e3",
        b"0x10",
        b"9999999999",
        b"0" + str(len(body)).encode(),
        str(len(body) + 1).encode(),
    ):
        assert fast.answer(head + b"Content-Length: " + length + b"\r\n\r\n" + body) is None


def test_counts_what_it_answered_and_declined(index: Index, example_payloads: list[dict[str, Any]]) -> None:
    native = fast_path(KnnScorer(index), DEFAULT_CONSTANTS, MAX_BODY)
    native.answer(request(orjson.dumps(example_payloads[0])))
    native.answer(b"GET /ready HTTP/1.1\r\n\r\n")
    native.answer(b"GET /ready HTTP/1.1\r\n\r\n")
    assert (native.answered, native.declined) == (1, 2)


DIVISORS = {key: getattr(DEFAULT_CONSTANTS, key) for key in NORMALIZATION_KEYS}


def construct(index: Index, **change: Any) -> FastPath:
    """A FastPath with the service's arguments, some changed."""
    args: dict[str, Any] = {
        "divisors": DIVISORS,
        "mcc_risk": {},
        "unknown_mcc_risk": UNKNOWN_MCC_RISK,
        "answers": responses.SCORES,
        "max_body": 10,
    }
    return FastPath(index.native, **{**args, **change})


def test_bad_construction_is_refused(index: Index) -> None:
    with pytest.raises(TypeError):
        FastPath("not an index", DIVISORS, {}, 0.5, responses.SCORES, 10)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="dict"):
        construct(index, divisors=list(DIVISORS.values()))
    with pytest.raises(ValueError, match="7 divisors"):
        construct(index, divisors={k: v for k, v in DIVISORS.items() if k != "max_km"})
    with pytest.raises(ValueError, match="7 divisors"):
        construct(index, divisors={**DIVISORS, "max_speed": 1.0})
    with pytest.raises(ValueError, match="has no max_km"):
        construct(index, divisors={**{k: v for k, v in DIVISORS.items() if k != "max_km"}, "max_kms": 1.0})
    with pytest.raises(ValueError, match="divisor max_minutes must be a positive number"):
        construct(index, divisors={**DIVISORS, "max_minutes": 0.0})
    with pytest.raises(ValueError, match="unknown_mcc_risk"):
        construct(index, unknown_mcc_risk=math.nan)
    for answers in (responses.SCORES[:5], (*responses.SCORES, b"x"), ()):
        with pytest.raises(ValueError, match="tuple of 6 bytes"):
            construct(index, answers=answers)
    with pytest.raises(TypeError, match="keys must be strings"):
        construct(index, mcc_risk={5411: 0.1})
    with pytest.raises(TypeError):
        construct(index).answer("text")  # type: ignore[arg-type]


def test_constants_come_from_the_constructor(index: Index, example_payloads: list[dict[str, Any]]) -> None:
    """The unknown-MCC risk, the divisors (by name, in any order) and the answers are the caller's."""
    payload = json.loads(json.dumps(example_payloads[0]))
    payload["merchant"]["mcc"] = "0000"  # in no table
    body = orjson.dumps(payload)
    vector = construct(index, unknown_mcc_risk=0.25).vectorize(body)
    assert vector is not None and vector[12] == 0.25
    assert construct(index).vectorize(body) == python_vector(body)  # the service's: 0.5
    reordered = dict(reversed(DIVISORS.items()))
    assert bits(construct(index, divisors=reordered).vectorize(body)) == bits(python_vector(body))
    halved = construct(index, divisors={**DIVISORS, "max_amount": DIVISORS["max_amount"] / 2}).vectorize(body)
    assert halved is not None and halved[0] == round(min(1.0, payload["transaction"]["amount"] / 5000), 4)
    answers = tuple(b"answer %d" % n for n in range(6))
    native = construct(index, answers=answers, max_body=MAX_BODY)
    vector = python_vector(body)
    assert vector is not None
    assert native.answer(request(body)) == answers[index.fraud_count(vector)]


def test_a_request_over_the_head_limits_is_declined(
    index: Index, example_payloads: list[dict[str, Any]]
) -> None:
    """Around the header limits, with blanks around values: whatever the Python path refuses
    (431, or 414 for a URL limit shorter than the path) the fast path declines, and what it answers
    is the Python path's answer."""
    config = ServiceConfig(
        index_path=index.path,
        port=9999,
        max_body_bytes=MAX_BODY,
        max_url_bytes=64,
        max_header_bytes=160,
        max_headers=6,
    )
    state = ServiceState(config=config, scorer=KnnScorer(index), constants=DEFAULT_CONSTANTS, ready=True)
    body = orjson.dumps(example_payloads[0])
    checked = {"declined": 0, "answered": 0}
    for max_url in (64, 11, 12):
        native = fast_path(
            KnnScorer(index),
            DEFAULT_CONSTANTS,
            MAX_BODY,
            max_url_bytes=max_url,
            max_headers=config.max_headers,
            max_header_bytes=config.max_header_bytes,
        )
        for count in range(3, 9):
            for size in range(0, 60, 3):
                for blank in (b"", b"  ", b" \t"):
                    head = b"POST /fraud-score HTTP/1.1\r\nHost: x\r\n"
                    head += b"".join(
                        b"X-%d:%s%s%s\r\n" % (i, blank, b"v" * size, blank) for i in range(count - 2)
                    )
                    data = request(body, head)
                    conn, transport = memory_connection(
                        ServiceState(
                            config=replace(config, max_url_bytes=max_url),
                            scorer=state.scorer,
                            constants=DEFAULT_CONSTANTS,
                            ready=True,
                        )
                    )
                    conn.data_received(data)
                    python = transport.output()
                    answer = native.answer(data)
                    if answer is None:
                        checked["declined"] += 1
                    else:
                        checked["answered"] += 1
                        assert answer == python, (count, size, blank, max_url)
                    checked[python[:12].decode()] = checked.get(python[:12].decode(), 0) + 1
                    if not python.startswith(b"HTTP/1.1 200"):
                        assert answer is None, (count, size, blank, max_url, python)
    assert checked["declined"] > 0 and checked["answered"] > 0, checked
    assert checked["HTTP/1.1 431"] > 0 and checked["HTTP/1.1 414"] > 0, checked
