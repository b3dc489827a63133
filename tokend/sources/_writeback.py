"""Writing a rotated refresh token back to its vault secret, with check-and-set.

The write names the version the chain was last in step with (from the stored seed
fingerprint), so it lands only if nobody else wrote meanwhile. A conflict is never
overwritten: the caller re-reads the secret and adopts what is there if it is a new
token (see :func:`~tokend.sources.continues_chain`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Protocol

import anyio

from tokend.config import AccountConfig, VaultRef
from tokend.logs import get_logger
from tokend.model import StoredAccount
from tokend.sources._seeds import SeedSources, vault_fingerprint, vault_version, writeback_owed
from tokend.sources._vault import KvSecret, VaultClient, VaultError, VaultErrorKind

__all__ = ["VaultWriteBack", "WriteBackHost"]

_log = get_logger()

# Retries of a failed write-back: soon, then backing off to a minute (full jitter), so a
# vault back from an outage is caught up within a minute and never stampeded.
_RETRY_MIN: Final = 1.0
_RETRY_MAX: Final = 60.0


class WriteBackHost(Protocol):
    """What the retry loop asks of the engine."""

    def write_back_account(self, name: str) -> Awaitable[None]: ...

    def reseed(self, names: Iterable[str]) -> Awaitable[None]: ...


@dataclass(slots=True)
class _Retry:
    at: float  # anyio.current_time() of the next attempt
    attempts: int = 0
    conflict: bool = False


class VaultWriteBack:
    """Writes rotated refresh tokens back to the ``vault://`` seeds they came from."""

    def __init__(
        self,
        vault: VaultClient,
        sources: SeedSources,
        accounts: Callable[[], Mapping[str, AccountConfig]],
    ) -> None:
        self.vault = vault
        self.sources = sources
        self.accounts = accounts
        self.writes = 0
        self.conflicts = 0
        self._pending: dict[str, _Retry] = {}
        self._wake = anyio.Event()
        self._rng = random.Random()

    @property
    def pending(self) -> frozenset[str]:
        """Accounts whose rotated refresh token is not in the vault yet."""
        return frozenset(self._pending)

    def applies_to(self, account: str) -> bool:
        aconf = self.accounts().get(account)
        return aconf is not None and aconf.writes_back

    def note(self, account: str, record: StoredAccount) -> None:
        if self.owed(account, record):
            if account not in self._pending:
                self._pending[account] = _Retry(anyio.current_time())
                self._wake.set()
        else:
            self._settled(account, "the vault holds the stored token")

    def forget(self, account: str) -> None:
        self._pending.pop(account, None)

    async def run(self, host: WriteBackHost) -> None:
        """Retry owed write-backs until cancelled; after a conflict, re-read first."""
        while True:
            now = anyio.current_time()
            for name in [n for n, r in self._pending.items() if r.at <= now]:
                retry = self._pending.get(name)
                if retry is None:
                    continue
                if not self.applies_to(name):
                    # Removed, or write_back turned off by a reload: nothing is owed.
                    del self._pending[name]
                    continue
                if retry.conflict:
                    aconf = self.accounts().get(name)
                    if aconf is not None:
                        await self.sources.sync({name: aconf}, prune=False)
                    retry.conflict = False
                    # Adopts the vault's token if it is a new one; else the chain goes on
                    # at the secret's new version and the write is tried again.
                    await host.reseed({name})
                if name in self._pending:
                    await host.write_back_account(name)
            next_at = min((r.at for r in self._pending.values()), default=math.inf)
            self._wake = anyio.Event()
            with anyio.move_on_after(max(0.05, next_at - anyio.current_time())):
                await self._wake.wait()

    def _failed(self, account: str, exc: VaultError) -> None:
        retry = self._pending.get(account) or _Retry(0.0)
        retry.attempts += 1
        if exc.kind is VaultErrorKind.CAS_CONFLICT:
            retry.conflict, delay = True, 0.0
        else:
            ceiling = min(_RETRY_MAX, _RETRY_MIN * 2 ** min(retry.attempts - 1, 16))
            delay = max(_RETRY_MIN / 2, ceiling * self._rng.random())
        retry.at = anyio.current_time() + delay
        if account not in self._pending:
            _log.warning(
                "vault_writeback_pending",
                account=account,
                error=str(exc),
                detail="the rotated refresh token is safe in the local store; the "
                "write-back to the vault is retried",
            )
        self._pending[account] = retry
        self._wake.set()

    def owed(self, account: str, record: StoredAccount) -> bool:
        aconf = self.accounts().get(account)
        return aconf is not None and aconf.writes_back and writeback_owed(record)

    async def write_back(self, account: str, record: StoredAccount) -> str | None:
        """Write ``record``'s refresh token to the account's secret if it is owed.

        Returns the seed fingerprint to store with the record (the secret's new
        version), or None when nothing was owed. Raises :class:`VaultError`; its kind
        is CAS_CONFLICT when someone else wrote the secret first (nothing was written).
        """
        aconf = self.accounts().get(account)
        ref = aconf.vault_ref if aconf is not None else None
        token = record.refresh_token
        if ref is None or aconf is None or token is None or not self.owed(account, record):
            self._pending.pop(account, None)
            return None
        try:
            seed_fp = await self._write(account, ref, token, record)
        except VaultError as exc:
            self._failed(account, exc)
            raise
        self._settled(account, "written")
        return seed_fp

    def _settled(self, account: str, how: str) -> None:
        retry = self._pending.pop(account, None)
        if retry is not None and retry.attempts:
            _log.info(
                "vault_writeback_caught_up", account=account, attempts=retry.attempts, how=how
            )

    async def _write(self, account: str, ref: VaultRef, token: str, record: StoredAccount) -> str:
        cas = vault_version(record.seed_fingerprint)
        assert cas is not None  # writeback_owed() holds only for a vault fingerprint
        secret = self.sources.secret(ref)
        if secret is None or secret.version != cas:
            # Not the version the chain is in step with: read what is there now (a
            # restart, or another field's write); a moved version is a conflict.
            secret = await self.vault.read(ref, account)
            if secret.version != cas:
                self.conflicts += 1
                raise VaultError(
                    VaultErrorKind.CAS_CONFLICT,
                    f"account {account}: vault secret {ref.where}: version {secret.version} "
                    f"was written by someone else since version {cas}",
                )
        data = {**secret.data, ref.field: token}
        try:
            version = await self.vault.write(ref, account, data, cas)
        except VaultError as exc:
            if exc.kind is VaultErrorKind.CAS_CONFLICT:
                self.conflicts += 1
            raise
        self.writes += 1
        self.sources.written(KvSecret(ref, version, data))
        return vault_fingerprint(version, token)
