"""ServiceConfig refuses settings that cannot work, naming the flag; the CLI says so in one line."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fraudscore.errors import ConfigError
from fraudscore.service.sockets import remove_socket_file
from fraudscore.service.state import ServiceConfig

INDEX = Path("unused.fsidx")  # the config only names the index; nothing here opens it


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"port": 70000}, "--port must be between 1 and 65535, got 70000"),
        ({"port": 0}, "--port must be between 1 and 65535, got 0"),
        ({"port": -1}, "--port must be between 1 and 65535, got -1"),
        (
            {"port": 9999, "request_timeout": 0},
            "--request-timeout must be a positive number of seconds, got 0",
        ),
        ({"port": 9999, "request_timeout": -1.5}, "--request-timeout must be a positive"),
        ({"port": 9999, "request_timeout": float("nan")}, "--request-timeout must be a positive"),
        ({"port": 9999, "idle_timeout": 0.0}, "idle_timeout must be a positive number of seconds"),
        ({"port": 9999, "shutdown_timeout": -1}, "shutdown_timeout must be a positive"),
        ({"port": 9999, "max_body_bytes": 0}, "--max-body-bytes must be a positive whole number, got 0"),
        ({"port": 9999, "max_url_bytes": -5}, "--max-url-bytes must be a positive whole number, got -5"),
        ({"port": 9999, "max_header_bytes": 0}, "--max-header-bytes must be a positive whole number"),
        ({"port": 9999, "max_headers": 0}, "--max-headers must be a positive whole number"),
        ({"port": 9999, "backlog": 0}, "backlog must be a positive whole number"),
        ({"port": 9999, "warm_queries": -1}, "warm_queries must not be negative"),
        ({}, "listen on exactly one of --port, --uds, --handoff"),
        ({"port": 9999, "uds": Path("x.sock")}, "listen on exactly one of"),
    ],
)
def test_bad_settings_are_refused_naming_them(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        ServiceConfig(index_path=INDEX, **settings)


def test_good_settings_are_kept() -> None:
    config = ServiceConfig(index_path=INDEX, port=65535, request_timeout=0.5, max_headers=1, warm_queries=0)
    assert (config.port, config.request_timeout, config.max_headers) == (65535, 0.5, 1)
    assert ServiceConfig(index_path=INDEX, port=1).port == 1
    assert ServiceConfig(index_path=INDEX, uds=Path("x.sock")).address == "unix:x.sock"


@pytest.mark.parametrize(
    "flags",
    [
        ["--port", "70000"],
        ["--port", "9999", "--request-timeout", "0"],
        ["--port", "9999", "--max-body-bytes", "-1"],
    ],
)
def test_serve_refuses_them_in_one_line(index_path: Path, flags: list[str]) -> None:
    # whichever refuses first, the flag parser or ServiceConfig: one line naming the flag and value
    run = subprocess.run(
        [sys.executable, "-m", "fraudscore.cli", "serve", "--index", str(index_path), *flags],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2, run.stderr
    [line] = run.stderr.splitlines()
    assert flags[-2] in line and flags[-1] in line, line


@pytest.mark.parametrize("flag", ["--uds", "--handoff"])
def test_a_regular_file_at_the_socket_path_is_refused_and_kept(
    index_path: Path, tmp_path: Path, flag: str
) -> None:
    precious = tmp_path / "notes.txt"
    precious.write_text("not a socket")
    run = subprocess.run(
        [sys.executable, "-m", "fraudscore.cli", "serve", "--index", str(index_path), flag, str(precious)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2, run.stderr
    [line] = run.stderr.splitlines()
    assert flag in line and str(precious) in line and "not a socket" in line, line
    assert precious.read_text() == "not a socket"


@pytest.mark.parametrize("flag", ["--uds", "--handoff"])
def test_remove_socket_file_keeps_what_is_not_a_socket(tmp_path: Path, flag: str) -> None:
    precious = tmp_path / "notes.txt"
    precious.write_text("kept")
    link = tmp_path / "link.sock"
    link.symlink_to(precious)
    for path in (precious, link, tmp_path):
        with pytest.raises(ConfigError, match=f"{flag} {path}: something that is not a socket is there"):
            remove_socket_file(path, flag)
    assert precious.read_text() == "kept" and link.is_symlink()
    remove_socket_file(tmp_path / "absent.sock", flag)  # nothing there: nothing to do


def test_a_stale_socket_is_replaced(index_path: Path, tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    with socket.socket(socket.AF_UNIX) as stale:  # bound, then closed: its file stays behind
        stale.bind(str(path))
    proc = subprocess.Popen(
        [sys.executable, "-m", "fraudscore.cli", "serve", "--index", str(index_path), "--uds", str(path)],
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        answer = b""
        while time.monotonic() < deadline and not answer.startswith(b"HTTP/1.1 200"):
            time.sleep(0.05)
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(path))
                    s.sendall(b"GET /ready HTTP/1.1\r\nConnection: close\r\n\r\n")
                    answer = s.recv(4096)
            except OSError:
                pass
        assert answer.startswith(b"HTTP/1.1 200"), answer
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert not path.exists()  # removed at shutdown
