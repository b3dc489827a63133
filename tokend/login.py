"""``tokend login``: sign in once, and the refresh token becomes the account's seed.

Two ways to sign in:

* the authorization code grant with PKCE S256 and a loopback redirect (RFC 8252): a
  one-shot HTTP listener on ``127.0.0.1`` (any free port unless ``--port``) receives
  the redirect; the URL to open is printed, and opened in a browser when there is a
  display (or ``$BROWSER``);
* ``--device``, the device authorization grant (RFC 8628) for hosts without a
  browser: a code to enter on another device, then polling at the server's interval.

Where the new refresh token goes: when the account's daemon is running (its socket
answers), it is handed over the socket (``PUT /v1/accounts/NAME/seed``; the daemon
commits it, clears needs_reauth and refreshes at once). Otherwise it is written to
the account's ``refresh_token_file`` (when the seed lives there) and to the store
directly. The token is never printed.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import webbrowser
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO
from urllib.parse import quote

import anyio
import anyio.abc
import orjson

from tokend._daemon_call import DaemonCallFailed, DaemonNotRunning, call_daemon
from tokend.config import AccountConfig, AccountNotLoaded, Config, load_account
from tokend.oauth import ProviderClient, ProviderSetupError, TokenFailure, TokenResponse
from tokend.oauth._authorize import (
    AuthorizationError,
    PollAgain,
    authorization_request,
    code_from_redirect,
    device_poll_step,
    parse_device_authorization,
    token_with_refresh,
)
from tokend.oauth._discovery import DiscoveryError

DEFAULT_LOGIN_SCOPE = "openid offline_access"
REDIRECT_PATH = "/callback"
# Bounds on the loopback listener: one request head, read within a few seconds.
_MAX_REDIRECT_HEAD = 16 * 1024
_REDIRECT_READ_TIMEOUT = 10.0
# The daemon commits the seed, then refreshes (bounded by its serve.request_wait_max).
_HANDOFF_TIMEOUT = 60.0

Sleep = Callable[[float], Awaitable[None]]


class LoginError(Exception):
    """Login failed; the message says why and what to do."""


# -- the command ---------------------------------------------------------------------------


def login_command(
    account: str,
    *,
    config_arg: str | None,
    device: bool,
    open_browser: bool,
    port: int,
    scope: str | None,
    timeout: float,
    err: TextIO = sys.stderr,
) -> int:
    """``tokend login``: 0 when the account holds the new seed, 1 when signing in
    failed, 2 for a bad config or an unknown account."""
    try:
        config, aconf = load_account(account, config_arg)
    except AccountNotLoaded as exc:
        print(str(exc), file=err)
        return 2
    if aconf.grant != "refresh_token":
        print(
            f"account {account!r} uses grant {aconf.grant}: it needs no sign-in",
            file=err,
        )
        return 2
    try:
        message = anyio.run(
            _login,
            config,
            account,
            aconf,
            _Options(
                device,
                open_browser,
                port,
                scope
                or aconf.scope
                or config.providers[aconf.provider].login_scope
                or DEFAULT_LOGIN_SCOPE,
                timeout,
            ),
            err,
        )
    except (LoginError, AuthorizationError) as exc:
        print(f"tokend login {account}: {exc}", file=err)
        return 1
    except KeyboardInterrupt:
        print(f"tokend login {account}: interrupted; nothing was changed", file=err)
        return 1
    print(f"tokend login {account}: {message}", file=err)
    return 0


@dataclass(frozen=True, slots=True)
class _Options:
    device: bool
    open_browser: bool
    port: int
    scope: str
    # Longest wait for the browser's redirect, in seconds.
    wait: float


async def _login(
    config: Config,
    name: str,
    aconf: AccountConfig,
    options: _Options,
    err: TextIO,
) -> str:
    pconf = config.providers[aconf.provider]
    try:
        client = ProviderClient(aconf.provider, pconf)
    except ProviderSetupError as exc:
        raise LoginError(str(exc)) from None
    async with client:
        if options.device:
            token = await device_login(client, options.scope, show=_printer(err))
        else:
            token = await browser_login(
                client,
                options.scope,
                port=options.port,
                wait=options.wait,
                issuer=pconf.issuer,
                extra={**pconf.extra_params, **pconf.authorize_params},
                show=_printer(err),
                open_url=_open_in_browser if options.open_browser and _has_browser() else None,
            )
    assert token.refresh_token is not None
    return await deliver_seed(config, name, aconf, token.refresh_token)


def _printer(err: TextIO) -> Callable[[str], None]:
    def show(text: str) -> None:
        print(text, file=err, flush=True)

    return show


def _has_browser() -> bool:
    """Whether a browser can be opened here: a display, ``$BROWSER``, or macOS."""
    env = os.environ
    return bool(env.get("BROWSER") or env.get("DISPLAY") or env.get("WAYLAND_DISPLAY")) or (
        sys.platform == "darwin"
    )


def _open_in_browser(url: str) -> None:
    # A thread of its own: some browsers' launchers block until the browser exits.
    threading.Thread(target=webbrowser.open, args=(url,), daemon=True).start()


# -- the authorization code grant with a loopback redirect ---------------------------------


async def browser_login(
    client: ProviderClient,
    scope: str,
    *,
    port: int = 0,
    wait: float = 300.0,
    issuer: str | None = None,
    extra: dict[str, str] | None = None,
    show: Callable[[str], None] = print,
    open_url: Callable[[str], None] | None = None,
) -> TokenResponse:
    """Sign in with the authorization code grant (PKCE S256, loopback redirect)."""
    try:
        endpoint = await client.endpoint("authorization_endpoint")
    except DiscoveryError as exc:
        raise LoginError(f"{exc} (use --device if the provider supports it)") from None
    try:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=port)
    except OSError as exc:
        raise LoginError(
            f"cannot listen on 127.0.0.1:{port} for the redirect: {exc.strerror or exc}"
        ) from None
    async with listener:
        bound = listener.extra(anyio.abc.SocketAttribute.local_port)
        redirect_uri = f"http://127.0.0.1:{bound}{REDIRECT_PATH}"
        request = authorization_request(
            endpoint,
            client_id=client.client_id,
            redirect_uri=redirect_uri,
            scope=scope,
            extra=extra,
        )
        show(f"Open this URL in a browser to sign in (waiting up to {wait:g} s):\n")
        show(f"  {request.url}\n")
        if open_url is not None:
            open_url(request.url)
        redirect = _Redirect(request.state, issuer)
        with anyio.move_on_after(wait):
            async with anyio.create_task_group() as group:
                redirect.cancel = group.cancel_scope.cancel
                await listener.serve(redirect.handle, group)
        if redirect.code is None:
            raise redirect.error or LoginError(
                f"no redirect arrived within {wait:g} s; nothing was changed"
            )
    show("Signed in at the identity provider; redeeming the code.")
    outcome = await client.exchange_code(redirect.code, redirect_uri, request.code_verifier)
    return token_with_refresh(outcome, "redeeming the authorization code")


class _Redirect:
    """Receives the redirect on the loopback listener: answers the browser, keeps the
    code (or the error), and ends the listening."""

    def __init__(self, state: str, issuer: str | None) -> None:
        self._state = state
        self._issuer = issuer
        self.code: str | None = None
        self.error: AuthorizationError | None = None
        self.cancel: Callable[[], None] = lambda: None

    async def handle(self, stream: anyio.abc.SocketStream) -> None:
        async with stream:
            target = await _read_request_target(stream)
            if target is None:
                return
            path, _, query = target.partition("?")
            if path != REDIRECT_PATH:
                await stream.send(_page(404, "Not found."))
                return
            try:
                code = code_from_redirect(query, self._state, self._issuer)
            except AuthorizationError as exc:
                await stream.send(_page(400, f"Sign-in failed: {exc}"))
                self.error = exc
            else:
                await stream.send(_page(200, "Signed in. You can close this window."))
                self.code = code
            self.cancel()


async def _read_request_target(stream: anyio.abc.SocketStream) -> str | None:
    head = b""
    with anyio.move_on_after(_REDIRECT_READ_TIMEOUT):
        while b"\r\n\r\n" not in head and len(head) < _MAX_REDIRECT_HEAD:
            try:
                head += await stream.receive(4096)
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                return None
    parts = head.split(b"\r\n", 1)[0].split(b" ")
    if len(parts) != 3 or parts[0] != b"GET":
        return None
    return parts[1].decode("ascii", errors="replace")


def _page(status: int, text: str) -> bytes:
    import html

    reason = {200: "OK", 400: "Bad Request", 404: "Not Found"}[status]
    body = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>tokend</title></head>"
        f"<body><p>tokend: {html.escape(text)}</p></body></html>"
    ).encode()
    return (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/html; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n"
    ).encode() + body


# -- the device authorization grant --------------------------------------------------------


async def device_login(
    client: ProviderClient,
    scope: str,
    *,
    show: Callable[[str], None] = print,
    sleep: Sleep = anyio.sleep,
    monotonic: Callable[[], float] = time.monotonic,
) -> TokenResponse:
    """Sign in with the device authorization grant: show the code, poll until done."""
    answer = await client.device_authorization(scope)
    if isinstance(answer, TokenFailure):
        raise LoginError(f"the device authorization request failed: {answer.summary()}")
    device = parse_device_authorization(answer.status, answer.body)
    show(f"On any device, open {device.verification_uri} and enter the code {device.user_code}")
    if device.verification_uri_complete:
        show(f"  (or open {device.verification_uri_complete})")
    show(f"Waiting up to {device.expires_in:g} s for the sign-in...")
    deadline = monotonic() + device.expires_in
    interval = device.interval
    while True:
        if monotonic() + interval > deadline:
            raise AuthorizationError(
                "the code expired before the sign-in was completed; run tokend login again"
            )
        await sleep(interval)
        step = device_poll_step(await client.poll_device_code(device.device_code), interval)
        if isinstance(step, PollAgain):
            interval = step.interval
            continue
        return token_with_refresh(step, "the device sign-in")


# -- where the new seed goes ---------------------------------------------------------------


async def deliver_seed(config: Config, name: str, aconf: AccountConfig, seed: str) -> str:
    """Make ``seed`` the account's seed; returns what happened, for the user."""
    if aconf.vault_ref is not None:
        # The vault holds the seed: a running tokend notices the new version there.
        return await write_vault_seed(config, name, aconf, seed)
    if config.serve.socket is not None:
        try:
            return await anyio.to_thread.run_sync(
                hand_seed_to_daemon, config.serve.socket, name, seed
            )
        except DaemonNotRunning:
            pass
    return await write_seed(config, name, aconf, seed)


def hand_seed_to_daemon(socket_path: Path, name: str, seed: str) -> str:
    """PUT the seed to the running daemon; raises DaemonNotRunning when none answers,
    LoginError when it refuses."""
    try:
        status, data = call_daemon(
            socket_path,
            "PUT",
            f"/v1/accounts/{quote(name, safe='')}/seed",
            body=orjson.dumps({"refresh_token": seed}),
            timeout=_HANDOFF_TIMEOUT,
        )
    except DaemonCallFailed as exc:
        raise LoginError(
            f"handing the new refresh token to tokend at {socket_path} failed "
            f"({exc}); it was not stored: run tokend login again"
        ) from None
    if status == 200:
        state = data.get("state")
        detail = f" ({data['last_error']})" if data.get("last_error") else ""
        return f"the running tokend took the new refresh token; the account is {state}{detail}"
    error = data.get("error") or f"HTTP {status}"
    if status == 403:
        raise LoginError(
            "the running tokend accepts a new refresh token only from its own user or "
            "root; run tokend login as that user"
        )
    if status in (404, 405, 413) and error != "unknown_account":
        raise LoginError(
            "the running tokend does not take new refresh tokens over its socket: stop it, "
            "run tokend login again, then start it"
        )
    if status == 404:
        raise LoginError(
            f"the running tokend has no account {name!r} ({error}): reload it (SIGHUP) "
            "after adding the account, then run tokend login again"
        )
    raise LoginError(f"the running tokend refused the new refresh token: {error}")


async def write_vault_seed(config: Config, name: str, aconf: AccountConfig, seed: str) -> str:
    """Write ``seed`` to the account's vault secret (check-and-set, other fields kept)."""
    from tokend.sources import VaultClient, VaultError, VaultErrorKind

    ref = aconf.vault_ref
    assert ref is not None and config.vault is not None  # the config's own checks
    if not aconf.writes_back:
        raise LoginError(
            f"the seed of {name!r} is read-only (write_back: false): put the new refresh "
            f"token in vault secret {ref.where} yourself; nothing was changed"
        )
    vault = VaultClient(config.vault)
    try:
        try:
            secret = await vault.read(ref, name)
            data, cas = dict(secret.data), secret.version
        except VaultError as exc:
            if exc.kind is not VaultErrorKind.MISSING_SECRET:
                raise
            data, cas = {}, 0
            try:
                cas = await vault.current_version(ref, name)  # a deleted newest version
            except VaultError as missing:
                if missing.kind is not VaultErrorKind.MISSING_SECRET:
                    raise
        version = await vault.write(ref, name, {**data, ref.field: seed}, cas)
    except VaultError as exc:
        raise LoginError(f"{exc}; the new refresh token was not stored") from None
    finally:
        await vault.aclose()
    return (
        f"wrote the new refresh token to vault secret {ref.where} (version {version}); "
        "tokend takes it up within vault.poll_interval, or when it starts"
    )


async def write_seed(config: Config, name: str, aconf: AccountConfig, seed: str) -> str:
    """Write the seed where tokend will find it at its next start: the seed file (when
    the account has one) first, then the store."""
    from tokend.seed import SeedFileError, new_seed_record, write_seed_file
    from tokend.store import StoreError, open_store

    if aconf.refresh_token_file is not None:
        try:
            write_seed_file(aconf.refresh_token_file, seed)
        except SeedFileError as exc:
            raise LoginError(f"{exc}; nothing was changed") from None
    store = open_store(config.state)
    try:
        await store.open()
        try:
            stored = await store.load(name)
            await store.put(new_seed_record(name, aconf, stored, seed, time.time()))
        finally:
            await store.close()
    except StoreError as exc:
        where = " (the seed file holds it already)" if aconf.refresh_token_file else ""
        raise LoginError(f"cannot store the new refresh token{where}: {exc}") from None
    where = f"{aconf.refresh_token_file} and " if aconf.refresh_token_file else ""
    return (
        f"stored the new refresh token in {where}{config.state.path}; tokend uses it when it starts"
    )
