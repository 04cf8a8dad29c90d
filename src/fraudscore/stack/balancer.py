"""The built-in load balancer: accept, then hand the connection itself to an instance.

Each accepted socket goes, round-robin, to the next instance as a file descriptor over a unix
socket (``SCM_RIGHTS``; ``service/handoff.py`` defines the message).  The instance then serves that
keep-alive connection directly; the balancer never reads a byte of a request, never answers,
and after the handover holds nothing, so it costs almost no CPU or memory.

An instance whose channel fails (it died) is skipped from that moment: the connection goes to
the next one.  The balancer reconnects to it, at most every ``RECONNECT_SECONDS``, once the
instance is back (the stack restarts it on the same socket path).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from fraudscore.defaults import PORT
from fraudscore.service.handoff import send_connection

log = logging.getLogger(__name__)

RECONNECT_SECONDS = 0.05
# an instance alive but not taking its handovers must not stall every new connection
SEND_TIMEOUT_SECONDS = 1.0


class Upstream:
    """One instance's handoff socket, and the channel to it while it is up."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.channel: socket.socket | None = None
        self.next_connect_at = 0.0
        self.handed_count = 0

    def connect(self, now: float) -> bool:
        """True when the channel is open, opening it if the last try was long enough ago."""
        if self.channel is not None:
            return True
        if now < self.next_connect_at:
            return False
        self.next_connect_at = now + RECONNECT_SECONDS
        ch = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            ch.connect(str(self.path))
        except OSError:
            ch.close()
            return False
        ch.settimeout(SEND_TIMEOUT_SECONDS)
        self.channel = ch
        log.info("connected to instance %s", self.path)
        return True

    def send(self, conn: socket.socket) -> bool:
        """Hand ``conn`` over the open channel; False (and the channel dropped) when the instance is gone."""
        assert self.channel is not None
        try:
            send_connection(self.channel, conn)
        except OSError as exc:
            log.warning("instance %s is gone (%s): skipping it", self.path, exc.strerror or exc)
            self.drop()
            return False
        self.handed_count += 1
        return True

    def drop(self) -> None:
        """Close the channel; ``connect`` opens a new one once the instance is back."""
        if self.channel is not None:
            self.channel.close()
            self.channel = None


class Balancer:
    """Round-robin over ``upstreams``; ``serve_forever`` until SIGINT or SIGTERM."""

    def __init__(self, upstreams: Sequence[Path], *, host: str = "0.0.0.0", port: int = PORT) -> None:
        if not upstreams:
            raise ValueError("the balancer needs at least one upstream")
        self.upstreams = [Upstream(p) for p in upstreams]
        self.host, self.port = host, port
        self._turn = 0
        self.refused_count = 0

    def hand_over(self, conn: socket.socket) -> bool:
        """Give ``conn`` to the next instance that takes it; False when none does."""
        now = time.monotonic()
        n = len(self.upstreams)
        for _ in range(n):
            upstream = self.upstreams[self._turn]
            self._turn = (self._turn + 1) % n
            if upstream.connect(now) and upstream.send(conn):
                return True
        self.refused_count += 1
        return False

    def serve_forever(self, listener: socket.socket | None = None) -> None:
        listener = listener or socket.create_server((self.host, self.port), backlog=4096, reuse_port=False)
        # inherited by every accepted socket: the instances answer small responses without delay
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        now = time.monotonic()
        for upstream in self.upstreams:
            upstream.connect(now)
        log.info("balancing :%d over %d instances", self.port, len(self.upstreams))

        def stop(signum: int, frame: FrameType | None) -> None:
            raise SystemExit(0)

        signal.signal(signal.SIGTERM, stop)
        try:
            while True:
                try:
                    conn, _ = listener.accept()
                except InterruptedError:
                    continue
                with conn:  # our copy: the instance holds its own descriptor now
                    self.hand_over(conn)
        except (KeyboardInterrupt, SystemExit):
            pass
        finally:
            listener.close()
            for upstream in self.upstreams:
                upstream.drop()
            handed = ", ".join(f"{u.path.name} {u.handed_count}" for u in self.upstreams)
            log.info("balancer stopped: handed %s; refused %d", handed, self.refused_count)


def run(upstreams: Sequence[Path], *, host: str, port: int) -> None:
    with contextlib.suppress(KeyboardInterrupt):
        Balancer(upstreams, host=host, port=port).serve_forever()
