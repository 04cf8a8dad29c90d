"""What one service process shares across its connections, grouped by lifetime.

``ServiceConfig`` is fixed at start; ``ServiceState`` lives as long as the process and is what
every connection (``protocol.HttpConnection``) reads.  Neither knows the other modules, so the
protocol and the server both import this one and not each other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from fraudscore.contract.vectorize import DEFAULT_CONSTANTS, Constants
from fraudscore.defaults import MAX_PORT, MIN_PORT
from fraudscore.errors import ConfigError
from fraudscore.scorer import KnnScorer
from fraudscore.service._fastpath import FastPath
from fraudscore.service.metrics import ServiceMetrics

if TYPE_CHECKING:
    from fraudscore.service.v1 import V1Live


class Connection(Protocol):
    """What the server asks of an open connection (``protocol.HttpConnection``)."""

    def check_deadlines(self, now: float) -> None: ...
    def shutdown(self) -> None: ...
    def abort(self) -> None: ...


# the command-line flag of each setting that has one (cli.py), so an error names what to change
FLAGS = {
    "port": "--port",
    "registry": "--registry",
    "max_body_bytes": "--max-body-bytes",
    "request_timeout": "--request-timeout",
    "max_url_bytes": "--max-url-bytes",
    "max_header_bytes": "--max-header-bytes",
    "max_headers": "--max-headers",
    "metrics_port": "--metrics-port",
}


def _setting(name: str) -> str:
    return FLAGS.get(name, f"the service setting {name}")


@dataclass(frozen=True)
class ServiceConfig:
    """How one instance listens and how patient it is.  Exactly one of port, uds, handoff.

    A request whose URL is longer than ``max_url_bytes`` gets 414; one with more than
    ``max_headers`` header fields, or a header section over ``max_header_bytes`` (each field
    counted as ``name: value`` and its line end), gets 431 (``protocol.HttpConnection``).
    """

    index_path: Path
    host: str = "0.0.0.0"
    port: int | None = None
    uds: Path | None = None
    handoff: Path | None = None
    constants: Constants = DEFAULT_CONSTANTS
    max_body_bytes: int = 64 * 1024
    max_url_bytes: int = 8192
    max_header_bytes: int = 16384
    max_headers: int = 100
    request_timeout: float = 5.0
    idle_timeout: float = 75.0
    shutdown_timeout: float = 10.0
    warm_queries: int = 256
    registry: Path | None = None  # the model registry behind /v1/score (v1.resolve_registry)
    fast_path: bool = True  # answer ordinary scoring requests natively (protocol.py)
    # serve handed-over connections on the native loop's thread (native_loop.py); needs the fast path
    # (cli.py turns it on by default with --handoff)
    native_loop: bool = False
    backlog: int = 4096
    # also serve GET /metrics alone on metrics_host:metrics_port (service/metrics.py), for an
    # instance whose main listener Prometheus cannot reach (a unix or handoff socket)
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        """Refuse settings that cannot work, naming the flag that sets each (ConfigError)."""
        chosen = [x for x in (self.port, self.uds, self.handoff) if x is not None]
        if len(chosen) != 1:
            raise ConfigError("listen on exactly one of --port, --uds, --handoff")
        for name in ("port", "metrics_port"):
            port = getattr(self, name)
            if port is not None and not (isinstance(port, int) and MIN_PORT <= port <= MAX_PORT):
                raise ConfigError(f"{_setting(name)} must be between {MIN_PORT} and {MAX_PORT}, got {port}")
        for name in ("request_timeout", "idle_timeout", "shutdown_timeout"):
            seconds = getattr(self, name)
            # 0 would also make the deadline sweep (every request_timeout / 4) spin without pause
            if not (isinstance(seconds, int | float) and 0 < seconds < math.inf):
                raise ConfigError(f"{_setting(name)} must be a positive number of seconds, got {seconds}")
        for name in ("max_body_bytes", "max_url_bytes", "max_header_bytes", "max_headers", "backlog"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value > 0):
                raise ConfigError(f"{_setting(name)} must be a positive whole number, got {value}")
        if self.native_loop and (self.handoff is None or not self.fast_path):
            raise ConfigError(
                "--native-loop serves handed-over connections: it needs --handoff and the fast path"
            )
        if not (isinstance(self.warm_queries, int) and self.warm_queries >= 0):
            raise ConfigError(f"{_setting('warm_queries')} must not be negative, got {self.warm_queries}")

    @property
    def address(self) -> str:
        if self.uds is not None:
            return f"unix:{self.uds}"
        if self.handoff is not None:
            return f"handoff:{self.handoff}"
        return f"http://{self.host}:{self.port}"


@dataclass
class ServiceState:
    """What every connection of this process shares."""

    config: ServiceConfig
    scorer: KnnScorer  # the contract's scorer: /fraud-score's answers
    constants: Constants
    ready: bool = False
    draining: bool = False
    fast: FastPath | None = None  # set while ready and not draining, when config.fast_path
    v1: V1Live | None = None  # /v1/score's scorers, loaded before ready (v1.load), then live
    connections: set[Connection] = field(default_factory=set)
    metrics: ServiceMetrics = field(init=False)  # the counts behind GET /metrics

    def __post_init__(self) -> None:
        self.metrics = ServiceMetrics(self.scorer.id)
