"""Handed-over connections served by the native loop, and moved to Python when it declines.

``serve --handoff PATH`` (unless ``--no-native-loop``): every connection the balancer hands over
goes to a ``_fastpath.NativeLoop``, a thread of its own with its own epoll and no GIL.  It answers each
read that is exactly one ordinary scoring request with the fast path's bytes (``/fraud-score``, and
``/v1/score`` from the fast path's ``V1Plan``, which ``service/v1.py`` swaps under a lock the loop
takes for each such answer).  The first read it
declines (a split or pipelined request, another route, an error) moves the connection to Python
for good: the loop queues the descriptor with the bytes it read and signals an eventfd that this
module watches on the event loop.  Python then serves the connection as any other, starting with
those bytes (``MigratedConnection``), so the Python path still defines every answer but the
ordinary one.

Python keeps control: readiness (the handoff socket opens once warm), metrics (the loop counts in
the same native ``RequestMetrics``), and shutdown (``stop``: the loop closes its connections,
which are all between requests, and its thread is joined before the index is closed).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable

from fraudscore.service._fastpath import FastPath, NativeLoop
from fraudscore.service.protocol import HttpConnection
from fraudscore.service.state import ServiceState

log = logging.getLogger(__name__)


class MigratedConnection(HttpConnection):
    """A connection the native loop gave up: it starts with the bytes the loop read."""

    __slots__ = ("_saved",)

    def __init__(self, state: ServiceState, saved: bytes) -> None:
        super().__init__(state)
        self._saved = saved

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # before the transport's first read (uvloop reads only after connection_made): in order
        saved, self._saved = self._saved, b""
        self.data_received(saved)


class NativeConnections:
    """The native loop of one instance, and the way back from it to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, state: ServiceState, fast: FastPath) -> None:
        self._loop = loop
        self._state = state
        self._native = NativeLoop(fast, state.config.idle_timeout)
        self._connecting: set[asyncio.Task[None]] = set()  # the loop holds tasks weakly
        self._native.start()
        loop.add_reader(self._native.migrate_fd, self._take)

    @property
    def answered(self) -> int:
        return self._native.answered

    @property
    def migrated(self) -> int:
        return self._native.migrated

    def adopt(self, fd: int) -> None:
        """Serve this connected socket natively (the loop owns the descriptor from now on)."""
        self._native.adopt(fd)

    def _take(self) -> None:
        for fd, saved in self._native.take():
            try:
                sock = socket.socket(fileno=fd)
            except OSError:  # not a socket any more: nothing to serve
                os.close(fd)
                continue
            sock.setblocking(False)
            task = self._loop.create_task(self._connect(sock, saved))
            self._connecting.add(task)
            task.add_done_callback(self._connecting.discard)

    async def _connect(self, sock: socket.socket, saved: bytes) -> None:
        factory: Callable[[], asyncio.Protocol] = lambda: MigratedConnection(self._state, saved)  # noqa: E731
        try:
            await self._loop.connect_accepted_socket(factory, sock)
        except OSError as exc:  # the client left meanwhile
            log.debug("migrated connection lost: %s", exc)
            sock.close()

    async def stop(self) -> None:
        """Close the loop's connections and join its thread; connections it moved to Python before
        that are served by Python (draining, like the rest)."""
        self._loop.remove_reader(self._native.migrate_fd)
        self._native.stop()
        self._take()
        if self._connecting:
            await asyncio.gather(*self._connecting, return_exceptions=True)
