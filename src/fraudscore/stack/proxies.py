"""nginx and haproxy in place of ``fraudscore balance``: their configurations and how to run them.

Same topology as our balancer: listen on one TCP port, spread requests round-robin over the API
instances' unix sockets, keep HTTP/1.1 connections to them open. The proxy never answers on its own
(no cache, no local responses) and never sends a request a second time to another instance, since a
POST's body may already have reached the first. Every path a proxy writes (pid, logs, temp files)
is inside one working directory, so neither needs /etc or /var nor root.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from fraudscore.defaults import PORT
from fraudscore.errors import ProxyError

# sun_path holds 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107
# Paths go into the configs unquoted, so keep them to characters neither format treats specially.
_PLAIN_PATH = re.compile(r"[A-Za-z0-9_./@+:,=-]+")


def _plain_absolute_path(path: str | os.PathLike[str], what: str) -> str:
    text = os.fspath(path)
    if not os.path.isabs(text) or not _PLAIN_PATH.fullmatch(text):
        raise ProxyError(f"{what} must be an absolute path of plain characters, got {text!r}")
    return text


def _socket_paths(sockets: Sequence[str | os.PathLike[str]]) -> list[str]:
    if not sockets:
        raise ProxyError("at least one API socket is needed")
    paths = [_plain_absolute_path(s, "an API socket") for s in sockets]
    for p in paths:
        if len(p.encode()) > _MAX_SOCKET_PATH:
            raise ProxyError(f"unix socket path longer than {_MAX_SOCKET_PATH} bytes: {p}")
    return paths


def render_nginx(
    sockets: Sequence[str | os.PathLike[str]],
    directory: str | os.PathLike[str],
    *,
    port: int = PORT,
    user: str | None = None,
) -> str:
    """nginx.conf text; ``directory`` holds its pid file, error log and temp files.

    ``user`` matters only when nginx starts as root: its workers then switch to that user, who must be
    able to connect to the sockets (nginx's default, nobody, usually cannot).
    """
    work = _plain_absolute_path(directory, "the working directory")
    upstreams = "\n".join(f"        server unix:{s} max_fails=0;" for s in _socket_paths(sockets))
    user_line = f"user {user};\n" if user else ""
    temp = "\n".join(
        f"    {kind}_temp_path {work}/tmp/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""\
# Rendered by fraudscore.stack.proxies; run with -p {work}/ -e {work}/error.log -g 'daemon off;'.
{user_line}worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/error.log warn;

events {{
    worker_connections 4096;
    multi_accept on;
}}

http {{
    access_log off;
{temp}

    upstream api {{
        # round-robin is nginx's default; max_fails=0 keeps an instance in rotation after one error.
{upstreams}
        keepalive 64;
        keepalive_requests 1000000;
    }}

    server {{
        listen {port} backlog=4096;
        # nginx closes a keep-alive connection after 1,000 requests by default: a client that
        # sends on it at that moment gets no answer.  A contract run sends ~600 per connection.
        keepalive_requests 1000000;

        location / {{
            proxy_pass http://api;
            # Keep-alive to the instances needs HTTP/1.1 and no "Connection: close" passed on.
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache off;
            # An error is returned to the client, never retried on the other instance.
            proxy_next_upstream off;
            proxy_connect_timeout 2s;
            proxy_read_timeout 30s;
        }}
    }}
}}
"""


def render_haproxy(sockets: Sequence[str | os.PathLike[str]], *, port: int = PORT) -> str:
    """haproxy.cfg text (haproxy needs no working directory when run in the foreground)."""
    servers = "\n".join(f"    server api{i} {s}" for i, s in enumerate(_socket_paths(sockets), start=1))
    return f"""\
# Rendered by fraudscore.stack.proxies; run with haproxy -db -f <this file>.
global
    maxconn 4096
    nbthread 1

defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 30s
    # Keep-alive on both sides; idle server connections are reused only where it is safe.
    option http-keep-alive
    http-reuse safe
    # No retry and no redispatch: a request is sent to one instance only.
    retries 0
    no option redispatch

frontend fraudscore
    bind :{port}
    default_backend api

backend api
    balance roundrobin
{servers}
"""


def find_nginx() -> str | None:
    # Debian installs it in /usr/sbin, which is not on every user's PATH.
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


def find_haproxy() -> str | None:
    return shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")


def _binary_or_error(found: str | None, name: str, given: str | None) -> str:
    binary = given or found
    if binary is None:
        raise ProxyError(f"{name} is not installed (not on PATH nor in /usr/sbin): apt-get install {name}")
    return binary


def nginx_command(
    directory: str | os.PathLike[str],
    sockets: Sequence[str | os.PathLike[str]],
    *,
    port: int = PORT,
    check: bool = False,
    binary: str | None = None,
) -> list[str]:
    """Write ``nginx.conf`` into ``directory`` and return the argv running nginx in the foreground.

    With ``check``, the argv only tests the configuration (``nginx -t``) and exits.
    """
    nginx = _binary_or_error(find_nginx(), "nginx", binary)
    work = Path(_plain_absolute_path(Path(directory).resolve(), "the working directory"))
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (work / "tmp" / kind).mkdir(parents=True, exist_ok=True)
    # As root, keep the workers as the current user so they can reach sockets the APIs made.
    user = pwd.getpwuid(os.geteuid()).pw_name if os.geteuid() == 0 else None
    config = work / "nginx.conf"
    config.write_text(render_nginx(sockets, work, port=port, user=user))
    # -e: the log used before the config is read (otherwise a compiled-in path under /var/log).
    argv = [nginx, "-p", f"{work}/", "-e", str(work / "error.log"), "-c", str(config)]
    return [*argv, "-t"] if check else [*argv, "-g", "daemon off;"]


def haproxy_command(
    directory: str | os.PathLike[str],
    sockets: Sequence[str | os.PathLike[str]],
    *,
    port: int = PORT,
    check: bool = False,
    binary: str | None = None,
) -> list[str]:
    """Write ``haproxy.cfg`` into ``directory`` and return the argv running haproxy in the foreground.

    With ``check``, the argv only checks the configuration (``haproxy -c``) and exits.
    """
    haproxy = _binary_or_error(find_haproxy(), "haproxy", binary)
    work = Path(directory).resolve()
    work.mkdir(parents=True, exist_ok=True)
    config = work / "haproxy.cfg"
    config.write_text(render_haproxy(sockets, port=port))
    # -db: stay in the foreground, no daemon, so the runner owns the process and sees it exit.
    return [haproxy, "-c", "-f", str(config)] if check else [haproxy, "-db", "-f", str(config)]
