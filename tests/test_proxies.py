"""nginx and haproxy configurations: rendered, checked by the binaries, run in front of two stand-in APIs."""

from __future__ import annotations

import http.client
import itertools
import json
import socket
import socketserver
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from fraudscore.errors import ProxyError
from fraudscore.stack.proxies import (
    find_haproxy,
    find_nginx,
    haproxy_command,
    nginx_command,
    render_haproxy,
    render_nginx,
)

SOCKETS = ["/sockets/api1.sock", "/sockets/api2.sock"]
Command = Callable[..., list[str]]
PROXIES: dict[str, tuple[Callable[[], str | None], Command]] = {
    "nginx": (find_nginx, nginx_command),
    "haproxy": (find_haproxy, haproxy_command),
}


def command_for(name: str) -> Command:
    find, command = PROXIES[name]
    if find() is None:
        pytest.skip(f"{name} is not installed (apt-get install {name})")
    return command


def test_nginx_config_round_robins_over_the_sockets_with_keepalive() -> None:
    text = render_nginx(SOCKETS, "/run/lb", port=8080)
    assert "server unix:/sockets/api1.sock" in text and "server unix:/sockets/api2.sock" in text
    assert "listen 8080" in text
    assert "keepalive 64;" in text and "proxy_http_version 1.1;" in text
    assert 'proxy_set_header Connection "";' in text
    assert "proxy_next_upstream off;" in text and "proxy_cache off;" in text
    assert "pid /run/lb/nginx.pid;" in text and "error_log /run/lb/error.log" in text
    assert "proxy_temp_path /run/lb/tmp/proxy;" in text
    # Nothing is answered by nginx itself, and nothing is sent to a second instance.
    assert "return " not in text and "root " not in text and "non_idempotent" not in text
    assert "user " not in text.split("events")[0]
    assert "user alice;" in render_nginx(SOCKETS, "/run/lb", user="alice")


def test_haproxy_config_round_robins_over_the_sockets_without_retries() -> None:
    text = render_haproxy(SOCKETS)
    assert "bind :9999" in text
    assert "balance roundrobin" in text
    assert "server api1 /sockets/api1.sock" in text and "server api2 /sockets/api2.sock" in text
    assert "retries 0" in text and "no option redispatch" in text
    assert "http-request return" not in text and "cache" not in text


@pytest.mark.parametrize(
    ("sockets", "message"),
    [
        ([], "at least one"),
        (["relative.sock"], "absolute"),
        (["/with space.sock"], "plain characters"),
        (["/x;" + "y.sock"], "plain characters"),
        (["/" + "s" * 120], "longer than 107 bytes"),
    ],
)
def test_unusable_socket_paths_are_refused(sockets: list[str], message: str) -> None:
    with pytest.raises(ProxyError, match=message):
        render_haproxy(sockets)
    with pytest.raises(ProxyError, match=message):
        render_nginx(sockets, "/tmp")


def test_missing_binary_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("fraudscore.stack.proxies.shutil.which", lambda *a, **k: None)
    with pytest.raises(ProxyError, match="nginx is not installed"):
        nginx_command(tmp_path, SOCKETS)
    with pytest.raises(ProxyError, match="haproxy is not installed"):
        haproxy_command(tmp_path, SOCKETS)


@pytest.mark.parametrize("name", ["nginx", "haproxy"])
def test_config_passes_the_binarys_own_check(name: str, tmp_path: Path) -> None:
    argv = command_for(name)(tmp_path / "work", SOCKETS, check=True)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    if name == "nginx":
        # Everything nginx wrote at check time is inside its working directory.
        assert "nginx.conf" in {p.name for p in (tmp_path / "work").iterdir()}


# A stand-in API: HTTP/1.1 on a unix socket, answering which instance it is.


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Instance

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.server.bodies.append(body)
        reply = json.dumps({"instance": self.server.name, "received": len(body)}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: object) -> None:
        pass  # the unix-socket client address has no host part for the default log line


class _Instance(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, path: Path, name: str):
        self.name, self.bodies, self.connections = name, list[bytes](), 0
        super().__init__(str(path), _Handler)

    def process_request(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: object
    ) -> None:
        self.connections += 1
        super().process_request(request, client_address)


@pytest.fixture
def instances(tmp_path: Path) -> Iterator[list[_Instance]]:
    (tmp_path / "sockets").mkdir()
    servers = [_Instance(tmp_path / "sockets" / f"api{i}.sock", f"api{i}") for i in (1, 2)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield servers
    for server in servers:
        server.shutdown()
        server.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def start_proxy(tmp_path: Path) -> Iterator[Callable[[str, list[Path]], int]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(name: str, sockets: list[Path]) -> int:
        port = free_port()
        argv = command_for(name)(tmp_path / name, sockets, port=port)
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        started.append(proc)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                error = proc.stderr.read().decode() if proc.stderr else ""
                pytest.fail(f"{name} exited with {proc.returncode}: {error}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return port
            except OSError:
                time.sleep(0.02)
        pytest.fail(f"{name} did not listen on port {port} within 10 s")

    yield start
    for proc in started:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def post(conn: http.client.HTTPConnection, body: bytes) -> tuple[int, bytes]:
    conn.request("POST", "/fraud-score", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    return response.status, response.read()


@pytest.mark.parametrize("name", ["nginx", "haproxy"])
def test_proxy_spreads_requests_round_robin_and_keeps_connections(
    name: str, instances: list[_Instance], start_proxy: Callable[[str, list[Path]], int]
) -> None:
    port = start_proxy(name, [Path(s.server_address) for s in instances])  # type: ignore[arg-type]
    # One keep-alive client connection: each request is balanced on its own.
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    answered = []
    for i in range(8):
        body = json.dumps({"id": f"tx-{i}", "pad": "x" * i}).encode()
        status, reply = post(conn, body)
        assert status == 200, reply
        answer = json.loads(reply)
        assert answer["received"] == len(body)
        answered.append(answer["instance"])
    conn.close()
    assert answered.count("api1") == answered.count("api2") == 4
    assert all(a != b for a, b in itertools.pairwise(answered))
    # Keep-alive upstream: one connection per instance carried all eight requests.
    assert instances[0].connections == instances[1].connections == 1
    # A new client connection per request is balanced too.
    for i in range(8):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        status, _ = post(conn, b'{"id": "again-%d"}' % i)
        conn.close()
        assert status == 200
    # Each body arrived once, at one instance.
    assert len(instances[0].bodies) == len(instances[1].bodies) == 8


@pytest.mark.parametrize("name", ["nginx", "haproxy"])
def test_proxy_does_not_resend_to_the_other_instance(
    name: str, instances: list[_Instance], start_proxy: Callable[[str, list[Path]], int]
) -> None:
    down = Path(instances[1].server_address)  # type: ignore[arg-type]
    instances[1].server_close()
    down.unlink()
    port = start_proxy(name, [Path(instances[0].server_address), down])  # type: ignore[arg-type]
    statuses = []
    for i in range(4):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        statuses.append(post(conn, b'{"id": "tx-%d"}' % i)[0])
        conn.close()
    # Half fail with the proxy's gateway error, and the live instance saw only its own half.
    assert sorted(statuses) == [200, 200, 502, 502] or sorted(statuses) == [200, 200, 503, 503]
    assert len(instances[0].bodies) == 2


@pytest.mark.parametrize("name", ["nginx", "haproxy"])
def test_proxy_keeps_a_busy_client_connection_open(
    name: str, instances: list[_Instance], start_proxy: Callable[[str, list[Path]], int]
) -> None:
    """More requests on one connection than a contract run sends (~600): none is the last."""
    port = start_proxy(name, [Path(s.server_address) for s in instances])  # type: ignore[arg-type]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    for i in range(1500):
        conn.request("POST", "/fraud-score", body=b'{"id": "tx-%d"}' % i)
        response = conn.getresponse()
        response.read()
        assert response.status == 200
        assert not response.will_close, f"{name} closed the connection after request {i + 1}"
    conn.close()
