"""The at-rest codec: sealed values open only with their key, account and field."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from tokend.store._crypto import StateKeyError, TokenCipher, configured_key, is_sealed, parse_key


def test_seal_and_open_bind_key_account_and_field() -> None:
    key = os.urandom(32)
    cipher = TokenCipher(key)
    sealed = cipher.seal("alice", "refresh_token", "rt-secret")
    assert is_sealed(sealed) and "rt-secret" not in sealed
    assert cipher.open("alice", "refresh_token", sealed) == "rt-secret"
    # Two seals of one value differ (a fresh nonce each time).
    assert cipher.seal("alice", "refresh_token", "rt-secret") != sealed
    for account, column in (("bob", "refresh_token"), ("alice", "access_token")):
        with pytest.raises(StateKeyError):
            cipher.open(account, column, sealed)
    with pytest.raises(StateKeyError):
        TokenCipher(os.urandom(32)).open("alice", "refresh_token", sealed)
    tampered = sealed[:-4] + ("AAAA" if not sealed.endswith("AAAA") else "BBBB")
    with pytest.raises(StateKeyError):
        cipher.open("alice", "refresh_token", tampered)
    assert cipher.verify(cipher.check_value())
    assert not TokenCipher(os.urandom(32)).verify(cipher.check_value())
    assert "key" in repr(cipher) and key.hex() not in repr(cipher)


def test_key_sources(tmp_path: Path) -> None:
    key = os.urandom(32)
    raw = tmp_path / "raw.key"
    raw.write_bytes(key)
    b64 = tmp_path / "b64.key"
    b64.write_text(base64.b64encode(key).decode() + "\n")
    assert configured_key(raw, {}) == key
    assert configured_key(b64, {}) == key
    assert configured_key(None, {"TOKEND_STATE_KEY": base64.b64encode(key).decode()}) == key
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "tokend-state-key").write_bytes(key)
    assert configured_key(None, {"CREDENTIALS_DIRECTORY": str(creds)}) == key
    assert configured_key(None, {}) is None
    short = tmp_path / "short.key"
    short.write_text("too-short")
    with pytest.raises(StateKeyError) as caught:
        configured_key(short, {})
    assert "too-short" not in str(caught.value) and "32 raw bytes" in str(caught.value)
    with pytest.raises(StateKeyError):
        parse_key(b"x" * 31, "here")
    with pytest.raises(StateKeyError) as missing:
        configured_key(tmp_path / "absent.key", {})
    assert "cannot read" in str(missing.value)
