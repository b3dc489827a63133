"""``tokend revoke``: end an account's grant at the IdP (RFC 7009) and forget its tokens.

The refresh token tokend holds (the store's, else the configured seed) is revoked at
the provider's ``revocation_endpoint``, then the access token if one is still valid.
The stored record then holds neither, and says why: the account is ``needs_reauth``
until ``tokend login`` (or a new seed) revives it. Nothing is printed of any token.
With the daemon running, the daemon does it (``POST /v1/accounts/NAME/revoke`` on its
socket): it holds the store and the account's current refresh token.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TextIO
from urllib.parse import quote

import anyio

from tokend._daemon_call import DaemonCallFailed, DaemonNotRunning, call_daemon
from tokend.config import (
    AccountConfig,
    AccountNotLoaded,
    Config,
    ProviderConfig,
    load_account,
)
from tokend.oauth import ProviderClient, ProviderSetupError, TokenFailure
from tokend.oauth._http import RawResponse
from tokend.oauth._parse import clean_error_code, decode_json_object

# Revoking is one request or two at the IdP, each bounded by the provider's timeout.
_DAEMON_TIMEOUT = 120.0

REVOKED_NOTE = "refresh token revoked by tokend revoke; run tokend login to sign in again"


class RevokeError(Exception):
    """Revocation failed; the message says why (never quoting a token)."""


def revoke_command(account: str, *, config_arg: str | None, err: TextIO = sys.stderr) -> int:
    """``tokend revoke``: 0 when revoked, 1 when it failed, 2 for a bad config or an
    unknown account."""
    try:
        config, aconf = load_account(account, config_arg)
    except AccountNotLoaded as exc:
        print(str(exc), file=err)
        return 2
    try:
        message = None
        if config.serve.socket is not None:
            # A running daemon holds the store and the account's current refresh token:
            # it revokes, under the account's lock.
            message = revoke_in_daemon(config.serve.socket, account)
        if message is None:
            message = anyio.run(_revoke_stored, config, account, aconf)
    except RevokeError as exc:
        print(f"tokend revoke {account}: {exc}", file=err)
        return 1
    print(f"tokend revoke {account}: {message}", file=err)
    return 0


def revoke_in_daemon(socket_path: Path, name: str) -> str | None:
    """Have the running daemon revoke ``name``: what happened, or None when no daemon
    answers on ``socket_path``. Raises RevokeError when it did not revoke."""
    try:
        status, data = call_daemon(
            socket_path,
            "POST",
            f"/v1/accounts/{quote(name, safe='')}/revoke",
            timeout=_DAEMON_TIMEOUT,
        )
    except DaemonNotRunning:
        return None
    except DaemonCallFailed as exc:
        raise RevokeError(
            f"asking tokend at {socket_path} to revoke failed ({exc}); see its log for "
            "whether it did"
        ) from None
    detail = data.get("detail")
    if status == 200:
        return str(data.get("message") or "revoked at the provider")
    if status == 403:
        raise RevokeError(
            "the running tokend revokes only for its own user or root; run tokend revoke "
            "as that user"
        )
    if status == 404 and data.get("error") == "unknown_account":
        raise RevokeError(
            f"the running tokend has no account {name!r}: it may not have reloaded its "
            "config (SIGHUP)"
        )
    if status in (404, 405):
        raise RevokeError(
            f"the running tokend at {socket_path} does not revoke over its socket: stop "
            "it, then run tokend revoke again"
        )
    error = data.get("error") or f"HTTP {status}"
    raise RevokeError(f"{error}: {detail}" if detail else str(error))


def revokes_on_remove(account: AccountConfig, provider: ProviderConfig | None) -> bool:
    """Whether removing ``account`` from the config revokes its refresh token: its own
    ``revoke_on_remove``, else its provider's."""
    if account.revoke_on_remove is not None:
        return account.revoke_on_remove
    return provider is not None and provider.revoke_on_remove


async def revoke_refresh_token(name: str, provider: ProviderConfig, token: str) -> None:
    """Revoke ``token`` at provider ``name`` with a client of its own (the account's
    provider may be gone from the config already); raises RevokeError."""
    try:
        client = ProviderClient(name, provider)
    except ProviderSetupError as exc:
        raise RevokeError(str(exc)) from None
    async with client:
        await revoke_token(client, token, "refresh_token")


async def revoke_token(client: ProviderClient, token: str, hint: str) -> None:
    """Revoke one token (RFC 7009 2.1); raises RevokeError unless the IdP says done."""
    answer = await client.revoke(token, hint)
    if isinstance(answer, TokenFailure):
        raise RevokeError(f"the revocation request failed: {answer.summary()}")
    problem = revocation_problem(answer)
    if problem is not None:
        raise RevokeError(problem)


def revocation_problem(answer: RawResponse) -> str | None:
    """Why a revocation response is not a success (RFC 7009 2.2), or None: a 200 means
    the token is revoked or was invalid already, which ends the same way."""
    if answer.status == 200:
        return None
    document = decode_json_object(answer.body)
    code = clean_error_code(document.get("error")) if document is not None else None
    if code == "unsupported_token_type":
        return "the provider does not revoke this type of token (unsupported_token_type)"
    detail = f" ({code})" if code else ""
    return f"the revocation endpoint answered HTTP {answer.status}{detail}; nothing was changed"


async def _revoke_stored(config: Config, name: str, aconf: AccountConfig) -> str:
    from tokend.config import read_secret_file
    from tokend.store import StoreError, open_store

    pconf = config.providers[aconf.provider]
    store = open_store(config.state)
    try:
        await store.open()
    except StoreError as exc:
        raise RevokeError(f"cannot open the store: {exc}") from None
    try:
        record = await store.load(name)
        refresh_token = record.refresh_token if record is not None else None
        if refresh_token is None and record is None:
            # Never started: the configured seed is the grant's only token.
            if aconf.refresh_token is not None:
                refresh_token = aconf.refresh_token.get_secret_value()
            elif aconf.refresh_token_file is not None:
                try:
                    refresh_token = read_secret_file(aconf.refresh_token_file)
                except (OSError, ValueError) as exc:
                    raise RevokeError(str(exc)) from None
        access = record.token if record is not None else None
        if refresh_token is None and (access is None or not access.is_valid(time.time())):
            return "tokend holds no token for this account; nothing to revoke"
        try:
            client = ProviderClient(aconf.provider, pconf)
        except ProviderSetupError as exc:
            raise RevokeError(str(exc)) from None
        async with client:
            if refresh_token is not None:
                await revoke_token(client, refresh_token, "refresh_token")
            if access is not None and access.is_valid(time.time()):
                await revoke_token(client, access.access_token, "access_token")
        if record is not None:
            try:
                await store.put(
                    record.evolve(
                        refresh_token=None,
                        token=None,
                        in_flight_since=None,
                        last_outcome="revoked",
                        last_error=REVOKED_NOTE,
                        updated_at=time.time(),
                    )
                )
            except StoreError as exc:
                raise RevokeError(
                    f"revoked at the provider, but the store could not be updated: {exc}"
                ) from None
    finally:
        await store.close()
    return "revoked at the provider; the account needs a new sign-in (tokend login)"
