"""The service process: map and warm the index, listen, serve, and shut down in order.

Shutdown follows a fixed order: stop accepting; let every request already begun finish and
close idle keep-alive connections; after ``shutdown_timeout`` close what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from fraudscore.contract.vectorize import DEFAULT_CONSTANTS, Constants
from fraudscore.index.search import Index, random_queries
from fraudscore.service._fastpath import FastPath
from fraudscore.service.handoff import HandoffListener
from fraudscore.service.protocol import HttpConnection, fast_path

log = logging.getLogger(__name__)


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
    index: Index
    constants: Constants
    ready: bool = False
    draining: bool = False
    fast: FastPath | None = None  # set while ready and not draining, when config.fast_path
    connections: set[HttpConnection] = field(default_factory=set)


async def serve(config: ServiceConfig, *, started: float | None = None) -> None:
    """Run one instance until SIGINT or SIGTERM."""
    started = time.monotonic() if started is None else started
    loop = asyncio.get_running_loop()
    index = Index(config.index_path)
    state = ServiceState(config=config, index=index, constants=config.constants)

    def factory() -> HttpConnection:
        return HttpConnection(state)

    # TCP and unix sockets listen now and answer 503 while warming; a handoff socket is opened
    # only once warm (below), so the balancer only ever reaches a ready instance
    server: asyncio.AbstractServer | None = None
    handoff: HandoffListener | None = None
    if config.uds is not None:
        with contextlib.suppress(FileNotFoundError):
            config.uds.unlink()
        server = await loop.create_unix_server(factory, str(config.uds), backlog=config.backlog)
    elif config.port is not None:
        server = await loop.create_server(
            factory, config.host, config.port, backlog=config.backlog, reuse_address=True
        )
        for sock in server.sockets:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    log.info("serving %s from %s (%d references)", config.address, config.index_path, index.n_points)

    # warm in a thread (the native page walk releases the GIL) so /ready can say 503 meanwhile
    await loop.run_in_executor(None, index.warm, random_queries(config.warm_queries))
    gc.collect()
    gc.freeze()  # what exists now lives forever: keep the collector from walking it under load
    if config.fast_path:
        state.fast = fast_path(index, state.constants, config.max_body_bytes)
    state.ready = True
    if config.handoff is not None:
        handoff = HandoffListener(loop, config.handoff, factory)
    log.info(
        "ready in %.2f s (kernel %s, fast path %s, pid %d)",
        time.monotonic() - started,
        index.kernel,
        "on" if state.fast else "off",
        os.getpid(),
    )

    def sweep() -> None:
        now = time.monotonic()
        for conn in list(state.connections):
            conn.check_deadlines(now)
        loop.call_later(sweep_every, sweep)

    sweep_every = min(1.0, config.request_timeout / 4)
    loop.call_later(sweep_every, sweep)

    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()

    log.info("shutting down: %d connections open", len(state.connections))
    if server is not None:
        server.close()
    if handoff is not None:
        handoff.close()
    state.draining = True
    if state.fast is not None:
        log.info(
            "the fast path answered %d requests and passed %d reads to httptools",
            state.fast.answered,
            state.fast.declined,
        )
        state.fast = None  # from now on every answer says whether the connection stays open
    for conn in list(state.connections):
        conn.shutdown()
    deadline = loop.time() + config.shutdown_timeout
    while state.connections and loop.time() < deadline:
        await asyncio.sleep(0.01)
    for conn in list(state.connections):
        conn.abort()
    if server is not None:
        await server.wait_closed()
    if config.uds is not None:
        with contextlib.suppress(FileNotFoundError):
            config.uds.unlink()
    index.close()
    log.info("stopped")


def run(config: ServiceConfig) -> None:
    """Serve on uvloop (the fastest loop measured here), falling back to asyncio's own."""
    started = time.monotonic()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        asyncio.run(serve(config, started=started))
    else:
        uvloop.run(serve(config, started=started))
