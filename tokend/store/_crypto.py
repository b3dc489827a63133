"""Tokens at rest: AES-GCM with a 256-bit key from a file, the account name as
associated data (a record copied under another account's name does not decrypt).

A sealed value is ``nonce (12 bytes) || ciphertext+tag``; every seal draws a fresh
random nonce, which at 2^32 seals per key keeps the collision risk negligible.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path
from typing import Final

__all__ = ["KEY_BYTES", "RecordCipher", "StateKeyError", "load_key"]

KEY_BYTES: Final = 32
_NONCE_BYTES: Final = 12


class StateKeyError(ValueError):
    """The key is missing or malformed, or a sealed value does not open with it.

    The message never contains key material or plaintext.
    """


def load_key(path: Path) -> bytes:
    """The 32-byte key in ``path``: raw bytes, or base64 text (with or without padding)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise StateKeyError(
            f"state encryption key {path}: cannot read it: {exc.strerror or exc}"
        ) from None
    if len(raw) == KEY_BYTES:
        return raw
    text = raw.strip()
    try:
        decoded = base64.b64decode(text + b"=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        decoded = b""
    if len(decoded) == KEY_BYTES:
        return decoded
    raise StateKeyError(
        f"state encryption key {path}: expected {KEY_BYTES} raw bytes or their base64 "
        "(make one with: head -c 32 /dev/urandom | base64 > FILE)"
    )


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
