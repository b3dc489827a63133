"""Tokens at rest sealed with AES-GCM: nothing readable in the state file, a wrong or
missing key is one clear error at start (never a silent start from the seeds), and
``tokend rekey`` rotates the key."""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Tokend, base_config, wait_until
from tests.idp_harness import IdP
from tokend.cli import main as cli_main
from tokend.model import StoredAccount
from tokend.store import StoreError, TokenCipher
from tokend.store.sqlite import SqliteStore


def write_key(path: Path) -> bytes:
    key = os.urandom(32)
    path.write_text(base64.b64encode(key).decode() + "\n")
    return key


def state_bytes(tokend: Tokend) -> bytes:
    state = tokend.workdir / "state"
    return b"".join(p.read_bytes() for p in state.glob("tokend.db*") if p.is_file())


def start_fails(tokend: Tokend) -> tuple[int, str]:
    tokend.start()
    assert tokend.proc is not None
    code = tokend.proc.wait(30)
    return code, tokend.log_text()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_sealed_at_rest_wrong_key_refused_and_rekey(
    fresh_idp: IdP, tokend_factory: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    seed = fresh_idp.seed_grant("basic-client")
    config = base_config(fresh_idp)
    config["state"]["encryption_key_file"] = "./state.key"
    config["accounts"] = {"alice": {"provider": "idp", "refresh_token": seed["refresh_token"]}}
    tokend = tokend_factory(config)
    key_file = tokend.workdir / "state.key"
    write_key(key_file)
    tokend.start()
    tokend.wait_event("refresh", account="alice", outcome="success", rotated=True)
    token_file = tokend.token_file("alice")
    access_token = wait_until(lambda: token_file.exists() and token_file.read_text())
    assert tokend.stop() == 0
    rotated = [e["refresh_token_sha256"] for e in fresh_idp.log()]
    raw = state_bytes(tokend)
    assert access_token.encode() not in raw
    assert seed["refresh_token"].encode() not in raw
    assert b"enc1:" in raw

    # A wrong key: one line, exit 2, nothing sent to the IdP.
    fresh_idp.clear_log()
    good_key = key_file.read_bytes()
    write_key(key_file)
    code, log = start_fails(tokend)
    assert code == 2
    assert "does not open this state file" in log
    assert not fresh_idp.log()

    # tokend rekey (with the key the file was written with): re-sealed with a new key,
    # and the stored chain goes on from there (no new seed, no reuse).
    key_file.write_bytes(good_key)
    new_key = tokend.workdir / "new.key"
    new_raw = write_key(new_key)
    assert cli_main(["rekey", "-c", str(tokend.config_path), "--new-key-file", str(new_key)]) == 0
    out = capsys.readouterr()
    assert "1 account(s)" in out.out
    assert base64.b64encode(new_raw).decode() not in out.out + out.err
    config["state"]["encryption_key_file"] = "./new.key"
    tokend.start()
    tokend.wait_event("refresh", account="alice", outcome="success", rotated=True, count=2)
    assert tokend.stop() == 0
    assert fresh_idp.log()[0]["refresh_token_sha256"] not in rotated
    assert not tokend.events("seed_changed")
    assert not [e for e in fresh_idp.log() if e.get("error")]


@pytest.mark.anyio
async def test_store_seals_on_first_keyed_open_and_refuses_a_missing_key(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    plain = SqliteStore(path)
    await plain.open()
    record = StoredAccount(account="alice", refresh_token="rt-plain", updated_at=1.0)
    await plain.put(record)
    await plain.close()
    assert b"rt-plain" in path.read_bytes() + _wal(path)

    cipher = TokenCipher(os.urandom(32))
    sealed = SqliteStore(path, cipher=cipher)
    await sealed.open()
    assert (await sealed.load("alice")).refresh_token == "rt-plain"  # type: ignore[union-attr]
    await sealed.close()
    assert b"rt-plain" not in path.read_bytes() + _wal(path)

    for wrong, message in (
        (None, "no key is configured"),
        (TokenCipher(os.urandom(32)), "another key"),
    ):
        store = SqliteStore(path, cipher=wrong)
        with pytest.raises(StoreError) as caught:
            await store.open()
        assert message in str(caught.value)


def _wal(path: Path) -> bytes:
    wal = path.with_name(path.name + "-wal")
    return wal.read_bytes() if wal.exists() else b""
