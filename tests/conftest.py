"""Shared fixtures: the real index, the contract's dev data, and a real server process."""

from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fraudscore.errors import IndexFormatError
from fraudscore.index.build import build_index
from fraudscore.index.search import Index

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"
REFERENCES = DATA / "references.json.gz"
INDEX_PATH = DATA / "references.fsidx"
DEV_DATA = ROOT.parent / "shared" / "data" / "dev-data.json.gz"


@pytest.fixture(scope="session")
def index_path() -> Path:
    """The repository's index, (re)built from the bundled references when missing or stale."""
    try:
        Index(INDEX_PATH).close()
    except IndexFormatError:
        build_index(REFERENCES, INDEX_PATH, progress=False)
    return INDEX_PATH


@pytest.fixture(scope="session")
def index(index_path: Path) -> Iterator[Index]:
    with Index(index_path) as idx:
        yield idx


@pytest.fixture(scope="session")
def dev_entries() -> list[dict[str, Any]]:
    if not DEV_DATA.exists():
        pytest.skip(f"the contract's dev data is not at {DEV_DATA}")
    entries: list[dict[str, Any]] = json.loads(gzip.decompress(DEV_DATA.read_bytes()))["entries"]
    return entries


@pytest.fixture(scope="session")
def example_payloads() -> list[dict[str, Any]]:
    payloads: list[dict[str, Any]] = json.loads((DATA / "example-payloads.json").read_text())
    return payloads


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> float:
    """Seconds until GET {url}/ready answers 200; fails if the process dies first."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/ready", timeout=1) as r:
                if r.status == 200:
                    return time.monotonic() - start
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"{url} not ready in {timeout} s")


class Server:
    def __init__(self, index_path: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fraudscore.cli",
                "serve",
                "--index",
                str(index_path),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                *extra,
            ],
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.ready_seconds = wait_ready(self.url, self.proc)

    def stop(self) -> tuple[int, str]:
        self.proc.terminate()
        try:
            _, err = self.proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return self.proc.returncode, err.decode()


@pytest.fixture(scope="module")
def server(index_path: Path) -> Iterator[Server]:
    srv = Server(index_path, "--request-timeout", "1", "--max-body-bytes", "16384")
    yield srv
    code, log = srv.stop()
    assert code == 0, log
    assert "Traceback" not in log, log
