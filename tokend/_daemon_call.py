"""One request to the running daemon over its unix socket, for the commands that hand
it work (``tokend login`` gives it a seed, ``tokend revoke`` ends a grant)."""

from __future__ import annotations

import http.client
import os
import socket
from pathlib import Path

import orjson


class DaemonNotRunning(Exception):
    """Nothing answers on the socket."""


class DaemonCallFailed(Exception):
    """The request or its answer was cut off; the message names the error's type only
    (the request may carry a token)."""


def call_daemon(
    socket_path: Path, method: str, path: str, *, body: bytes | None = None, timeout: float
) -> tuple[int, dict[str, object]]:
    """The status and JSON object of the daemon's answer (empty when it sent none)."""
    headers = {"Accept": "application/json"}
    if body is not None:
        headers["Content-Type"] = "application/json"
    conn = _UnixConnection(os.fspath(socket_path), timeout)
    try:
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            status, answer = response.status, response.read()
        except (FileNotFoundError, ConnectionRefusedError):
            raise DaemonNotRunning from None
        except (OSError, http.client.HTTPException) as exc:
            raise DaemonCallFailed(type(exc).__name__) from None
    finally:
        conn.close()
    try:
        data = orjson.loads(answer)
    except orjson.JSONDecodeError:
        data = {}
    return status, data if isinstance(data, dict) else {}


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
