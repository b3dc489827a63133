"""Writing a rotated refresh token back to its vault secret, with check-and-set.

The write names the version the chain was last in step with (from the stored seed
fingerprint), so it lands only if nobody else wrote meanwhile. A conflict is never
overwritten: the caller re-reads the secret and adopts what is there if it is a new
token (see :func:`~tokend.sources.continues_chain`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from tokend.config import AccountConfig
from tokend.model import StoredAccount
from tokend.sources._seeds import SeedSources, vault_fingerprint, vault_version, writeback_owed
from tokend.sources._vault import KvSecret, VaultClient, VaultError, VaultErrorKind

__all__ = ["VaultWriteBack"]


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
            return None
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
