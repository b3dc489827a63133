"""Where seed refresh tokens come from: the config, files (watched) and a vault (KV v2,
with write-back of rotated tokens)."""

from tokend.sources._seeds import (
    Seed,
    SeedSources,
    continues_chain,
    vault_fingerprint,
    vault_version,
    writeback_owed,
)
from tokend.sources._vault import KvSecret, VaultClient, VaultError, VaultErrorKind
from tokend.sources._watch import SeedWatcher, file_signature
from tokend.sources._writeback import VaultWriteBack

__all__ = [
    "KvSecret",
    "Seed",
    "SeedSources",
    "SeedWatcher",
    "VaultClient",
    "VaultError",
    "VaultErrorKind",
    "VaultWriteBack",
    "continues_chain",
    "file_signature",
    "vault_fingerprint",
    "vault_version",
    "writeback_owed",
]
