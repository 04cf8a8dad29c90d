"""An in-memory transport: one ``HttpConnection`` driven without a socket.

The protocol tests feed bytes to ``data_received`` and read what the connection wrote; the
request-path benchmark does the same to time the service's code without the event loop and the
system calls.  Both use this one transport.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fraudscore.service.protocol import HttpConnection
from fraudscore.service.state import ServiceState

Written = bytes | bytearray | memoryview


class MemoryTransport(asyncio.Transport):
    """Keeps what the connection writes, in order, and whether it half-closed or closed.

    ``keep=False`` keeps only the last write (a benchmark's millions of answers need no list);
    ``eof=False`` says the transport cannot half-close, so an error answer closes at once
    instead of lingering (which needs a running event loop).
    """

    def __init__(self, *, keep: bool = True, eof: bool = True) -> None:
        super().__init__()
        self.writes: list[Written] = []
        self.last: Written = b""
        self.eof_written = False
        self.closed = False
        self._keep = keep
        self._eof = eof

    def write(self, data: Written) -> None:
        self.last = data  # as given: a benchmark times this call too
        if self._keep:
            self.writes.append(data)

    def output(self) -> bytes:
        """Everything written so far, as one stream (as the client would read it)."""
        return b"".join(self.writes)

    def can_write_eof(self) -> bool:
        return self._eof

    def write_eof(self) -> None:
        self.eof_written = True

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def memory_connection(
    state: ServiceState, *, keep: bool = True, eof: bool = True
) -> tuple[HttpConnection, MemoryTransport]:
    """A connection of ``state`` over a new in-memory transport, already made."""
    transport = MemoryTransport(keep=keep, eof=eof)
    conn = HttpConnection(state)
    conn.connection_made(transport)
    return conn, transport
