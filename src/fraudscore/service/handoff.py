"""Connections handed over by the balancer: accepted sockets arrive as file descriptors.

The balancer accepts on the public port and passes each accepted socket to an instance over a
unix socket (``SCM_RIGHTS``); the instance then serves that connection itself.  The balancer
never reads a byte of a request.  Each handover is one message of one byte carrying one or
more descriptors: ``send_connection`` writes it, and this module is its one definition.  The
balancer imports it, so this module loads no event loop and no scoring code.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only in annotations: the balancer imports this module and runs no event loop
    import asyncio

log = logging.getLogger(__name__)

HANDOFF_BYTE = b"c"
"""The data of each handover message; the descriptors travel as its SCM_RIGHTS."""
MAX_FDS_PER_MESSAGE = 64


def send_connection(channel: socket.socket, conn: socket.socket) -> None:
    """Hand ``conn`` to the instance at the other end of ``channel``; OSError when it is gone."""
    socket.send_fds(channel, [HANDOFF_BYTE], [conn.fileno()])


class HandoffListener:
    """Listens on ``path``; every descriptor received becomes a served connection: given to
    ``adopt`` when there is one (the native loop, ``native_loop.py``), else served on ``loop``."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        path: Path,
        protocol_factory: Callable[[], asyncio.Protocol],
        adopt: Callable[[int], None] | None = None,
    ) -> None:
        self._loop = loop
        self._path = Path(path)
        self._factory = protocol_factory
        self._adopt = adopt
        self._channels: set[socket.socket] = set()
        # the loop holds tasks weakly: keep each handover's task until it is done
        self._connecting: set[asyncio.Task[None]] = set()
        # imported here, not above: the balancer imports this module and needs none of the listener
        from fraudscore.service.sockets import remove_socket_file

        remove_socket_file(self._path, "--handoff")  # an earlier run's socket, and nothing else
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self._path))
        self._listener.listen(16)
        self._listener.setblocking(False)
        loop.add_reader(self._listener.fileno(), self._accept_channel)

    def _accept_channel(self) -> None:
        try:
            channel, _ = self._listener.accept()
        except BlockingIOError:
            return
        channel.setblocking(False)
        self._channels.add(channel)
        self._loop.add_reader(channel.fileno(), self._receive, channel)
        log.debug("handoff channel opened on %s", self._path)

    def _receive(self, channel: socket.socket) -> None:
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(channel, 16, MAX_FDS_PER_MESSAGE)
            except BlockingIOError:
                return
            except OSError as exc:
                log.warning("handoff channel failed: %s", exc)
                self._drop(channel)
                return
            if not data and not fds:
                self._drop(channel)  # the balancer went away
                return
            for fd in fds:
                self._serve(fd)

    def _serve(self, fd: int) -> None:
        if self._adopt is not None:
            try:
                self._adopt(fd)
            except (OSError, RuntimeError) as exc:  # not a socket we can use, or the loop is stopping
                log.debug("handed-over connection not adopted: %s", exc)
                os.close(fd)
            return
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            os.close(fd)
            return
        sock.setblocking(False)
        task = self._loop.create_task(self._connect(sock))
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)

    async def _connect(self, sock: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._factory, sock)
        except OSError as exc:  # the client left before we took it
            log.debug("handed-over connection lost: %s", exc)
            sock.close()

    def _drop(self, channel: socket.socket) -> None:
        self._loop.remove_reader(channel.fileno())
        self._channels.discard(channel)
        channel.close()

    def close(self) -> None:
        """Stop taking connections: close the listener and every channel, remove the socket file."""
        self._loop.remove_reader(self._listener.fileno())
        self._listener.close()
        for channel in list(self._channels):
            self._drop(channel)
        from fraudscore.errors import ConfigError
        from fraudscore.service.sockets import remove_socket_file

        with contextlib.suppress(ConfigError):  # whatever replaced our socket meanwhile stays
            remove_socket_file(self._path, "--handoff")
