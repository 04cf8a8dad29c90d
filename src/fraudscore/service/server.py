"""The service process: map and warm the index, listen, serve, and shut down in order.

Shutdown follows a fixed order: stop accepting; let every request already begun finish and
close idle keep-alive connections; after ``shutdown_timeout`` close what is left.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import time

from fraudscore.index.search import random_queries
from fraudscore.scorer import KnnScorer
from fraudscore.service import v1
from fraudscore.service.handoff import HandoffListener
from fraudscore.service.metrics import MetricsConnection
from fraudscore.service.native_loop import NativeConnections
from fraudscore.service.protocol import HttpConnection, fast_path
from fraudscore.service.sockets import remove_own_socket, remove_socket_file
from fraudscore.service.state import ServiceConfig, ServiceState

log = logging.getLogger(__name__)


async def serve(config: ServiceConfig, *, started: float | None = None) -> None:
    """Run one instance until SIGINT or SIGTERM."""
    started = time.monotonic() if started is None else started
    loop = asyncio.get_running_loop()
    # an earlier run's socket files go now, before the index is opened; anything else is refused
    if config.uds is not None:
        remove_socket_file(config.uds, "--uds")
    if config.handoff is not None:
        remove_socket_file(config.handoff, "--handoff")
    scorer = KnnScorer.open(config.index_path)
    index = scorer.index
    state = ServiceState(config=config, scorer=scorer, constants=config.constants)

    def factory() -> HttpConnection:
        return HttpConnection(state)

    # TCP and unix sockets listen now and answer 503 while warming; a handoff socket is opened
    # only once warm (below), so the balancer only ever reaches a ready instance
    server: asyncio.AbstractServer | None = None
    handoff: HandoffListener | None = None
    if config.uds is not None:
        server = await loop.create_unix_server(factory, str(config.uds), backlog=config.backlog)
    elif config.port is not None:
        server = await loop.create_server(
            factory, config.host, config.port, backlog=config.backlog, reuse_address=True
        )
        for sock in server.sockets:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    log.info("serving %s from %s (%d references)", config.address, config.index_path, index.n_points)
    metrics_server: asyncio.AbstractServer | None = None
    metrics_connections: set[MetricsConnection] = set()
    admin = v1.LifecycleAdmin(state)  # GET /admin/status, POST /admin/reload: loopback only
    if config.metrics_port is not None:
        metrics_server = await loop.create_server(
            lambda: MetricsConnection(state.metrics, metrics_connections, admin),
            config.metrics_host,
            config.metrics_port,
            reuse_address=True,  # a restarted instance takes its port back at once
        )
        log.info("metrics on http://%s:%d/metrics", config.metrics_host, config.metrics_port)

    # warm in a thread (the native page walk releases the GIL) so /ready can say 503 meanwhile;
    # /v1/score's models load beside it, also off the loop (they read and check files)
    _, v1_scorers = await asyncio.gather(
        loop.run_in_executor(None, index.warm, random_queries(config.warm_queries)),
        loop.run_in_executor(None, v1.load, config.registry, scorer),
    )
    state.v1 = v1_scorers
    detach_v1 = v1.attach(state, loop)  # metrics, drift and shadows, SIGHUP, the instance file
    log.info("%s", v1_scorers.describe())
    gc.collect()
    gc.freeze()  # what exists now lives forever: keep the collector from walking it under load
    if config.fast_path:
        state.fast = fast_path(
            scorer,
            state.constants,
            config.max_body_bytes,
            state.metrics.native,
            max_url_bytes=config.max_url_bytes,
            max_headers=config.max_headers,
            max_header_bytes=config.max_header_bytes,
        )
        v1_scorers.serve_natively(state.fast, loop)  # /v1/score too, until detach_v1
    state.ready = True
    native: NativeConnections | None = None
    if config.native_loop and state.fast is not None:
        native = NativeConnections(loop, state, state.fast)
    if config.handoff is not None:
        handoff = HandoffListener(loop, config.handoff, factory, native.adopt if native else None)
    log.info(
        "ready in %.2f s (kernel %s, fast path %s, native loop %s, pid %d)",
        time.monotonic() - started,
        index.kernel,
        "on" if state.fast else "off",
        "on" if native else "off",
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
    if native is not None:  # its connections are between requests: closed; what it moved is Python's
        await native.stop()
        log.info(
            "the native loop answered %d requests and moved %d connections to Python",
            native.answered,
            native.migrated,
        )
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
    if metrics_server is not None:
        metrics_server.close()
        for metrics_conn in list(metrics_connections):
            metrics_conn.close()
        await metrics_server.wait_closed()
    detach_v1()
    if config.uds is not None:
        remove_own_socket(config.uds)
    scorer.close()
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
