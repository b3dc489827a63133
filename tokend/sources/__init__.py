"""Where seed refresh tokens come from besides the config itself: a vault (KV v2, with
write-back of rotated tokens) and watched files."""

from tokend.sources._vault import KvSecret, VaultClient, VaultError, VaultErrorKind

__all__ = ["KvSecret", "VaultClient", "VaultError", "VaultErrorKind"]
