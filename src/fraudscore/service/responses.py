"""Every response the service sends, as bytes built once at import.

The scoring answer has only six possible bodies (0 to 5 frauds among the neighbours), so the
hot path writes a prebuilt buffer and formats nothing.
"""

from __future__ import annotations

import orjson

from fraudscore.index.search import K
from fraudscore.scorer import decision

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    414: "URI Too Long",
    417: "Expectation Failed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def response(status: int, body: object, *, close: bool = False, extra: str = "") -> bytes:
    """A complete HTTP/1.1 response with a JSON body."""
    payload = orjson.dumps(body)
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n"
        f"{extra}{'Connection: close' + chr(13) + chr(10) if close else ''}\r\n"
    )
    return head.encode("ascii") + payload


OK_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "


def ok(body: bytes) -> bytes:
    """A 200 whose JSON body the caller serialized (an answer that varies per request):
    the same bytes as ``response(200, …)``, with the head's fixed part built once."""
    return b"%s%d\r\n\r\n%s" % (OK_HEAD, len(body), body)


def error(status: int, message: str, *, close: bool = False) -> bytes:
    return response(status, {"error": message}, close=close)


def _answer(frauds: int) -> bytes:
    approved, score = decision(frauds)
    return response(200, {"approved": approved, "fraud_score": score})


# SCORES[n] answers a transaction with n frauds among its K nearest references
SCORES: tuple[bytes, ...] = tuple(_answer(n) for n in range(K + 1))
READY = response(200, {"status": "ready"})
WARMING = response(503, {"status": "warming up"})
NOT_FOUND = error(
    404, "not found: the endpoints are POST /fraud-score, POST /v1/score, GET /ready and GET /metrics"
)
FRAUD_SCORE_METHOD = response(405, {"error": "use POST for /fraud-score"}, extra="Allow: POST\r\n")
V1_SCORE_METHOD = response(405, {"error": "use POST for /v1/score"}, extra="Allow: POST\r\n")
READY_METHOD = response(405, {"error": "use GET or HEAD for /ready"}, extra="Allow: GET, HEAD\r\n")
METRICS_METHOD = response(405, {"error": "use GET or HEAD for /metrics"}, extra="Allow: GET, HEAD\r\n")
TOO_LARGE = error(413, "request body too large", close=True)
EXPECTATION_FAILED = error(417, "the only expectation supported is 100-continue", close=True)
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"  # an interim answer: the final one follows
INTERNAL_ERROR = error(500, "internal error", close=True)
TIMEOUT = error(408, "request not completed in time", close=True)
SHUTTING_DOWN = error(503, "shutting down", close=True)
