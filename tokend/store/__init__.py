"""Durable account state behind one small interface.

The engine only ever talks to :class:`Store`. A backend keeps, per account, a
:class:`~tokend.model.StoredAccount` and guards every write with compare-and-swap on
its ``version``, so a distributed backend (etcd) can share accounts between replicas
without the engine knowing; ``claim`` gives one replica at a time the right to refresh
an account.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokend.store._base import (
    AccountsAcquired,
    Ownership,
    RecordWritten,
    SharedStore,
    Store,
    StoreChange,
    StoreConflict,
    StoreError,
)
from tokend.store._crypto import StateKeyError, TokenCipher, configured_key

if TYPE_CHECKING:
    from tokend.config import StateConfig

__all__ = [
    "AccountsAcquired",
    "Ownership",
    "RecordWritten",
    "SharedStore",
    "Store",
    "StoreChange",
    "StoreConflict",
    "StoreError",
    "TokenCipher",
    "open_store",
    "state_cipher",
]


def state_cipher(config: StateConfig) -> TokenCipher | None:
    """The cipher for tokens at rest, if a state key is configured anywhere."""
    try:
        key = configured_key(config.encryption_key_file)
    except StateKeyError as exc:
        raise StoreError(str(exc)) from None
    return None if key is None else TokenCipher(key)


def open_store(config: StateConfig) -> Store:
    """Build the backend the config names (not yet opened: ``await store.open()``)."""
    if config.backend == "sqlite":
        from tokend.store.sqlite import SqliteStore

        return SqliteStore(config.path, exclusive=True, cipher=state_cipher(config))
    if config.backend == "etcd":
        from tokend.store.etcd import EtcdSettings, EtcdStore

        tls = config.tls
        return EtcdStore(
            EtcdSettings(
                endpoints=config.endpoints,
                encryption_key_file=config.encryption_key_file,
                prefix=config.prefix,
                lease_ttl=config.lease_ttl,
                request_timeout=config.request_timeout,
                call_timeout=config.call_timeout,
                ca_file=tls.ca_file if tls else None,
                cert_file=tls.cert_file if tls else None,
                key_file=tls.key_file if tls else None,
                username=config.username,
                password_file=config.password_file,
            )
        )
    raise ValueError(f"unknown state backend {config.backend!r}")
