"""One HTTP/1.1 connection: httptools parses, the request is answered as soon as it is whole.

State is grouped by lifetime, as in uvicorn: the connection's (transport, parser, timer) lives
in ``HttpConnection``; a request's (url, body) is reset by ``on_message_begin``.  Scoring is
synchronous and takes microseconds, so there are no tasks: a request is answered inside
``on_message_complete`` and pipelined requests are answered in order by construction.

Two paths answer.  A read that is exactly one ordinary scoring request, arriving while the
parser is between requests, is answered by the native fast path (``_fastpath.c``) in one call;
for everything else that path declines and httptools with ``vectorize`` answer, as they define
what the answer is.  Both give the same bytes for what both accept (tests/test_fastpath.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import cast

import httptools
import orjson

from fraudscore.contract.vectorize import NORMALIZATION_KEYS, UNKNOWN_MCC_RISK, Constants, vectorize
from fraudscore.errors import PayloadError
from fraudscore.scorer import KnnScorer
from fraudscore.service import responses
from fraudscore.service._fastpath import FastPath
from fraudscore.service.state import ServiceState

log = logging.getLogger(__name__)

LINGER_SECONDS = 1.0


def fast_path(scorer: KnnScorer, constants: Constants, max_body_bytes: int) -> FastPath:
    """The native answerer of ordinary scoring requests, with this service's data and answers:
    every constant of the vector comes from here, none is the C code's own."""
    return FastPath(
        scorer.index.native,
        divisors={key: getattr(constants, key) for key in NORMALIZATION_KEYS},
        mcc_risk=constants.mcc_risk,
        unknown_mcc_risk=UNKNOWN_MCC_RISK,
        answers=responses.SCORES,
        max_body=max_body_bytes,
    )


class HttpConnection(asyncio.Protocol):
    __slots__ = (
        "_body",
        "_body_size",
        "_closing",
        "_in_request",
        "_last_active",
        "_linger",
        "_method",
        "_parser",
        "_request_started",
        "_state",
        "_transport",
        "_url",
    )

    def __init__(self, state: ServiceState) -> None:
        self._state = state
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._linger: asyncio.TimerHandle | None = None
        self._closing = False
        # deadlines are checked by the server's periodic sweep (server.serve), not a timer per request
        self._last_active = time.monotonic()
        self._request_started = 0.0
        # per request
        self._in_request = False
        self._url = b""
        self._method = b""
        self._body: list[bytes] = []
        self._body_size = 0

    # -- connection lifetime --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self._transport = cast(asyncio.Transport, transport)
        self._state.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._state.connections.discard(self)
        self._cancel_linger()
        self._transport = None

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        self._last_active = time.monotonic()
        fast = self._state.fast
        if fast is not None and not self._in_request and self._transport is not None:
            answer = fast.answer(data)
            if answer is not None:
                self._transport.write(answer)
                return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(responses.error(400, "protocol upgrades are not supported", close=True))
        except httptools.HttpParserError as exc:
            self._fail(responses.error(400, f"malformed HTTP request: {exc}", close=True))

    def eof_received(self) -> bool | None:
        return None  # close our side too

    # -- httptools callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_request = True
        self._url = b""
        self._body = []
        self._body_size = 0
        # a request, once begun, must finish in time: a client that stalls its body is cut off
        self._request_started = self._last_active

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_headers_complete(self) -> None:
        self._method = self._parser.get_method()

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self._state.config.max_body_bytes:
            self._fail(responses.TOO_LARGE)
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._closing:
            return
        self._in_request = False
        if self._transport is None:
            return
        answer = self._respond()
        if self._method == b"HEAD":  # the same head, and no body (RFC 9110 9.3.2)
            answer = answer[: answer.index(b"\r\n\r\n") + 4]
        self._transport.write(answer)
        if self._state.draining or not self._parser.should_keep_alive():
            self._close()

    # -- answering ----------------------------------------------------------------------------

    def _respond(self) -> bytes:
        path = self._url.split(b"?", 1)[0]
        if path == b"/fraud-score":
            if self._method != b"POST":
                return responses.FRAUD_SCORE_METHOD
            return self._score()
        if path == b"/ready":
            if self._method != b"GET":
                return responses.READY_METHOD
            return responses.READY if self._state.ready else responses.WARMING
        return responses.NOT_FOUND

    def _score(self) -> bytes:
        state = self._state
        if not state.ready:
            return responses.WARMING
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            return responses.error(400, f"malformed JSON: {exc}")
        try:
            return responses.SCORES[state.scorer.fraud_count(vectorize(payload, state.constants))]
        except PayloadError as exc:
            return responses.error(400, str(exc))
        except ValueError as exc:  # a vector the index refuses (out of range): still the client's input
            return responses.error(400, f"cannot score this transaction: {exc}")

    # -- closing ----------------------------------------------------------------------------

    def _fail(self, response: bytes) -> None:
        """Answer an error and close, lingering: closing with unread input would reset the
        connection and the client would never see the answer.  So: answer, half-close, discard
        what still arrives for a moment, then close."""
        transport = self._transport
        if transport is None or self._closing:
            return
        self._closing = True
        transport.write(response)
        if transport.can_write_eof():
            transport.write_eof()
            self._linger = asyncio.get_running_loop().call_later(LINGER_SECONDS, self._close)
        else:
            self._close()

    def _close(self) -> None:
        self._closing = True
        self._cancel_linger()
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def _cancel_linger(self) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None

    def check_deadlines(self, now: float) -> None:
        """408 for a request begun too long ago; close a keep-alive connection idle too long."""
        if self._closing:
            return
        config = self._state.config
        if self._in_request:
            if now - self._request_started > config.request_timeout:
                self._fail(responses.TIMEOUT)
        elif now - self._last_active > config.idle_timeout:
            self._close()

    # -- shutdown ---------------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        return not self._in_request

    def shutdown(self) -> None:
        """Close now if idle; otherwise the response in progress closes it (draining)."""
        if not self._in_request:
            self._close()

    def abort(self) -> None:
        if self._transport is not None and not self._closing:
            self._transport.write(responses.SHUTTING_DOWN)
        self._close()
        self._state.connections.discard(self)
