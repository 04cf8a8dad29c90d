"""The service through a real socket: endpoints, keep-alive, and every kind of bad input."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from .conftest import Server


def conn(server: Server) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)


def post(server: Server, body: bytes | str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    c = conn(server)
    c.request(
        "POST", "/fraud-score", body=body, headers={"Content-Type": "application/json", **(headers or {})}
    )
    r = c.getresponse()
    data = r.read()
    c.close()
    assert r.getheader("Content-Type") == "application/json"
    return r.status, json.loads(data)


def raw_exchange(server: Server, data: bytes, *, read_timeout: float = 3.0) -> bytes:
    """Send raw bytes; read until the server closes, which must happen within ``read_timeout``.

    Every exchange here ends with the server closing (an error, ``Connection: close``, HTTP/1.0):
    a read that times out fails the test, so "closed" and "kept open" cannot look the same.
    """
    with socket.create_connection(("127.0.0.1", server.port), timeout=read_timeout) as s:
        # refused early and closed (e.g. a huge head): the answer may still be readable
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(data)
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            raise AssertionError(f"the server did not close within {read_timeout} s: {chunks!r}") from None
        except ConnectionResetError:
            pass  # closed after lingering, with our bytes unread: what was read is the answer
        return b"".join(chunks)


def test_ready(server: Server) -> None:
    c = conn(server)
    c.request("GET", "/ready")
    r = c.getresponse()
    assert r.status == 200
    assert json.loads(r.read()) == {"status": "ready"}


def test_ready_quickly_after_start(server: Server) -> None:
    assert server.ready_seconds < 2.0


def test_scores_match_expected(server: Server, dev_entries: list[dict[str, Any]]) -> None:
    c = conn(server)  # one keep-alive connection for all of them
    for entry in dev_entries[:300]:
        c.request("POST", "/fraud-score", body=json.dumps(entry["request"]))
        r = c.getresponse()
        answer = json.loads(r.read())
        assert r.status == 200
        assert answer == {
            "approved": entry["expected_approved"],
            "fraud_score": entry["expected_fraud_score"],
        }
    c.close()


def test_keep_alive_reuses_one_connection(server: Server, example_payloads: list[dict[str, Any]]) -> None:
    c = conn(server)
    c.request("POST", "/fraud-score", body=json.dumps(example_payloads[0]))
    c.getresponse().read()
    first_sock = c.sock
    for payload in example_payloads[1:6]:
        c.request("POST", "/fraud-score", body=json.dumps(payload))
        r = c.getresponse()
        r.read()
        assert r.status == 200
        assert c.sock is first_sock
    c.close()


def test_pipelined_requests_answered_in_order(server: Server, example_payloads: list[dict[str, Any]]) -> None:
    bodies = [json.dumps(p).encode() for p in example_payloads[:3]]
    reqs = b"".join(
        b"POST /fraud-score HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(b), b) for b in bodies
    )
    reqs += b"GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    out = raw_exchange(server, reqs)
    assert out.count(b"HTTP/1.1 200 OK") == 4
    assert out.endswith(b'{"status":"ready"}')


def test_connection_close_is_honoured(server: Server, example_payloads: list[dict[str, Any]]) -> None:
    body = json.dumps(example_payloads[0]).encode()
    out = raw_exchange(
        server,
        b"POST /fraud-score HTTP/1.1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
        % (len(body), body),
    )
    assert out.startswith(b"HTTP/1.1 200 OK")  # and raw_exchange saw the server close
    assert out.count(b"HTTP/1.1") == 1


def test_head_ready_gets_the_head_only(server: Server) -> None:
    # two requests on one connection: the HEAD answer must carry no body, or the next answer is garbled
    out = raw_exchange(
        server, b"HEAD /ready HTTP/1.1\r\n\r\nGET /ready HTTP/1.1\r\nConnection: close\r\n\r\n"
    )
    head, _, rest = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert b"Content-Length: 18" in head  # the GET answer's length (RFC 9110 9.3.2), without its body
    assert rest.startswith(b"HTTP/1.1 200 OK")
    assert rest.endswith(b'{"status":"ready"}')


def test_ready_is_get_or_head_only(server: Server) -> None:
    out = raw_exchange(server, b"POST /ready HTTP/1.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 405")
    assert b"Allow: GET, HEAD\r\n" in out


def scoring_head(body: bytes, expect: bytes = b"100-continue") -> bytes:
    return b"POST /fraud-score HTTP/1.1\r\nHost: x\r\nExpect: %s\r\nContent-Length: %d\r\n\r\n" % (
        expect,
        len(body),
    )


def test_expect_100_continue_is_answered(server: Server, example_payloads: list[dict[str, Any]]) -> None:
    body = json.dumps(example_payloads[0]).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(scoring_head(body))
        assert s.recv(4096) == b"HTTP/1.1 100 Continue\r\n\r\n"  # before any of the body is sent
        s.sendall(body)
        answer = s.recv(4096)
        assert answer.startswith(b"HTTP/1.1 200 OK")
        assert set(json.loads(answer.partition(b"\r\n\r\n")[2])) == {"approved", "fraud_score"}
        # the connection stays usable: a second request with its body sent at once gets no 100
        s.sendall(scoring_head(body) + body)
        assert s.recv(4096).startswith(b"HTTP/1.1 200 OK")


def test_unknown_expectation_gets_417(server: Server) -> None:
    out = raw_exchange(server, scoring_head(b"{}", b"something-else"))
    assert out.startswith(b"HTTP/1.1 417 Expectation Failed")
    assert "100-continue" in error_of(out)


def test_http_1_0_closes(server: Server) -> None:
    out = raw_exchange(server, b"GET /ready HTTP/1.0\r\n\r\n")  # fails unless the server closes
    assert out.startswith(b"HTTP/1.1 200 OK")
    assert out.endswith(b'{"status":"ready"}')


def test_http_1_0_keep_alive_is_honoured(server: Server) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=3) as s:
        for _ in range(2):  # the connection stays open for the second request
            s.sendall(b"GET /ready HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.1 200 OK")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "malformed JSON"),
        (b"", "malformed JSON"),
        (b"[1, 2]", "payload must be a JSON object"),
        (b'{"transaction": 5}', "transaction must be an object"),
        (b'{"a": NaN}', "malformed JSON"),
        (b"\xff\xfe\x00garbage", "malformed JSON"),
        (b"[" * 5000 + b"]" * 5000, "malformed JSON"),  # deep nesting
    ],
)
def test_bad_bodies_get_400(server: Server, body: bytes, message: str) -> None:
    status, answer = post(server, body)
    assert status == 400
    assert message in answer["error"]


def payload_with(example: dict[str, Any], section: str, key: str, value: Any) -> str:
    p = json.loads(json.dumps(example))
    if value is KeyError:
        del p[section][key]
    else:
        p[section][key] = value
    return json.dumps(p)


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("transaction", "amount", "12", "transaction.amount must be a number"),
        ("transaction", "amount", KeyError, "transaction.amount is missing"),
        ("transaction", "requested_at", "2026-13-45T99:00:00Z", "not an ISO 8601 timestamp"),
        ("transaction", "requested_at", "9999-12-31T23:00:00-03:00", "transaction.requested_at is outside"),
        ("transaction", "requested_at", "0001-01-01T00:00:00+03:00", "transaction.requested_at is outside"),
        ("terminal", "is_online", "yes", "terminal.is_online must be true or false"),
        ("customer", "known_merchants", None, "customer.known_merchants must be an array"),
    ],
)
def test_bad_fields_get_400(
    server: Server, example_payloads: list[dict[str, Any]], section: str, key: str, value: Any, message: str
) -> None:
    status, answer = post(server, payload_with(example_payloads[0], section, key, value))
    assert status == 400
    assert message in answer["error"]


def test_last_timestamp_past_the_calendar_gets_400(
    server: Server, example_payloads: list[dict[str, Any]]
) -> None:
    payload = json.loads(json.dumps(example_payloads[0]))
    payload["last_transaction"] = {"timestamp": "0001-01-01T00:00:00+03:00", "km_from_current": 1.0}
    status, answer = post(server, json.dumps(payload))
    assert status == 400
    assert "last_transaction.timestamp is outside the years 1 to 9999" in answer["error"]


def test_odd_but_valid_values_are_scored(server: Server, example_payloads: list[dict[str, Any]]) -> None:
    for section, key, value in [
        ("customer", "avg_amount", 0),
        ("customer", "avg_amount", -5.0),
        ("merchant", "mcc", "0000"),
        ("customer", "known_merchants", []),
    ]:
        status, answer = post(server, payload_with(example_payloads[0], section, key, value))
        assert status == 200, (key, value, answer)
        assert set(answer) == {"approved", "fraud_score"}


def test_body_over_the_limit_gets_413(server: Server) -> None:
    out = raw_exchange(server, b"POST /fraud-score HTTP/1.1\r\nContent-Length: 40000\r\n\r\n" + b"x" * 40000)
    assert out.startswith(b"HTTP/1.1 413")
    assert b'"error"' in out


def test_chunked_body_over_the_limit_gets_413(server: Server) -> None:
    chunk = b"x" * 9000
    data = b"POST /fraud-score HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    data += (b"%x\r\n%s\r\n" % (len(chunk), chunk)) * 3 + b"0\r\n\r\n"
    assert raw_exchange(server, data).startswith(b"HTTP/1.1 413")


def test_short_body_times_out_with_408(server: Server) -> None:
    out = raw_exchange(
        server, b'POST /fraud-score HTTP/1.1\r\nContent-Length: 100\r\n\r\n{"a":', read_timeout=5
    )
    assert out.startswith(b"HTTP/1.1 408")


def test_long_body_leaves_garbage_that_gets_400(server: Server) -> None:
    out = raw_exchange(
        server, b"POST /fraud-score HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}extra bytes\r\n\r\n"
    )
    assert out.startswith(b"HTTP/1.1 400")  # {} is an invalid payload
    assert out.count(b"HTTP/1.1 400") == 2  # the trailing bytes are not HTTP


def test_bad_content_length_gets_400(server: Server) -> None:
    out = raw_exchange(server, b"POST /fraud-score HTTP/1.1\r\nContent-Length: abc\r\n\r\n{}")
    assert out.startswith(b"HTTP/1.1 400")


def test_garbage_bytes_get_400_and_close(server: Server) -> None:
    out = raw_exchange(server, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage")
    assert out.startswith(b"HTTP/1.1 400")
    assert b"Connection: close" in out


def error_of(answer: bytes) -> str:
    """The JSON error of a whole answer (head and body), checking it says it closes."""
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"Connection: close" in head, head
    assert b"Content-Type: application/json" in head, head
    message: str = json.loads(body)["error"]
    return message


def test_long_url_gets_414(server: Server) -> None:
    out = raw_exchange(server, b"GET /ready?" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 414 URI Too Long")
    assert "URL is longer than 8192 bytes" in error_of(out)


def test_url_within_the_limit_is_answered(server: Server) -> None:
    out = raw_exchange(server, b"GET /ready?" + b"a" * 8000 + b" HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 OK")


def test_too_many_headers_get_431(server: Server) -> None:
    headers = b"".join(b"X-%d: a\r\n" % i for i in range(101))
    out = raw_exchange(server, b"GET /ready HTTP/1.1\r\n" + headers + b"\r\n")
    assert out.startswith(b"HTTP/1.1 431 Request Header Fields Too Large")
    assert "more than 100 header fields" in error_of(out)


def test_header_section_over_the_limit_gets_431(server: Server) -> None:
    headers = b"".join(b"X-%d: %s\r\n" % (i, b"a" * 1000) for i in range(17))
    out = raw_exchange(server, b"GET /ready HTTP/1.1\r\n" + headers + b"\r\n")
    assert out.startswith(b"HTTP/1.1 431")
    assert "header section is larger than 16384 bytes" in error_of(out)


def test_a_one_mebibyte_header_gets_431(server: Server, example_payloads: list[dict[str, Any]]) -> None:
    body = json.dumps(example_payloads[0]).encode()
    out = raw_exchange(
        server,
        b"POST /fraud-score HTTP/1.1\r\nX-Big: %s\r\nContent-Length: %d\r\n\r\n%s"
        % (b"a" * (1 << 20), len(body), body),
    )
    assert out.startswith(b"HTTP/1.1 431")


def test_headers_within_the_limits_are_answered(server: Server) -> None:
    headers = b"".join(b"X-%d: %s\r\n" % (i, b"a" * 100) for i in range(99))
    out = raw_exchange(server, b"GET /ready HTTP/1.1\r\n" + headers + b"Connection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 OK")


def test_unknown_path_and_method(server: Server) -> None:
    c = conn(server)
    c.request("GET", "/fraud-score")
    r = c.getresponse()
    assert (r.status, r.getheader("Allow")) == (405, "POST")
    r.read()
    c.request("GET", "/nope")
    r = c.getresponse()
    assert r.status == 404
    assert "error" in json.loads(r.read())


def test_slow_client_does_not_hold_up_others(server: Server, example_payloads: list[dict[str, Any]]) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as slow:
        slow.sendall(b"POST /fraud-score HTTP/1.1\r\nContent-Length: 500\r\n\r\n{")
        start = time.monotonic()
        for payload in example_payloads[:20]:
            assert post(server, json.dumps(payload))[0] == 200
        assert time.monotonic() - start < 1.0  # well before the slow client's 1 s timeout


def test_shutdown_finishes_in_flight_then_exits(
    index_path: Path, example_payloads: list[dict[str, Any]]
) -> None:
    srv = Server(index_path)
    c = conn(srv)
    c.request("POST", "/fraud-score", body=json.dumps(example_payloads[0]))
    assert c.getresponse().status == 200
    # a request whose body is still arriving when SIGTERM comes is answered, then the process exits
    s = socket.create_connection(("127.0.0.1", srv.port))
    body = json.dumps(example_payloads[1]).encode()
    s.sendall(b"POST /fraud-score HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:10])
    time.sleep(0.1)
    srv.proc.terminate()
    time.sleep(0.2)
    s.sendall(body[10:])
    answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 200 OK")
    assert b"Connection: close" not in answer or answer.endswith(b"}")
    srv.proc.wait(15)  # exits on that one SIGTERM (stop() would send a second)
    code, log = srv.stop()
    assert code == 0
    assert "shutting down" in log and "stopped" in log


def test_the_readmes_example_file_is_sent_as_is(
    server: Server, example_payloads: list[dict[str, Any]]
) -> None:
    """`curl -d @data/example-payload.json` (curl drops the file's newlines): one of the contract's
    examples, answered as that example is."""
    raw = (Path(__file__).resolve().parent.parent / "data" / "example-payload.json").read_bytes()
    assert json.loads(raw) == example_payloads[0]
    as_curl_sends_it = raw.replace(b"\r", b"").replace(b"\n", b"")
    assert (
        post(server, as_curl_sends_it) == post(server, raw) == post(server, json.dumps(example_payloads[0]))
    )
    assert post(server, raw)[0] == 200
