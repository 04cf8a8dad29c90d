"""The unix socket files a service binds (``--uds``, ``--handoff``): remove only what is a socket.

A path given for a socket may name something else by mistake, a regular file most often.  An
earlier run's socket left behind is removed so the new one can be bound; anything else there is
refused and left as it is.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from fraudscore.errors import ConfigError


def remove_socket_file(path: Path, flag: str) -> None:
    """Remove the unix socket at ``path``, if one is there; ``ConfigError`` naming ``flag`` and the
    path if something else is (a regular file, a directory, a symbolic link), which is kept."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"{flag} {path}: something that is not a socket is there; not removing it")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def remove_own_socket(path: Path) -> None:
    """At shutdown: remove the socket this process bound at ``path``; whatever replaced it stays."""
    with contextlib.suppress(ConfigError):
        remove_socket_file(path, "socket")
