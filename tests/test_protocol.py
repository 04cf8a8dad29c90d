"""One connection's protocol in process: ``HttpConnection`` over an in-memory transport.

No sockets and no subprocess: bytes go to ``data_received`` as the event loop would hand them over
(whole, split anywhere, a byte at a time, many requests at once) and the answers are read back
from the transport.  Deadlines are driven by calling ``check_deadlines`` with a chosen time.
The real-socket tests (test_http.py) check the same behaviours end to end.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from fraudscore.contract.vectorize import DEFAULT_CONSTANTS, vectorize
from fraudscore.scorer import KnnScorer
from fraudscore.service import responses
from fraudscore.service.memory import MemoryTransport, memory_connection
from fraudscore.service.protocol import HEAD_SLACK_BYTES, LINGER_SECONDS, HttpConnection, fast_path
from fraudscore.service.state import ServiceConfig, ServiceState

# small limits, so that crossing them takes few bytes
LIMITS = {"max_url_bytes": 64, "max_header_bytes": 512, "max_headers": 10, "max_body_bytes": 4096}
BUDGET = LIMITS["max_url_bytes"] + LIMITS["max_header_bytes"] + HEAD_SLACK_BYTES


def in_loop(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test in a fresh event loop: an error answer's linger is a loop timer."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


@pytest.fixture(scope="module")
def scorer(index_path: Path) -> Iterator[KnnScorer]:
    with KnnScorer.open(index_path) as s:
        yield s


@pytest.fixture(scope="module")
def payloads(example_payloads: list[dict[str, Any]]) -> list[bytes]:
    return [json.dumps(p, separators=(",", ":")).encode() for p in example_payloads]


class Client:
    """One connection of a service with the test limits, and what it has written."""

    def __init__(self, scorer: KnnScorer, *, fast: bool = False, **settings: Any) -> None:
        config = ServiceConfig(index_path=scorer.index.path, port=9999, **{**LIMITS, **settings})
        self.state = ServiceState(config=config, scorer=scorer, constants=DEFAULT_CONSTANTS, ready=True)
        if fast:
            self.state.fast = fast_path(
                scorer,
                DEFAULT_CONSTANTS,
                config.max_body_bytes,
                max_url_bytes=config.max_url_bytes,
                max_headers=config.max_headers,
                max_header_bytes=config.max_header_bytes,
            )
        self.conn: HttpConnection
        self.transport: MemoryTransport
        self.conn, self.transport = memory_connection(self.state)

    def send(self, *reads: bytes) -> bytes:
        """Feed each read in turn; everything written in answer to them."""
        before = len(self.transport.writes)
        for data in reads:
            self.conn.data_received(data)
        return b"".join(self.transport.writes[before:])

    @property
    def open(self) -> bool:
        return not self.transport.closed and not self.transport.eof_written


def scoring(body: bytes, extra: bytes = b"") -> bytes:
    return b"POST /fraud-score HTTP/1.1\r\nHost: t\r\n%sContent-Length: %d\r\n\r\n%s" % (
        extra,
        len(body),
        body,
    )


def expected(scorer: KnnScorer, body: bytes) -> bytes:
    return responses.SCORES[scorer.fraud_count(vectorize(json.loads(body)))]


def answers(stream: bytes) -> list[bytes]:
    """The responses in a stream of them, split by their Content-Length."""
    out = []
    while stream:
        head, _, rest = stream.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        out.append(head + b"\r\n\r\n" + rest[:length])
        stream = rest[length:]
    return out


def error_of(answer: bytes) -> str:
    message: str = json.loads(answer.partition(b"\r\n\r\n")[2])["error"]
    return message


# -- keep-alive, pipelining, split reads ---------------------------------------------------------


@pytest.mark.parametrize("fast", [True, False], ids=["fast path", "python path"])
def test_keep_alive_answers_request_after_request(
    scorer: KnnScorer, payloads: list[bytes], fast: bool
) -> None:
    client = Client(scorer, fast=fast)
    for body in payloads:
        assert client.send(scoring(body)) == expected(scorer, body)
    assert client.open
    assert client.state.fast is None or client.state.fast.answered == len(payloads)


def test_pipelined_requests_are_answered_in_order(scorer: KnnScorer, payloads: list[bytes]) -> None:
    client = Client(scorer, fast=True)
    stream = (
        b"".join(scoring(b) for b in payloads[:4]) + b"GET /ready HTTP/1.1\r\n\r\n" + scoring(payloads[4])
    )
    out = answers(client.send(stream))
    assert out == [
        *(expected(scorer, b) for b in payloads[:4]),
        responses.READY,
        expected(scorer, payloads[4]),
    ]
    assert client.open


@pytest.mark.parametrize("fast", [True, False], ids=["fast path", "python path"])
def test_a_request_a_byte_at_a_time(scorer: KnnScorer, payloads: list[bytes], fast: bool) -> None:
    client = Client(scorer, fast=fast)
    request = scoring(payloads[1])
    out = client.send(*(request[i : i + 1] for i in range(len(request))))
    assert out == expected(scorer, payloads[1])
    assert client.send(request) == out  # and the connection goes on


def test_two_requests_split_at_every_byte(scorer: KnnScorer, payloads: list[bytes]) -> None:
    stream = scoring(payloads[0]) + scoring(payloads[2])
    want = [expected(scorer, payloads[0]), expected(scorer, payloads[2])]
    client = Client(scorer, fast=True)
    for cut in range(1, len(stream)):
        assert answers(client.send(stream[:cut], stream[cut:])) == want, cut
    assert client.open


def test_many_pipelined_requests_in_reads_cut_mid_head_are_not_refused(scorer: KnnScorer) -> None:
    # reads that begin and end inside heads, each holding more bytes than a head may take: only
    # the bytes of one request's head count against its limits
    request = b"GET /ready?" + b"q" * 50 + b" HTTP/1.1\r\n" + b"X-Pad: " + b"p" * 400 + b"\r\n\r\n"
    stream = request * 40
    read = BUDGET + 777
    assert len(request) < read
    client = Client(scorer)
    out = client.send(*(stream[i : i + read] for i in range(0, len(stream), read)))
    assert answers(out) == [responses.READY] * 40


# -- limits ----------------------------------------------------------------------------------------


@in_loop
async def test_url_over_the_limit_byte_by_byte_gets_414(scorer: KnnScorer) -> None:
    client = Client(scorer)
    url = b"/ready?" + b"a" * 57  # 64 bytes: at the limit
    assert client.send(*(bytes([c]) for c in b"GET " + url)) == b""
    out = client.send(b"a")
    assert out.startswith(b"HTTP/1.1 414 URI Too Long\r\n")
    assert b"Connection: close" in out
    assert error_of(out) == "the URL is longer than 64 bytes"
    assert client.transport.eof_written and not client.transport.closed  # lingering
    assert client.send(b"a" * 10000) == b""  # what still arrives is discarded


@in_loop
async def test_a_refused_connection_closes_after_lingering(scorer: KnnScorer) -> None:
    client = Client(scorer)
    client.send(b"GET /" + b"a" * 100)
    assert client.transport.eof_written and not client.transport.closed
    await asyncio.sleep(LINGER_SECONDS + 0.2)
    assert client.transport.closed


@in_loop
async def test_too_many_headers_get_431(scorer: KnnScorer) -> None:
    client = Client(scorer)
    ten = b"".join(b"X-%d: a\r\n" % i for i in range(10))
    assert answers(client.send(b"GET /ready HTTP/1.1\r\n" + ten + b"\r\n")) == [responses.READY]
    out = client.send(b"GET /ready HTTP/1.1\r\n" + ten + b"X-10: a\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert error_of(out) == "more than 10 header fields"
    assert client.transport.eof_written


@in_loop
async def test_header_section_over_the_limit_gets_431(scorer: KnnScorer) -> None:
    client = Client(scorer)
    fits = b"X-A: " + b"a" * (512 - 4 - 3) + b"\r\n"  # name + value + 4 = 512
    assert answers(client.send(b"GET /ready HTTP/1.1\r\n" + fits + b"\r\n")) == [responses.READY]
    out = client.send(b"GET /ready HTTP/1.1\r\n" + fits.replace(b": ", b": a") + b"\r\n")
    assert out.startswith(b"HTTP/1.1 431")
    assert error_of(out) == "the header section is larger than 512 bytes"


@pytest.mark.parametrize("fast", [True, False], ids=["fast path", "python path"])
@pytest.mark.parametrize("piece", [1, 100, 5000])
@in_loop
async def test_a_header_that_never_ends_reaches_the_limit(scorer: KnnScorer, fast: bool, piece: int) -> None:
    # httptools keeps an unfinished header to itself: the reads are what is counted
    client = Client(scorer, fast=fast)
    client.send(b"POST /fraud-score HTTP/1.1\r\nX-Endless: ")
    fed = 0
    while not client.transport.writes:
        client.send(b"a" * piece)
        fed += piece
        assert fed <= BUDGET + piece, "the head grew past its budget"
    assert fed > LIMITS["max_header_bytes"]
    assert bytes(client.transport.last).startswith(b"HTTP/1.1 431")
    assert client.transport.eof_written


@in_loop
async def test_a_url_that_never_ends_in_big_reads_gets_414(scorer: KnnScorer) -> None:
    client = Client(scorer)
    out = client.send(b"GET /ready?", *(b"a" * 65536 for _ in range(3)))
    assert out.startswith(b"HTTP/1.1 414")


def test_a_chunked_body_of_tiny_chunks_is_not_a_large_head(scorer: KnnScorer, payloads: list[bytes]) -> None:
    # each chunk's size line and CRLFs are framing, not head: they do not count as header bytes
    body = payloads[3]
    chunks = b"".join(b"1\r\n%s\r\n" % body[i : i + 1] for i in range(len(body))) + b"0\r\n\r\n"
    assert len(chunks) > BUDGET
    request = b"POST /fraud-score HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks
    client = Client(scorer)
    assert client.send(*(request[i : i + 50] for i in range(0, len(request), 50))) == expected(scorer, body)


@in_loop
async def test_body_over_the_limit_gets_413(scorer: KnnScorer) -> None:
    client = Client(scorer)
    out = client.send(b"POST /fraud-score HTTP/1.1\r\nContent-Length: 5000\r\n\r\n", b"x" * 5000)
    assert out == responses.TOO_LARGE


# -- deadlines -------------------------------------------------------------------------------------


@in_loop
async def test_a_request_not_finished_in_time_gets_408(scorer: KnnScorer) -> None:
    client = Client(scorer, request_timeout=2.0)
    client.send(b"POST /fraud-score HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
    now = time.monotonic()
    client.conn.check_deadlines(now + 1.0)
    assert client.transport.writes == []
    client.conn.check_deadlines(now + 2.5)
    assert client.transport.last == responses.TIMEOUT
    assert client.transport.eof_written


def test_an_idle_connection_is_closed_in_silence(scorer: KnnScorer) -> None:
    client = Client(scorer, request_timeout=2.0, idle_timeout=10.0)
    assert client.send(b"GET /ready HTTP/1.1\r\n\r\n") == responses.READY
    now = time.monotonic()
    client.conn.check_deadlines(now + 5.0)  # past the request timeout, but no request is open
    assert client.open
    client.conn.check_deadlines(now + 11.0)
    assert client.transport.closed
    assert client.transport.writes == [responses.READY]


# -- HEAD, Expect, closing -------------------------------------------------------------------------


def test_head_gets_the_head_of_get(scorer: KnnScorer) -> None:
    client = Client(scorer)
    out = client.send(b"HEAD /ready HTTP/1.1\r\n\r\n")
    assert out == responses.READY[: responses.READY.index(b"\r\n\r\n") + 4]
    assert b"Content-Length: 18\r\n" in out
    out = client.send(b"HEAD /fraud-score HTTP/1.1\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 405") and out.endswith(b"\r\n\r\n")
    assert client.send(b"GET /ready HTTP/1.1\r\n\r\n") == responses.READY


@pytest.mark.parametrize("fast", [True, False], ids=["fast path", "python path"])
def test_expect_100_continue(scorer: KnnScorer, payloads: list[bytes], fast: bool) -> None:
    client = Client(scorer, fast=fast)
    request = scoring(payloads[0], b"Expect: 100-Continue\r\n")
    head, body = request[: request.index(b"\r\n\r\n") + 4], payloads[0]
    assert client.send(head) == responses.CONTINUE
    assert client.send(body[:10], body[10:]) == expected(scorer, body)
    # the body already here, or partly here: no invitation needed
    assert client.send(request) == expected(scorer, body)
    assert client.send(head + body[:5], body[5:]) == expected(scorer, body)
    # HTTP/1.0 clients get no 100 (RFC 9110 10.1.1)
    assert client.send(head.replace(b"HTTP/1.1", b"HTTP/1.0")) == b""


@in_loop
async def test_other_expectations_get_417(scorer: KnnScorer, payloads: list[bytes]) -> None:
    client = Client(scorer)
    out = client.send(scoring(payloads[0], b"Expect: 200-ok\r\n"))
    assert out.startswith(b"HTTP/1.1 417 Expectation Failed")
    assert client.transport.eof_written


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /ready HTTP/1.1\r\nConnection: close\r\n\r\n",
        b"GET /ready HTTP/1.0\r\n\r\n",
    ],
)
def test_connection_closes_when_asked(scorer: KnnScorer, request_bytes: bytes) -> None:
    client = Client(scorer)
    assert client.send(request_bytes) == responses.READY
    assert client.transport.closed


def test_draining_closes_after_the_answer(scorer: KnnScorer) -> None:
    client = Client(scorer)
    client.send(b"GET /ready HTTP/1.1\r\n")
    client.state.draining = True
    client.conn.shutdown()  # a request is open: it is finished first
    assert not client.transport.closed
    assert client.send(b"\r\n") == responses.READY
    assert client.transport.closed


@in_loop
async def test_garbage_gets_400_and_close(scorer: KnnScorer) -> None:
    client = Client(scorer, fast=True)
    out = client.send(b"\x16\x03\x01\x02\x00garbage")
    assert out.startswith(b"HTTP/1.1 400") and b"Connection: close" in out
    assert client.transport.eof_written


@pytest.mark.parametrize("fast", [True, False], ids=["fast path", "python path"])
@in_loop
async def test_a_whole_request_over_the_header_limits_in_one_read(
    scorer: KnnScorer, payloads: list[bytes], fast: bool
) -> None:
    client = Client(scorer, fast=fast)
    eleven = b"".join(b"X-%d: a\r\n" % i for i in range(11))
    assert client.send(scoring(payloads[0], eleven)).startswith(b"HTTP/1.1 431")


class BrokenScorer(KnnScorer):
    """A scorer with a bug: what a client gets must say so, not blame the request."""

    def fraud_count(self, vector: Any) -> int:
        raise RuntimeError("a bug")


@in_loop
async def test_a_bug_while_answering_is_a_500(scorer: KnnScorer, payloads: list[bytes]) -> None:
    client = Client(scorer)
    client.state.scorer = BrokenScorer(scorer.index)
    out = client.send(scoring(payloads[0]))
    assert out == responses.INTERNAL_ERROR
    assert client.transport.eof_written
