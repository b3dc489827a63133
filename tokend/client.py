"""For applications: read access tokens from tokend's unix socket.

::

    from tokend.client import TokendAuth, get_token

    token = get_token("alice", socket_path="/run/tokend/tokend.sock", min_valid=30)
    client = httpx.Client(auth=TokendAuth("alice", "/run/tokend/tokend.sock"))

:func:`get_token` and friends use the standard library only (``http.client`` over
``AF_UNIX``). Each call asks tokend with ``min_valid`` (default 0): when tokend holds
no token valid that much longer, it refreshes (at most once per account per
``serve.force_refresh_interval``) and waits up to ``serve.request_wait_max`` before
answering. The socket path defaults to ``$TOKEND_SOCKET``, else ``./run/tokend.sock``.

The ``tokend token`` and ``tokend status`` commands are built on the same calls
(:func:`token_command`, :func:`status_command`).

Nothing here puts a token into an exception or an error message.
"""

from __future__ import annotations

import http.client
import os
import socket
import sys
import time
from collections.abc import AsyncGenerator, Generator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote

import httpx
import orjson

SOCKET_ENV_VAR = "TOKEND_SOCKET"
DEFAULT_SOCKET = Path("run/tokend.sock")
# Longer than the server's default request_wait_max (10 s), so its answer arrives.
DEFAULT_TIMEOUT = 30.0


class TokendError(Exception):
    """tokend did not hand out what was asked. ``status`` is the HTTP status (``None``
    when tokend could not be reached); ``error``, ``state`` and ``last_error`` come
    from tokend's error body. No attribute ever holds a token."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        error: str | None = None,
        state: str | None = None,
        last_error: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.state = state
        self.last_error = last_error


class TokendUnreachable(TokendError):
    """No answer from tokend: the socket is missing, refused, not permitted or slow."""


class TokenUnavailable(TokendError):
    """tokend holds no token valid long enough (503), or refused to refresh yet (429)."""


class UnknownAccount(TokendError):
    """tokend has no such account (404)."""


class Forbidden(TokendError):
    """This process's uid/gid may not read the account's token (403)."""


@dataclass(frozen=True, slots=True)
class Token:
    access_token: str = field(repr=False)
    token_type: str
    expires_at: int
    expires_in: int
    scope: str | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "access_token": self.access_token,
            "token_type": self.token_type,
            "expires_at": self.expires_at,
            "expires_in": self.expires_in,
            "scope": self.scope,
        }


def default_socket_path(environ: Mapping[str, str] | None = None) -> Path:
    """``$TOKEND_SOCKET`` if set, else ``./run/tokend.sock``."""
    env = os.environ if environ is None else environ
    return Path(env[SOCKET_ENV_VAR]) if env.get(SOCKET_ENV_VAR) else DEFAULT_SOCKET


# -- the library -------------------------------------------------------------------------


def get_token(
    account: str,
    socket_path: str | os.PathLike[str] | None = None,
    min_valid: float = 0,
    *,
    timeout: float = DEFAULT_TIMEOUT,
) -> str:
    """The access token of ``account``, valid at least ``min_valid`` more seconds.

    Raises :class:`TokenUnavailable`, :class:`UnknownAccount`, :class:`Forbidden` or
    :class:`TokendUnreachable` (all :class:`TokendError`)."""
    return get_token_info(account, socket_path, min_valid, timeout=timeout).access_token


def get_token_info(
    account: str,
    socket_path: str | os.PathLike[str] | None = None,
    min_valid: float = 0,
    *,
    timeout: float = DEFAULT_TIMEOUT,
) -> Token:
    """Like :func:`get_token`, with the token's type, expiry and scope."""
    target = f"/v1/tokens/{_quote(account)}?min_valid={_seconds(min_valid)}"
    status, body = _request(_socket(socket_path), "GET", target, timeout)
    return _token_or_raise(account, status, body)


def force_refresh(
    account: str,
    socket_path: str | os.PathLike[str] | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
) -> Token:
    """Ask tokend to refresh ``account`` now (the current token was rejected) and
    return the new token. Within ``serve.force_refresh_interval`` of the previous
    forced refresh, tokend refuses (:class:`TokenUnavailable` with status 429): the
    token it holds is then most likely already the new one."""
    status, body = _request(
        _socket(socket_path), "POST", f"/v1/tokens/{_quote(account)}/refresh", timeout
    )
    return _token_or_raise(account, status, body)


def list_accounts(
    socket_path: str | os.PathLike[str] | None = None, *, timeout: float = DEFAULT_TIMEOUT
) -> list[dict[str, Any]]:
    """Every account's state as tokend reports it (``GET /v1/accounts``); no tokens."""
    status, body = _request(_socket(socket_path), "GET", "/v1/accounts", timeout)
    if status != 200:
        raise _error_for("accounts", status, body)
    accounts: list[dict[str, Any]] = orjson.loads(body)["accounts"]
    return accounts


class TokendAuth(httpx.Auth):
    """``httpx`` authentication with ``account``'s token from tokend.

    Adds ``Authorization: <token_type> <token>`` to each request. When the server
    answers 401, asks tokend for a refresh once and retries with the new token; if
    tokend has no newer token (or refuses), the 401 response is returned as it is.
    Works with ``httpx.Client`` and ``httpx.AsyncClient`` (the socket call then runs
    in a worker thread)."""

    def __init__(
        self,
        account: str,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        min_valid: float = 0,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.account = account
        self.socket_path = _socket(socket_path)
        self.min_valid = min_valid
        self.timeout = timeout

    def _current(self) -> Token:
        return get_token_info(self.account, self.socket_path, self.min_valid, timeout=self.timeout)

    def _replacement(self, rejected: Token) -> Token | None:
        """A token other than ``rejected``, if tokend has or can get one."""
        try:
            candidate = force_refresh(self.account, self.socket_path, timeout=self.timeout)
        except TokenUnavailable as exc:
            if exc.status != 429:
                return None
            # Refused as too soon after another refresh: that one's token may be new.
            try:
                candidate = self._current()
            except TokendError:
                return None
        except TokendError:
            return None
        # Some IdPs hand out the same access token again: retrying it would only fail.
        return candidate if candidate.access_token != rejected.access_token else None

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        # Read the body up front, so the request can be sent again after a 401.
        request.read()
        token = self._current()
        _authorize(request, token)
        response = yield request
        if response.status_code == 401:
            replacement = self._replacement(token)
            if replacement is not None:
                _authorize(request, replacement)
                yield request

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        import anyio.to_thread

        await request.aread()
        token = await anyio.to_thread.run_sync(self._current)
        _authorize(request, token)
        response = yield request
        if response.status_code == 401:
            replacement = await anyio.to_thread.run_sync(self._replacement, token)
            if replacement is not None:
                _authorize(request, replacement)
                yield request


def _authorize(request: httpx.Request, token: Token) -> None:
    # RFC 6750 names the scheme "Bearer"; IdPs often send token_type in lower case.
    scheme = "Bearer" if token.token_type.lower() == "bearer" else token.token_type
    request.headers["Authorization"] = f"{scheme} {token.access_token}"


# -- the wire ---------------------------------------------------------------------------------


class _UnixHTTPConnection(http.client.HTTPConnection):
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


def _socket(path: str | os.PathLike[str] | None) -> str:
    return os.fspath(path) if path is not None else os.fspath(default_socket_path())


def _quote(account: str) -> str:
    return quote(account, safe="")


def _seconds(value: float) -> str:
    if value < 0:
        raise ValueError("min_valid cannot be negative")
    return f"{value:.6f}".rstrip("0").rstrip(".")


def _request(path: str, method: str, target: str, timeout: float) -> tuple[int, bytes]:
    conn = _UnixHTTPConnection(path, timeout)
    try:
        conn.request(method, target, headers={"Accept": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    except (FileNotFoundError, ConnectionRefusedError):
        raise TokendUnreachable(
            f"tokend is not running at {path} (no socket, or nobody listening on it)"
        ) from None
    except PermissionError:
        raise TokendUnreachable(
            f"permission denied on {path}: this user needs access to the socket "
            "(see serve.socket_mode)"
        ) from None
    except TimeoutError:
        raise TokendUnreachable(f"no answer from tokend at {path} within {timeout:g}s") from None
    except (OSError, http.client.HTTPException) as exc:
        raise TokendUnreachable(
            f"talking to tokend at {path} failed: {type(exc).__name__}"
        ) from None
    finally:
        conn.close()


def _token_or_raise(account: str, status: int, body: bytes) -> Token:
    if status != 200:
        raise _error_for(account, status, body)
    data = orjson.loads(body)
    return Token(
        access_token=data["access_token"],
        token_type=data["token_type"],
        expires_at=data["expires_at"],
        expires_in=data["expires_in"],
        scope=data.get("scope"),
    )


def _error_for(subject: str, status: int, body: bytes) -> TokendError:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = {}
    if not isinstance(data, dict):
        data = {}
    error = data.get("error")
    state = data.get("state")
    last_error = data.get("last_error")
    fields: dict[str, Any] = {
        "status": status,
        "error": error,
        "state": state,
        "last_error": last_error,
    }
    if status == 404 and error == "unknown_account":
        return UnknownAccount(f"unknown account {subject!r}", **fields)
    if status == 403:
        return Forbidden(
            f"account {subject!r}: this uid/gid may not read its token (see the account's "
            "allow: setting)",
            **fields,
        )
    if status == 429:
        retry = data.get("retry_after")
        return TokenUnavailable(
            f"account {subject!r}: refreshed moments ago; try again in {retry}s", **fields
        )
    if status == 503 and state is not None:
        why = f" ({last_error})" if last_error else ""
        return TokenUnavailable(
            f"account {subject!r}: no valid token (state {state}){why}", **fields
        )
    return TokendError(f"{subject}: tokend answered {status} {error or ''}".rstrip(), **fields)


# -- the commands (tokend token, tokend status) ---------------------------------------------


def resolve_socket_path(
    socket_arg: str | None,
    config_arg: str | None,
    environ: Mapping[str, str] | None = None,
) -> Path:
    """Which socket the commands talk to: ``--socket``; else ``serve.socket`` of the
    config file (``-c``, else ``$TOKEND_CONFIG``, else ``./config.yaml`` if it exists);
    else ``$TOKEND_SOCKET``; else ``./run/tokend.sock``.

    Raises :class:`ValueError` (with a one-line message) when a config file that is
    named or found cannot be loaded, or sets no socket."""
    env = os.environ if environ is None else environ
    if socket_arg:
        return Path(socket_arg)
    from tokend.config import ConfigError, load_config, resolve_config_path

    config_path = resolve_config_path(config_arg, env)
    named = bool(config_arg or env.get("TOKEND_CONFIG"))
    if named or config_path.exists():
        try:
            config = load_config(config_path, environ=env)
        except ConfigError as exc:
            first = exc.errors[0] if exc.errors else "invalid"
            raise ValueError(
                f"{config_path}: cannot read serve.socket ({first}); pass --socket PATH"
            ) from None
        if config.serve.socket is None:
            raise ValueError(f"{config_path}: serve.socket is not set; pass --socket PATH")
        return config.serve.socket
    return default_socket_path(env)


# Exit codes of the commands.
EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE = 0, 1, 2


def token_command(
    account: str,
    *,
    socket_arg: str | None,
    config_arg: str | None,
    min_valid: float,
    as_json: bool,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """``tokend token``: the raw token (or its JSON) on stdout; one line on stderr and
    exit 1 when it is unavailable, 2 for usage errors, unknown accounts and refusals."""
    out = out or sys.stdout
    err = err or sys.stderr
    path = _socket_or_report(socket_arg, config_arg, err)
    if path is None:
        return EXIT_USAGE
    try:
        token = get_token_info(account, path, min_valid)
    except (UnknownAccount, Forbidden) as exc:
        print(f"tokend: {exc}", file=err)
        return EXIT_USAGE
    except TokendError as exc:
        print(f"tokend: {exc}", file=err)
        return EXIT_UNAVAILABLE
    if as_json:
        out.write(orjson.dumps(token.as_dict()).decode() + "\n")
    else:
        out.write(token.access_token + "\n")
    return EXIT_OK


def _socket_or_report(socket_arg: str | None, config_arg: str | None, err: TextIO) -> Path | None:
    """The socket to use, or None after saying on ``err`` why there is none."""
    try:
        return resolve_socket_path(socket_arg, config_arg)
    except ValueError as exc:
        print(f"tokend: {exc}", file=err)
        return None


def status_command(
    *,
    socket_arg: str | None,
    config_arg: str | None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """``tokend status``: a table of every account's state; exit 1 if tokend cannot be
    reached."""
    out = out or sys.stdout
    err = err or sys.stderr
    path = _socket_or_report(socket_arg, config_arg, err)
    if path is None:
        return EXIT_USAGE
    try:
        accounts = list_accounts(path)
    except TokendError as exc:
        print(f"tokend: {exc}", file=err)
        return EXIT_UNAVAILABLE
    out.write(format_status(accounts, time.time()))
    return EXIT_OK


_LAST_ERROR_WIDTH = 60


def format_status(accounts: list[dict[str, Any]], now: float) -> str:
    """The ``tokend status`` table."""
    header = (
        "ACCOUNT",
        "PROVIDER",
        "STATE",
        "EXPIRES IN",
        "LAST REFRESH",
        "NEXT REFRESH",
        "LAST ERROR",
    )
    rows = [header]
    for a in accounts:
        expires_at = a.get("expires_at")
        rows.append(
            (
                str(a.get("name", "")),
                str(a.get("provider", "")),
                str(a.get("state", "")),
                _expires_in(expires_at, now),
                _ago(a.get("last_refresh_at"), now),
                _until(a.get("next_refresh_at"), now),
                _truncate(a.get("last_error") or "-", _LAST_ERROR_WIDTH),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = []
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines) + "\n"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _expires_in(ts: float | None, now: float) -> str:
    if ts is None:
        return "-"
    if ts <= now:
        return f"expired {_duration(now - ts)} ago"
    return _duration(ts - now)


def _ago(ts: float | None, now: float) -> str:
    return "-" if ts is None else f"{_duration(max(0.0, now - ts))} ago"


def _until(ts: float | None, now: float) -> str:
    if ts is None:
        return "-"
    return "now" if ts <= now else f"in {_duration(ts - now)}"


def _truncate(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."
