"""Every account's seed refresh token, wherever it comes from: inline in the config, a
file, or a field of a KV v2 secret in the vault.

A seed has a *fingerprint*, which the engine stores beside the chain rotated from it:
when the fingerprint of the seed read now differs from the stored one, the operator
(or another replica) supplied a new seed, and the new seed wins. For a vault seed the
fingerprint names the secret's version and the token (``vault:VERSION:HASH``), so:

* an unchanged secret (same version) leaves the stored chain alone;
* a rotated token written back as version N+1 is recorded as ``vault:N+1:...`` with the
  commit that follows the write, so the next start finds it unchanged;
* while a write-back is owed, the stored refresh token differs from the one the
  fingerprint names (:func:`writeback_owed`): that *is* the durable "write-back pending"
  mark, set by the very commit that stored the rotated token, so a crash cannot lose it.

Vault seeds are read ahead (:meth:`SeedSources.sync`: at start, concurrently, and
then only when a secret's version moved) and served from here; a failed read is kept
as the account's seed error until a later read succeeds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import anyio

from tokend.config import AccountConfig, VaultRef, read_secret_file
from tokend.logs import get_logger, register_secret
from tokend.model import StoredAccount, fingerprint
from tokend.sources._vault import KvSecret, VaultClient, VaultError, VaultErrorKind

__all__ = [
    "Seed",
    "SeedSources",
    "continues_chain",
    "vault_fingerprint",
    "vault_version",
    "writeback_owed",
]

_log = get_logger()

_VAULT_FP: Final = "vault:"
# Concurrent vault reads when many seeds are read at once (a start, a SIGHUP).
_READ_WORKERS: Final = 16


@dataclass(frozen=True, slots=True)
class Seed:
    value: str = field(repr=False)
    fingerprint: str


def vault_fingerprint(version: int, token: str) -> str:
    return f"{_VAULT_FP}{version}:{fingerprint(token)}"


def vault_version(seed_fingerprint: str | None) -> int | None:
    """The secret version a vault seed fingerprint names (None: not a vault seed)."""
    if seed_fingerprint is None or not seed_fingerprint.startswith(_VAULT_FP):
        return None
    version, _, _ = seed_fingerprint[len(_VAULT_FP) :].partition(":")
    return int(version) if version.isdigit() else None


def _token_hash(seed_fingerprint: str) -> str:
    return seed_fingerprint.rsplit(":", 1)[-1]


def continues_chain(seed: Seed, record: StoredAccount) -> bool:
    """Whether ``seed`` is the one ``record``'s chain grew from, or its newest token.

    Then the stored chain goes on (the store wins) even if the fingerprint moved: a
    vault secret's version moves when another field or tokend's own write-back changes
    it, and that is no new seed. Only a different token is a new seed.
    """
    if record.seed_fingerprint is None:
        return False
    token = _token_hash(seed.fingerprint)
    if token == _token_hash(record.seed_fingerprint):
        return True
    return record.refresh_token is not None and token == fingerprint(record.refresh_token)


def writeback_owed(record: StoredAccount) -> bool:
    """Whether ``record``'s refresh token is newer than the vault secret it came from."""
    seed_fp = record.seed_fingerprint
    if vault_version(seed_fp) is None or record.refresh_token is None or seed_fp is None:
        return False
    return _token_hash(seed_fp) != fingerprint(record.refresh_token)


@dataclass(slots=True)
class _Secret:
    """What is known of one vault secret: the newest version read, or why not."""

    ref_where: str
    secret: KvSecret | None = None
    error: VaultError | None = None


class SeedSources:
    """Reads seeds; holds the vault seeds read ahead (see the module docstring)."""

    def __init__(self, vault: VaultClient | None) -> None:
        self.vault = vault
        # By secret (MOUNT/PATH): accounts sharing a secret share its reads.
        self._secrets: dict[str, _Secret] = {}

    # -- the engine's side (sync) ----------------------------------------------------

    async def read(self, name: str, aconf: AccountConfig) -> Seed | None:
        """The seed of account ``name``. Raises ValueError or OSError with a message
        naming the account's source (never the secret). Vault seeds come from what was
        read ahead; files are read in a worker thread (a hung mount must not stall the
        event loop)."""
        ref = aconf.vault_ref
        if ref is not None:
            known = self._secrets.get(ref.where)
            if known is None or (known.secret is None and known.error is None):
                raise ValueError(f"account {name}: vault secret {ref.where} not read yet")
            if known.secret is None:
                assert known.error is not None
                raise ValueError(str(known.error))
            try:
                value = known.secret.value(name)
            except VaultError as exc:
                raise ValueError(str(exc)) from None
            register_secret(value)
            return Seed(value, vault_fingerprint(known.secret.version, value))
        if aconf.refresh_token is not None:
            value = aconf.refresh_token.get_secret_value()
        elif aconf.refresh_token_file is not None:
            value = await anyio.to_thread.run_sync(read_secret_file, aconf.refresh_token_file)
        else:
            return None
        register_secret(value)
        return Seed(value, fingerprint(value))

    def secret(self, ref: VaultRef) -> KvSecret | None:
        """The newest version read of ``ref``'s secret."""
        known = self._secrets.get(ref.where)
        return None if known is None else known.secret

    def error(self, ref: VaultRef) -> VaultError | None:
        known = self._secrets.get(ref.where)
        return None if known is None else known.error

    def written(self, secret: KvSecret) -> None:
        """tokend itself wrote ``secret``: known without reading it back."""
        self._secrets[secret.ref.where] = _Secret(secret.ref.where, secret)

    # -- reading the vault (async) ---------------------------------------------------

    async def sync(
        self, accounts: Mapping[str, AccountConfig], *, check: bool = True, prune: bool = True
    ) -> set[str]:
        """Read every vault secret the accounts name that is not known yet and, with
        ``check``, the known ones whose version moved (metadata only: an unchanged
        secret is never read again). Returns the accounts whose seed may have changed.
        With ``prune``, ``accounts`` is every account: secrets none names are forgotten."""
        if self.vault is None:
            return set()
        by_secret: dict[str, tuple[VaultRef, list[str]]] = {}
        for name, aconf in accounts.items():
            ref = aconf.vault_ref
            if ref is not None:
                by_secret.setdefault(ref.where, (ref, []))[1].append(name)
        for where in set(self._secrets) - set(by_secret) if prune else ():
            del self._secrets[where]  # no account names it any more
        changed: set[str] = set()
        pending = iter(list(by_secret.values()))
        vault = self.vault
        # Once the vault is found unreachable or sealed, the rest of this pass records
        # that for each secret instead of waiting out a timeout per secret.
        down: list[VaultError] = []

        async def worker() -> None:
            for ref, names in pending:
                if await self._sync_one(vault, ref, names[0], check, down):
                    changed.update(names)

        async with anyio.create_task_group() as group:
            for _ in range(min(_READ_WORKERS, len(by_secret))):
                group.start_soon(worker)
        return changed

    async def _sync_one(
        self, vault: VaultClient, ref: VaultRef, account: str, check: bool, down: list[VaultError]
    ) -> bool:
        known = self._secrets.get(ref.where)
        try:
            if down:
                raise VaultError(
                    down[0].kind,
                    f"account {account}: vault secret {ref.where}: not read, the vault "
                    f"is {'sealed' if down[0].kind is VaultErrorKind.SEALED else 'unreachable'}"
                    " (retried)",
                )
            if known is not None and known.secret is not None:
                if not check:
                    return False
                if await vault.current_version(ref, account) == known.secret.version:
                    known.error = None
                    return False
            secret = await vault.read(ref, account)
        except VaultError as exc:
            if exc.transient and not down:
                down.append(exc)
            was = known.error if known is not None else None
            if was is None or str(was) != str(exc):
                _log.error("vault_read_failed", account=account, path=ref.where, error=str(exc))
            if known is not None and known.secret is not None:
                # Keep serving the seed last read: a vault outage is not a new seed.
                known.error = exc
                return False
            self._secrets[ref.where] = _Secret(ref.where, None, exc)
            # Only a new reason is news for the accounts (they log it once).
            return was is None or str(was) != str(exc)
        if known is not None and known.secret is not None:
            _log.info(
                "vault_secret_changed",
                path=ref.where,
                version=secret.version,
                previous_version=known.secret.version,
            )
        self._secrets[ref.where] = _Secret(ref.where, secret)
        return True

    def failing(self) -> Iterable[str]:
        """Secrets whose last read failed (retried sooner than the poll interval)."""
        return [w for w, s in self._secrets.items() if s.error is not None]

    def data_for_write(self, ref: VaultRef, token: str) -> dict[str, Any] | None:
        """The known secret's fields with ``ref.field`` set to ``token``."""
        secret = self.secret(ref)
        if secret is None:
            return None
        return {**secret.data, ref.field: token}
