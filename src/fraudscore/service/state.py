"""What one service process shares across its connections, grouped by lifetime.

``ServiceConfig`` is fixed at start; ``ServiceState`` lives as long as the process and is what
every connection (``protocol.HttpConnection``) reads.  Neither knows the other modules, so the
protocol and the server both import this one and not each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from fraudscore.contract.vectorize import DEFAULT_CONSTANTS, Constants
from fraudscore.scorer import KnnScorer
from fraudscore.service._fastpath import FastPath


class Connection(Protocol):
    """What the server asks of an open connection (``protocol.HttpConnection``)."""

    def check_deadlines(self, now: float) -> None: ...
    def shutdown(self) -> None: ...
    def abort(self) -> None: ...


@dataclass(frozen=True)
class ServiceConfig:
    """How one instance listens and how patient it is.  Exactly one of port, uds, handoff."""

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
    fast_path: bool = True  # answer ordinary scoring requests natively (protocol.py)
    backlog: int = 4096

    def __post_init__(self) -> None:
        chosen = [x for x in (self.port, self.uds, self.handoff) if x is not None]
        if len(chosen) != 1:
            raise ValueError("listen on exactly one of: a TCP port, a unix socket, a handoff socket")

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
    connections: set[Connection] = field(default_factory=set)
