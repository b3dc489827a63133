"""For applications: read access tokens from tokend's unix socket or its token files.

::

    from tokend.client import TokendAuth, get_token

    token = get_token("alice", socket_path="/run/tokend/tokend.sock", min_valid=30)
    client = httpx.Client(auth=TokendAuth("alice", "/run/tokend/tokend.sock"))
    session.auth = TokendRequestsAuth("alice", "/run/tokend/tokend.sock")  # requests

This module uses the standard library only, and imports nothing from the rest of
tokend: importing it costs an application a few milliseconds, and it is also
distributed on its own as ``tokend-client`` (module ``tokend_client``).
:class:`TokendAuth` imports httpx and :class:`TokendRequestsAuth` imports requests,
each on first use.

**Where tokens come from.** By default from the socket: ``socket_path``, else
``$TOKEND_SOCKET``, else ``./run/tokend.sock``. Each request carries ``min_valid``
(default 0): when tokend holds no token valid that much longer, it refreshes (at most
once per account per ``serve.force_refresh_interval``) and waits up to
``serve.request_wait_max`` before answering. With ``token_dir`` (or
``$TOKEND_TOKEN_DIR`` when no socket is named), tokens are read from
``TOKEN_DIR/ACCOUNT/token.json`` instead, which needs no socket but cannot ask for a
refresh.

**Caching.** A token read from the socket is kept in the process, and a background
thread (one per socket and account, a daemon thread) holds a long-poll open on tokend
(``GET /v1/tokens/ACCOUNT?after=VERSION``): tokend answers it the moment it commits
the account's next token, and the thread puts that token in the cache. So the cached
token is handed out, without asking tokend, for as long as it stays valid for
``min_valid``, and it is replaced when tokend has a new one, not on a timer. While the
thread is not connected (tokend restarting, too many waiters), a cached token is used
only while it stays valid for ``min_valid`` plus a margin (half the validity it had
when it was fetched, at most 60 s), as tokend refreshes well before that point. The
thread ends after ten minutes without a request for the account. Token files are
read each time (never cached). :func:`force_refresh` replaces the cached token;
``cache=False`` always asks.

Nothing here puts a token into an exception, a message or a ``repr``.
"""

from __future__ import annotations

import json
import os
import select
import socket
import threading
import time

# Imports for annotations only: typing, dataclasses, pathlib and urllib would double
# what this module costs to import.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import Any, TypeAlias

    PathArg: TypeAlias = str | os.PathLike[str] | None

__all__ = [
    "DEFAULT_SOCKET",
    "SOCKET_ENV_VAR",
    "TOKEN_DIR_ENV_VAR",
    "Forbidden",
    "Token",
    "TokenUnavailable",
    "TokendError",
    "TokendUnreachable",
    "UnknownAccount",
    "clear_cache",
    "default_socket_path",
    "force_refresh",
    "get_token",
    "get_token_info",
    "list_accounts",
    "read_token_file",
]

SOCKET_ENV_VAR = "TOKEND_SOCKET"
TOKEN_DIR_ENV_VAR = "TOKEND_TOKEN_DIR"
DEFAULT_SOCKET = "run/tokend.sock"
# Longer than the server's default request_wait_max (10 s), so its answer arrives.
DEFAULT_TIMEOUT = 30.0
# The longest a cached token is kept past the point where tokend would be asked again.
CACHE_MARGIN_MAX = 60.0
# /v1/accounts for 100,000 accounts is ~25 MB; anything far beyond is not tokend.
_MAX_BODY = 256 * 1024 * 1024
_MAX_HEAD = 64 * 1024


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


class Token:
    """An access token as tokend hands it out (its ``repr`` leaves the token out)."""

    __slots__ = (
        "access_token",
        "expires_at",
        "expires_in",
        "fetched_at",
        "scope",
        "token_type",
        "version",
    )

    def __init__(
        self,
        access_token: str,
        token_type: str,
        expires_at: int,
        expires_in: int,
        scope: str | None,
        fetched_at: float = 0.0,
        version: int | None = None,
    ) -> None:
        self.access_token = access_token
        self.token_type = token_type
        self.expires_at = expires_at
        self.expires_in = expires_in
        self.scope = scope
        # When this process received it (time.time()); 0 when unknown.
        self.fetched_at = fetched_at
        # tokend's version of the token (grows with each new one); None when unknown.
        self.version = version

    def __repr__(self) -> str:
        return (
            f"Token(token_type={self.token_type!r}, expires_at={self.expires_at!r}, "
            f"expires_in={self.expires_in!r}, scope={self.scope!r})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Token):
            return NotImplemented
        return self.as_dict() == other.as_dict()

    def as_dict(self) -> dict[str, Any]:
        return {
            "access_token": self.access_token,
            "token_type": self.token_type,
            "expires_at": self.expires_at,
            "expires_in": self.expires_in,
            "scope": self.scope,
        }

    @property
    def authorization(self) -> str:
        """The ``Authorization`` header value for this token."""
        # RFC 6750 names the scheme "Bearer"; IdPs often send token_type in lower case.
        scheme = "Bearer" if self.token_type.lower() == "bearer" else self.token_type
        return f"{scheme} {self.access_token}"


def default_socket_path(environ: Mapping[str, str] | None = None) -> str:
    """``$TOKEND_SOCKET`` if set, else ``run/tokend.sock``."""
    env = os.environ if environ is None else environ
    return env.get(SOCKET_ENV_VAR) or DEFAULT_SOCKET


# -- the library -------------------------------------------------------------------------


def get_token(
    account: str,
    socket_path: PathArg = None,
    min_valid: float = 0,
    *,
    token_dir: PathArg = None,
    timeout: float = DEFAULT_TIMEOUT,
    cache: bool = True,
) -> str:
    """The access token of ``account``, valid at least ``min_valid`` more seconds.

    Raises :class:`TokenUnavailable`, :class:`UnknownAccount`, :class:`Forbidden` or
    :class:`TokendUnreachable` (all :class:`TokendError`)."""
    return get_token_info(
        account, socket_path, min_valid, token_dir=token_dir, timeout=timeout, cache=cache
    ).access_token


def get_token_info(
    account: str,
    socket_path: PathArg = None,
    min_valid: float = 0,
    *,
    token_dir: PathArg = None,
    timeout: float = DEFAULT_TIMEOUT,
    cache: bool = True,
) -> Token:
    """Like :func:`get_token`, with the token's type, expiry and scope."""
    seconds = _seconds(min_valid)
    directory = _token_dir(socket_path, token_dir)
    key = ("file:" + directory, account) if directory else (_socket(socket_path), account)
    if cache and (cached := _cached(key, min_valid)) is not None:
        _watch(key)
        return cached
    if directory:
        token = read_token_file(account, directory)
        if token.expires_at - time.time() < min_valid:
            raise TokenUnavailable(
                f"account {account!r}: the token file's token is valid for less than "
                f"{seconds}s (token files cannot ask for a refresh; use the socket)",
                status=None,
                error="token_unavailable",
            )
    else:
        target = f"/v1/tokens/{_quote(account)}?min_valid={seconds}"
        status, body = _request(key[0], "GET", target, timeout)
        token = _token_or_raise(account, status, body)
    _remember(key, token)
    if cache and not directory:
        _watch(key)
    return token


def read_token_file(account: str, token_dir: str | os.PathLike[str]) -> Token:
    """The token in ``TOKEN_DIR/ACCOUNT/token.json`` (never cached).

    Raises :class:`TokenUnavailable` when there is no such file (an unknown account,
    or one that never had a token), or it says the token expired, or is unreadable."""
    path = os.path.join(token_dir, account, "token.json")
    try:
        with open(path, "rb") as file:
            data = json.loads(file.read())
    except FileNotFoundError:
        raise TokenUnavailable(
            f"account {account!r}: no token file at {path} (no such account, or no token yet)"
        ) from None
    except (OSError, ValueError) as exc:
        # The decode error's text can quote the file's content: name its type only.
        raise TokenUnavailable(
            f"account {account!r}: cannot read {path}: {type(exc).__name__}"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("access_token"), str):
        raise TokenUnavailable(
            f"account {account!r}: {path} holds no valid token (it expired, or no refresh "
            "succeeded yet)",
            error="token_unavailable",
        )
    try:
        token = _token_from(data)
    except (KeyError, TypeError, ValueError):
        raise TokenUnavailable(f"account {account!r}: {path} is not a token file") from None
    if token.expires_at <= time.time():
        raise TokenUnavailable(f"account {account!r}: the token in {path} has expired")
    return token


def force_refresh(
    account: str,
    socket_path: PathArg = None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
) -> Token:
    """Ask tokend to refresh ``account`` now (the current token was rejected) and
    return the new token, which also replaces the cached one. Within
    ``serve.force_refresh_interval`` of the previous forced refresh, tokend refuses
    (:class:`TokenUnavailable` with status 429): the token it holds is then most likely
    already the new one."""
    path = _socket(socket_path)
    status, body = _request(path, "POST", f"/v1/tokens/{_quote(account)}/refresh", timeout)
    token = _token_or_raise(account, status, body)
    _remember((path, account), token)
    return token


def list_accounts(
    socket_path: PathArg = None, *, timeout: float = DEFAULT_TIMEOUT
) -> list[dict[str, Any]]:
    """Every account's state as tokend reports it (``GET /v1/accounts``); no tokens."""
    status, body = _request(_socket(socket_path), "GET", "/v1/accounts", timeout)
    if status != 200:
        raise _error_for("accounts", status, body)
    accounts: list[dict[str, Any]] = json.loads(body)["accounts"]
    return accounts


def clear_cache() -> None:
    """Forget every cached token (the watching threads end at their next answer)."""
    with _cache_lock:
        _cache.clear()
        for watch in _watches.values():
            watch.stopped = True
        _watches.clear()


# -- the cache --------------------------------------------------------------------------------

_cache: dict[tuple[str, str], Token] = {}
_cache_lock = threading.Lock()
# Long-polls kept open on tokend, one per (socket, account) with a cached token.
_watches: dict[tuple[str, str], _Watch] = {}
# How long one long-poll waits for the next token (tokend answers by then anyway);
# how long a watch goes on without anyone asking for the account's token; and the
# longest pause between attempts while tokend cannot be reached.
WATCH_WAIT = 60.0
WATCH_IDLE = 600.0
_WATCH_RETRY_MAX = 30.0


def _cached(key: tuple[str, str], min_valid: float) -> Token | None:
    with _cache_lock:
        token = _cache.get(key)
        watch = _watches.get(key)
    if token is None:
        return None
    now = time.time()
    if watch is not None and watch.waiting():
        # tokend tells the watch of the next token the moment it has it.
        return token if token.expires_at - now >= min_valid else None
    margin = min(CACHE_MARGIN_MAX, max(0.0, token.expires_at - token.fetched_at) / 2)
    return token if token.expires_at - now >= min_valid + margin else None


def _remember(key: tuple[str, str], token: Token) -> None:
    with _cache_lock:
        current = _cache.get(key)
        # A long-poll's answer and a direct read may cross: keep the newer token.
        if current is None or (current.version or 0) <= (token.version or 0):
            _cache[key] = token


def _watch(key: tuple[str, str]) -> None:
    """Make sure a thread keeps ``key``'s cached token current."""
    with _cache_lock:
        watch = _watches.get(key)
        if watch is not None:
            watch.used_at = time.monotonic()
            return
        if key in _unwatchable:
            return
        watch = _watches[key] = _Watch(key)
    thread = threading.Thread(target=watch.run, name=f"tokend-watch-{key[1]}", daemon=True)
    thread.start()


# Accounts tokend would not let this process wait on (an older tokend, 403, 404).
_unwatchable: set[tuple[str, str]] = set()


class _Watch:
    """Keeps one cached token current: long-polls tokend for each new token."""

    __slots__ = ("conn", "key", "live", "stopped", "used_at")

    def __init__(self, key: tuple[str, str]) -> None:
        self.key = key
        # True while a long-poll is out for the version in the cache: a new token
        # would reach the cache without anyone asking.
        self.live = False
        self.conn: socket.socket | None = None
        self.stopped = False
        self.used_at = time.monotonic()

    def waiting(self) -> bool:
        """Whether the long-poll is out and nothing has come back on it: not its
        answer, nor the end of the connection (tokend stopped)."""
        conn = self.conn
        if not self.live or conn is None:
            return False
        try:
            readable, _, _ = select.select([conn], [], [], 0)
        except (OSError, ValueError):
            return False
        return not readable

    def run(self) -> None:
        path, account = self.key
        retry = 0.5
        try:
            while not self.stopped and time.monotonic() - self.used_at < WATCH_IDLE:
                with _cache_lock:
                    cached = _cache.get(self.key)
                if cached is None or cached.version is None:
                    return  # nothing to keep current (or a tokend without versions)
                target = f"/v1/tokens/{_quote(account)}?after={cached.version}&wait={WATCH_WAIT:g}s"
                self.live = True
                try:
                    status, body = _exchange(path, "GET", target, WATCH_WAIT + 15.0, self)
                except (OSError, ValueError):
                    status, body = 0, b""
                self.conn = None
                if status == 200:
                    try:
                        token = _token_from(json.loads(body))
                    except (KeyError, TypeError, ValueError):
                        return
                    _remember(self.key, token)
                    retry = 0.5
                    continue
                self.live = False
                if status in (400, 403, 404):
                    with _cache_lock:
                        _unwatchable.add(self.key)
                    return
                if status == 503 and b'"too_many_waiters"' not in body:
                    continue  # the wait ended with no valid token: wait for the next
                time.sleep(retry)
                retry = min(retry * 2, _WATCH_RETRY_MAX)
        finally:
            self.live = False
            with _cache_lock:
                if _watches.get(self.key) is self:
                    del _watches[self.key]


def _forget_watches_in_child() -> None:
    # A forked child has none of its parent's threads.
    _watches.clear()
    global _cache_lock
    _cache_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_watches_in_child)


# -- HTTP authentication ----------------------------------------------------------------------


class _Credentials:
    """An account's token for an HTTP client, and a replacement after a 401."""

    def __init__(self, account: str, socket_path: PathArg, min_valid: float, timeout: float):
        self.account = account
        self.socket_path = _socket(socket_path)
        self.min_valid = min_valid
        self.timeout = timeout

    def current(self, *, cache: bool = True) -> Token:
        return get_token_info(
            self.account, self.socket_path, self.min_valid, timeout=self.timeout, cache=cache
        )

    def replacement(self, rejected: Token) -> Token | None:
        """A token other than ``rejected``, if tokend has or can get one."""
        try:
            candidate = force_refresh(self.account, self.socket_path, timeout=self.timeout)
        except TokenUnavailable as exc:
            if exc.status != 429:
                return None
            # Refused as too soon after another refresh: that one's token may be new.
            try:
                candidate = self.current(cache=False)
            except TokendError:
                return None
        except TokendError:
            return None
        # Some IdPs hand out the same access token again: retrying it would only fail.
        return candidate if candidate.access_token != rejected.access_token else None


def _define_httpx_auth() -> type:
    import httpx

    class TokendAuth(httpx.Auth):
        """``httpx`` authentication with ``account``'s token from tokend.

        Adds ``Authorization: <token_type> <token>`` to each request. When the server
        answers 401, asks tokend for a refresh once and retries with the new token; if
        tokend has no newer token (or refuses), the 401 response is returned as it is.
        Works with ``httpx.Client`` and ``httpx.AsyncClient`` (the socket call then
        runs in a worker thread)."""

        def __init__(
            self,
            account: str,
            socket_path: PathArg = None,
            *,
            min_valid: float = 0,
            timeout: float = DEFAULT_TIMEOUT,
        ) -> None:
            self._credentials = _Credentials(account, socket_path, min_valid, timeout)
            self.account = account
            self.socket_path = self._credentials.socket_path

        def _replacement(self, rejected: Token) -> Token | None:
            return self._credentials.replacement(rejected)

        def sync_auth_flow(self, request: httpx.Request) -> Any:
            # Read the body up front, so the request can be sent again after a 401.
            request.read()
            token = self._credentials.current()
            request.headers["Authorization"] = token.authorization
            response = yield request
            if response.status_code == 401:
                replacement = self._replacement(token)
                if replacement is not None:
                    request.headers["Authorization"] = replacement.authorization
                    yield request

        async def async_auth_flow(self, request: httpx.Request) -> Any:
            import anyio.to_thread

            await request.aread()
            token = await anyio.to_thread.run_sync(self._credentials.current)
            request.headers["Authorization"] = token.authorization
            response = yield request
            if response.status_code == 401:
                replacement = await anyio.to_thread.run_sync(self._replacement, token)
                if replacement is not None:
                    request.headers["Authorization"] = replacement.authorization
                    yield request

    return TokendAuth


def _define_requests_auth() -> type:
    import requests
    import requests.auth

    class TokendRequestsAuth(requests.auth.AuthBase):
        """``requests`` authentication with ``account``'s token from tokend
        (``session.auth = TokendRequestsAuth("alice")``).

        Adds the ``Authorization`` header; on a 401, asks tokend for a refresh once
        and sends the request again with the new token (when its body can be sent
        again: bytes, or a file that can seek). Otherwise the 401 is returned."""

        def __init__(
            self,
            account: str,
            socket_path: PathArg = None,
            *,
            min_valid: float = 0,
            timeout: float = DEFAULT_TIMEOUT,
        ) -> None:
            self._credentials = _Credentials(account, socket_path, min_valid, timeout)
            self.account = account
            self.socket_path = self._credentials.socket_path

        def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
            token = self._credentials.current()
            request.headers["Authorization"] = token.authorization
            # A file body is sent again from where it started; bytes are simply resent.
            body: Any = request.body
            position = body.tell() if hasattr(body, "tell") and hasattr(body, "seek") else None
            hooks: Any = request
            hooks.register_hook("response", self._retry_once(token, position))
            return request

        def _retry_once(
            self, token: Token, position: int | None
        ) -> Callable[..., requests.Response]:
            def on_response(response: requests.Response, **kwargs: Any) -> requests.Response:
                sent = response.request
                body: Any = sent.body
                if response.status_code != 401:
                    return response
                if body is not None and not isinstance(body, bytes | str) and position is None:
                    return response  # a stream that cannot be sent again
                replacement = self._credentials.replacement(token)
                if replacement is None:
                    return response
                response.content  # noqa: B018 - read it, so the connection can be reused
                response.close()
                again = sent.copy()
                if position is not None:
                    body.seek(position)
                again.headers["Authorization"] = replacement.authorization
                retried: requests.Response = response.connection.send(again, **kwargs)
                retried.history.append(response)
                retried.request = again
                return retried

            return on_response

    return TokendRequestsAuth


_LAZY: dict[str, Callable[[], type]] = {
    "TokendAuth": _define_httpx_auth,
    "TokendRequestsAuth": _define_requests_auth,
}


def __getattr__(name: str) -> Any:
    # The HTTP client libraries are imported only by applications that use them.
    define = _LAZY.get(name)
    if define is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    cls = define()
    globals()[name] = cls
    return cls


# -- the wire ---------------------------------------------------------------------------------


def _socket(path: PathArg) -> str:
    return os.fspath(path) if path is not None else default_socket_path()


def _token_dir(socket_path: PathArg, token_dir: PathArg) -> str | None:
    if token_dir is not None:
        return os.fspath(token_dir)
    if socket_path is None and not os.environ.get(SOCKET_ENV_VAR):
        return os.environ.get(TOKEN_DIR_ENV_VAR) or None
    return None


_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def _quote(account: str) -> str:
    """``account`` as one URL path segment (percent-encoded UTF-8)."""
    return "".join(
        chr(b) if b in _UNRESERVED else f"%{b:02X}" for b in account.encode("utf-8", "replace")
    )


def _seconds(value: float) -> str:
    if value < 0:
        raise ValueError("min_valid cannot be negative")
    return f"{value:.6f}".rstrip("0").rstrip(".")


def _request(path: str, method: str, target: str, timeout: float) -> tuple[int, bytes]:
    """One HTTP/1.1 exchange over the unix socket at ``path``: (status, body)."""
    try:
        return _exchange(path, method, target, timeout)
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
    except (OSError, ValueError) as exc:
        raise TokendUnreachable(
            f"talking to tokend at {path} failed: {type(exc).__name__}"
        ) from None


def _exchange(
    path: str, method: str, target: str, timeout: float, watch: _Watch | None = None
) -> tuple[int, bytes]:
    # A small client of its own: http.client would cost an import of email and ssl.
    deadline = time.monotonic() + timeout
    lines = [f"{method} {target} HTTP/1.1", "Host: tokend", "Accept: application/json"]
    if method == "POST":
        lines.append("Content-Length: 0")
    request = ("\r\n".join([*lines, "Connection: close", "", ""])).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(request)
        if watch is not None:
            watch.conn = sock
        buffer = bytearray()
        while (end := buffer.find(b"\r\n\r\n")) < 0:
            if len(buffer) > _MAX_HEAD:
                raise ValueError("response head too large")
            buffer += _receive(sock, deadline)
        head = bytes(buffer[:end]).decode("latin-1").split("\r\n")
        parts = head[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise ValueError("not an HTTP response")
        length = None
        for line in head[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
        if length is None or not 0 <= length <= _MAX_BODY:
            raise ValueError("response without a usable Content-Length")
        body = buffer[end + 4 :]
        while len(body) < length:
            body += _receive(sock, deadline)
        return int(parts[1]), bytes(body[:length])


def _receive(sock: socket.socket, deadline: float) -> bytes:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError
    sock.settimeout(remaining)
    chunk = sock.recv(65536)
    if not chunk:
        raise ConnectionResetError("tokend closed the connection mid-response")
    return chunk


def _token_from(data: Mapping[str, Any]) -> Token:
    return Token(
        access_token=str(data["access_token"]),
        token_type=str(data["token_type"]),
        expires_at=int(data["expires_at"]),
        expires_in=int(data["expires_in"]),
        scope=data.get("scope"),
        fetched_at=time.time(),
        version=data.get("version") if isinstance(data.get("version"), int) else None,
    )


def _token_or_raise(account: str, status: int, body: bytes) -> Token:
    if status != 200:
        raise _error_for(account, status, body)
    return _token_from(json.loads(body))


def _error_for(subject: str, status: int, body: bytes) -> TokendError:
    try:
        data = json.loads(body)
    except ValueError:
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
