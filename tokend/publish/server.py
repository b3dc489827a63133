"""The HTTP servers: the token API on a unix socket, and the TCP listener for
Prometheus and probes (``/metrics``, ``/healthz``, ``/readyz`` only: a token is never
served over TCP).

The socket file gets its final mode before any connection can be accepted, a stale
one left by a crashed tokend is replaced, a live one is never taken over, and the
file is removed on shutdown if it is still ours.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
from anyio.abc import TaskStatus

from tokend.config import Config, ServeConfig
from tokend.logs import get_logger
from tokend.publish._api import Api
from tokend.publish._feed import TokenFeed
from tokend.publish._http import HttpListener, Limits

if TYPE_CHECKING:
    from tokend.engine import Engine
    from tokend.publish.metrics import Metrics

_log = get_logger(component="server")

# sun_path holds 108 bytes on Linux, one of them the terminating NUL.
_MAX_SOCKET_PATH = 107
_BACKLOG = 1024


class ServeError(RuntimeError):
    """A listener cannot start; the message says why and what to do about it."""


def _limits(serve: ServeConfig) -> Limits:
    return Limits(
        max_connections=serve.max_connections,
        idle_timeout=serve.idle_timeout,
        max_header_bytes=serve.max_header_bytes,
    )


async def serve_socket(
    engine: Engine,
    config: Config,
    metrics: Metrics,
    *,
    feed: TokenFeed | None = None,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the token API on ``config.serve.socket`` until cancelled; ``feed`` (one
    of the engine's publishers) answers the long-polls and event streams.

    Raises :class:`ServeError` before reporting started if the socket cannot be
    created (another tokend serves on it, the path is too long, permissions...)."""
    serve = config.serve
    if serve.socket is None:
        task_status.started()
        return
    path = serve.socket
    try:
        sock, identity = bind_unix_socket(path, serve.socket_mode)
    except ServeError as exc:
        _log.error("socket_unavailable", path=str(path), error=str(exc))
        raise
    try:
        api = Api(engine, serve, metrics, tokens=True, feed=feed)
        listener = HttpListener(
            sock,
            api.handle,
            _limits(serve),
            on_error=api.count_protocol_error,
            with_peer_credentials=True,
        )
        _log.info(
            "socket_listening",
            path=str(path),
            mode=f"{serve.socket_mode:04o}",
            max_connections=serve.max_connections,
            max_waiters=serve.waiters_limit,
        )
        task_status.started()
        await listener.serve()
    finally:
        sock.close()
        _remove_socket_file(path, identity)


async def serve_tcp(
    engine: Engine,
    config: Config,
    metrics: Metrics,
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve /metrics, /healthz and /readyz on ``config.serve.metrics_listen``
    ("host:port"; port 0 picks a free port, logged) until cancelled."""
    serve = config.serve
    if serve.metrics_listen is None:
        task_status.started()
        return
    try:
        sock = bind_tcp(serve.metrics_listen)
    except ServeError as exc:
        _log.error("metrics_listen_unavailable", listen=serve.metrics_listen, error=str(exc))
        raise
    try:
        api = Api(engine, serve, metrics, tokens=False)
        listener = HttpListener(sock, api.handle, _limits(serve))
        host, port = sock.getsockname()[:2]
        _log.info("metrics_listening", host=host, port=port)
        task_status.started()
        await listener.serve()
    finally:
        sock.close()


# -- the unix socket file -------------------------------------------------------------------


def bind_unix_socket(path: Path, mode: int) -> tuple[socket.socket, tuple[int, int]]:
    """A listening unix socket at ``path`` with ``mode``, and the (device, inode) of
    its file so that shutdown removes that file and not a successor's."""
    if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
        raise ServeError(
            f"serve.socket {path} is {len(os.fsencode(path))} bytes long; unix socket "
            f"paths are limited to {_MAX_SOCKET_PATH}: choose a shorter path"
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    except OSError as exc:
        raise ServeError(
            f"cannot create the directory of serve.socket {path}: {exc.strerror}"
        ) from None
    _clear_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # The file is created with no permissions at all, then given its mode, and
        # only then does listen() let anyone connect: there is no moment when a wider
        # mode applies. umask is process-wide, but nothing else creates files while
        # the servers start (token files set their modes explicitly anyway).
        previous = os.umask(0o777)
        try:
            sock.bind(os.fspath(path))
        finally:
            os.umask(previous)
        os.chmod(path, mode)
        info = os.stat(path)
        sock.listen(_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ServeError(
                f"serve.socket {path} was created by another process while tokend "
                "started: is another tokend starting with the same serve.socket?"
            ) from None
        raise ServeError(f"cannot listen on serve.socket {path}: {exc.strerror}") from None
    return sock, (info.st_dev, info.st_ino)


def _clear_stale_socket(path: Path) -> None:
    """Remove a socket file nobody listens on (left by a crash); refuse to touch a
    live one or anything that is not a socket."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ServeError(f"cannot inspect serve.socket {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(info.st_mode):
        raise ServeError(
            f"serve.socket {path} exists and is not a socket: remove it, or set "
            "serve.socket to another path"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(os.fspath(path))
    except ConnectionRefusedError:
        pass  # nobody listens: stale
    except FileNotFoundError:
        return
    except TimeoutError:
        # A listener whose backlog is full is still a listener.
        raise ServeError(_in_use(path)) from None
    except OSError as exc:
        raise ServeError(
            f"cannot check whether serve.socket {path} is in use: {exc.strerror}"
        ) from None
    else:
        raise ServeError(_in_use(path))
    finally:
        probe.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ServeError(f"cannot remove the stale serve.socket {path}: {exc.strerror}") from None
    _log.info("stale_socket_removed", path=str(path))


def _in_use(path: Path) -> str:
    return (
        f"serve.socket {path} is in use: another process (most likely another tokend) "
        "accepts connections on it. Stop that process, or set serve.socket to another path"
    )


def _remove_socket_file(path: Path, identity: tuple[int, int]) -> None:
    try:
        info = os.lstat(path)
        if (info.st_dev, info.st_ino) == identity:
            os.unlink(path)
    except OSError:
        pass  # already gone, or replaced by someone else's: leave it


# -- the TCP port ----------------------------------------------------------------------------


def bind_tcp(listen: str) -> socket.socket:
    """A listening TCP socket for ``"host:port"`` (``"[::1]:9464"`` for IPv6, an empty
    host for every interface)."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ServeError(f"serve.metrics_listen {listen!r} is not host:port (e.g. 127.0.0.1:9464)")
    host = host.removeprefix("[").removesuffix("]")
    try:
        infos = socket.getaddrinfo(
            host or None, int(port_text), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ServeError(
            f"serve.metrics_listen {listen!r}: cannot resolve host: {exc.strerror}"
        ) from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ServeError(
            f"cannot listen on serve.metrics_listen {listen}: {exc.strerror}"
        ) from None
    return sock
