"""Tokens at rest: AES-GCM with a 256-bit key from a file, the account name as
associated data (a record copied under another account's name does not decrypt).

A sealed value is ``nonce (12 bytes) || ciphertext+tag``; every seal draws a fresh
random nonce, which at 2^32 seals per key keeps the collision risk negligible.

:class:`RecordCipher` seals whole records (the etcd backend); :class:`TokenCipher` seals
single token strings in place (the sqlite backend's token columns), as text: ``enc1:``
and the base64 of the sealed bytes, with the account *and the column* as associated
data, so a value moved from one column to another does not open either.

The key (:func:`configured_key`) comes from ``state.encryption_key_file``, else the
``TOKEND_STATE_KEY`` environment variable (base64), else the systemd credential
``tokend-state-key`` (``LoadCredential=tokend-state-key:/etc/tokend/state.key``).
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from tokend.store._secret_sources import SecretSource, SecretUnreadable, configured_secret

__all__ = [
    "KEY_BYTES",
    "KEY_ENV_VAR",
    "SEALED_PREFIX",
    "STATE_KEY",
    "RecordCipher",
    "StateKeyError",
    "TokenCipher",
    "configured_key",
    "is_sealed",
    "load_key",
    "parse_key",
]

KEY_BYTES: Final = 32
_NONCE_BYTES: Final = 12
SEALED_PREFIX: Final = "enc1:"
KEY_ENV_VAR: Final = "TOKEND_STATE_KEY"
CREDENTIAL_NAME: Final = "tokend-state-key"
STATE_KEY: Final = SecretSource(
    "state encryption key", "state.encryption_key_file", KEY_ENV_VAR, CREDENTIAL_NAME
)
# A known value sealed with the key, stored beside the records: a wrong key is found at
# open, before any record is read, rather than as a "malformed record" later.
_CHECK_PLAINTEXT: Final = b"tokend state key check"
_KEY_HINT: Final = (
    f"expected {KEY_BYTES} raw bytes or their base64 "
    "(make one with: head -c 32 /dev/urandom | base64 > FILE)"
)


class StateKeyError(ValueError):
    """The key is missing or malformed, or a sealed value does not open with it.

    The message never contains key material or plaintext.
    """


def parse_key(raw: bytes, where: str) -> bytes:
    """32 raw bytes, or their base64 text (with or without padding)."""
    if len(raw) == KEY_BYTES:
        return raw
    text = raw.strip()
    try:
        decoded = base64.b64decode(text + b"=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        decoded = b""
    if len(decoded) == KEY_BYTES:
        return decoded
    raise StateKeyError(f"{where}: {_KEY_HINT}")


def load_key(path: Path) -> bytes:
    """The 32-byte key in ``path``: raw bytes, or base64 text (with or without padding)."""
    key = configured_key(path, {})
    assert key is not None  # a file was named
    return key


def configured_key(key_file: Path | None, environ: Mapping[str, str] | None = None) -> bytes | None:
    """The state key from the file, the environment or a systemd credential (in that
    order); None when none is configured anywhere."""
    try:
        found = configured_secret(STATE_KEY, key_file, environ)
    except SecretUnreadable as exc:
        raise StateKeyError(str(exc)) from None
    return None if found is None else parse_key(*found)


class RecordCipher:
    """Seal and open account records with one key."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise StateKeyError(f"state encryption key must be {KEY_BYTES} bytes")
        # Imported here: only stores that encrypt pay for loading cryptography.
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._aead = AESGCM(key)

    def __repr__(self) -> str:
        return "RecordCipher(<key>)"

    def seal(self, account: str, plaintext: bytes) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plaintext, account.encode())

    def open(self, account: str, sealed: bytes) -> bytes:
        from cryptography.exceptions import InvalidTag

        if len(sealed) < _NONCE_BYTES + 16:
            raise StateKeyError(f"stored record of {account!r} is truncated")
        try:
            return self._aead.decrypt(
                sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], account.encode()
            )
        except InvalidTag:
            raise StateKeyError(
                f"stored record of {account!r} does not decrypt with the configured key "
                "(a different state.encryption_key_file, or the record was altered)"
            ) from None


class TokenCipher:
    """Seals and opens token strings, bound to their account and column."""

    __slots__ = ("_records",)

    def __init__(self, key: bytes) -> None:
        self._records = RecordCipher(key)

    def __repr__(self) -> str:
        return "TokenCipher(<key>)"

    def seal(self, account: str, column: str, value: str) -> str:
        sealed = self._records.seal(_aad(account, column), value.encode())
        return SEALED_PREFIX + base64.b64encode(sealed).decode("ascii")

    def open(self, account: str, column: str, value: str) -> str:
        """The plaintext of ``value``; raises :class:`StateKeyError` if it was sealed
        with another key or for another account or column, or was altered."""
        if not value.startswith(SEALED_PREFIX):
            raise StateKeyError("the stored value is not sealed (written without a key)")
        try:
            raw = base64.b64decode(value[len(SEALED_PREFIX) :], validate=True)
        except (binascii.Error, ValueError):
            raise StateKeyError("the stored value is not a sealed value") from None
        try:
            return self._records.open(_aad(account, column), raw).decode()
        except StateKeyError:
            # RecordCipher's message names the associated data, not the account alone.
            raise StateKeyError(
                f"the stored {column} of {account!r} does not open with the configured key"
            ) from None

    def check_value(self) -> str:
        """A sealed known value to store beside the records (see :meth:`verify`)."""
        return self.seal("", "key-check", _CHECK_PLAINTEXT.decode())

    def verify(self, check: str) -> bool:
        """Whether ``check`` (from :meth:`check_value`) was sealed with this key."""
        try:
            return self.open("", "key-check", check) == _CHECK_PLAINTEXT.decode()
        except StateKeyError:
            return False


def is_sealed(value: str | None) -> bool:
    return value is not None and value.startswith(SEALED_PREFIX)


def _aad(account: str, column: str) -> str:
    return f"{account}\0{column}"
