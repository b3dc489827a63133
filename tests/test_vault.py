"""Seeds from a real OpenBao server, with the real IdP rotating refresh tokens: rotated
tokens written back with check-and-set, a new pod continuing from the vault, a vault
outage caught up, a conflicting writer adopted, changed seeds reviving accounts."""

from __future__ import annotations

import os
import sqlite3
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Tokend, base_config, wait_until
from tests.idp_harness import IdP
from tests.vault_harness import Bao, free_port


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes; pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="tkv-", dir="/tmp") as d:
        yield Path(d)


def vault_config(
    idp: IdP, bao: Bao, workdir: Path, auth: dict[str, Any] | None = None, **vault: Any
) -> dict[str, Any]:
    config = base_config(idp)
    workdir.mkdir(parents=True, exist_ok=True)
    if auth is None:
        token_file = workdir / "vault-token"
        token_file.write_text(bao.token(["tokend"]) + "\n")
        auth = {"method": "token", "token_file": str(token_file)}
    config["vault"] = {
        "address": bao.address,
        "auth": auth,
        "timeout": "1s",
        "poll_interval": "1s",
        **vault,
    }
    return config


def seed_in_vault(idp: IdP, bao: Bao) -> tuple[str, dict[str, Any]]:
    """A new grant whose refresh token is in a new secret; (path, grant)."""
    grant = idp.seed_grant("basic-client")
    path = f"tokend/{uuid.uuid4().hex[:10]}"
    bao.put_secret(path, {"refresh_token": grant["refresh_token"], "owner": "team-a"})
    return path, grant


def stored_refresh_token(tokend: Tokend, account: str) -> str:
    db = tokend.workdir / "state" / "tokend.db"
    with sqlite3.connect(db) as conn:
        (token,) = conn.execute(
            "SELECT refresh_token FROM accounts WHERE account = ?", (account,)
        ).fetchone()
    return str(token)


def reuse_detections(idp: IdP) -> int:
    """Requests presenting a refresh token already spent (the IdP revokes the grant)."""
    log = [e for e in idp.log() if e["grant_type"] == "refresh_token"]
    spent = [e["refresh_token_sha256"] for e in log if e["status"] == 200]
    invalid = [e for e in log if e.get("error") == "invalid_grant"]
    return len(invalid) + (len(spent) - len(set(spent)))


def api(sock: Path, path: str) -> Any:
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), timeout=5) as client:
        return client.get(f"http://tokend{path}").json()


def test_rotation_written_back_and_a_new_pod_continues_from_the_vault(
    fresh_idp: IdP, bao: Bao, tokend_factory: Any, tmp_path: Path
) -> None:
    path, grant = seed_in_vault(fresh_idp, bao)
    role_id, secret_id = bao.approle("pod", token_ttl="1m")
    (tmp_path / "secret-id").write_text(secret_id)
    config = vault_config(
        fresh_idp,
        bao,
        tmp_path,
        auth={
            "method": "approle",
            "role_id": role_id,
            "secret_id_file": str(tmp_path / "secret-id"),
        },
    )
    config["accounts"] = {
        "alice": {"provider": "idp", "refresh_token": f"vault://secret/{path}#refresh_token"}
    }
    tokend = tokend_factory(config, name="pod-1").start()
    tokend.wait_event("refresh", account="alice", outcome="success", rotated=True, count=2)
    assert tokend.stop() == 0
    data, version = bao.get_secret(path)
    # Each rotation became a new version; the newest holds the token tokend goes on with,
    # and the secret's other fields are kept.
    assert version >= 3
    assert data == {"refresh_token": stored_refresh_token(tokend, "alice"), "owner": "team-a"}
    assert tokend.events("vault_login", method="approle")

    # A new pod: no local state, the same vault.
    config_2 = dict(config)
    pod_2 = tokend_factory(config_2, name="pod-2").start()
    pod_2.wait_event("refresh", account="alice", outcome="success", rotated=True, count=2)
    assert pod_2.stop() == 0
    assert bao.get_secret(path)[0]["refresh_token"] == stored_refresh_token(pod_2, "alice")
    assert reuse_detections(fresh_idp) == 0
    assert {e["grant_id"] for e in fresh_idp.log()} == {grant["grant_id"]}


def test_vault_outage_keeps_serving_and_the_write_back_catches_up(
    fresh_idp: IdP, bao: Bao, tokend_factory: Any, tmp_path: Path, sock_dir: Path
) -> None:
    path, _ = seed_in_vault(fresh_idp, bao)
    metrics_port = free_port()
    config = vault_config(fresh_idp, bao, tmp_path)
    config["serve"].update(socket=str(sock_dir / "s"), metrics_listen=f"127.0.0.1:{metrics_port}")
    config["accounts"] = {
        "alice": {"provider": "idp", "refresh_token": f"vault://secret/{path}#refresh_token"}
    }
    tokend = tokend_factory(config).start()
    tokend.wait_event("refresh", account="alice", outcome="success")
    bao.pause()
    try:
        before = len(tokend.events("refresh", account="alice", outcome="success"))
        tokend.wait_event("write_back_failed", account="alice", timeout=20)
        # Serving goes on from the local store: tokens keep rotating and being published.
        tokend.wait_event("refresh", account="alice", outcome="success", count=before + 1)
        (account,) = api(sock_dir / "s", "/v1/accounts")["accounts"]
        assert account["vault_writeback_pending"] is True and account["state"] == "valid"
        ready = httpx.get(f"http://127.0.0.1:{metrics_port}/readyz", timeout=5)
        assert ready.status_code == 200
        assert ready.json()["vault_writeback_pending"] == ["alice"]
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
        assert "tokend_vault_writeback_pending 1.0" in metrics
    finally:
        bao.resume()
    tokend.wait_event("vault_writeback_caught_up", account="alice", timeout=90)
    wait_until(
        lambda: not api(sock_dir / "s", "/v1/accounts")["accounts"][0]["vault_writeback_pending"],
        what="pending cleared",
    )
    assert tokend.stop() == 0
    assert bao.get_secret(path)[0]["refresh_token"] == stored_refresh_token(tokend, "alice")

    # Pending across a crash: the owed write-back is in the store, and the next start
    # finishes it.
    tokend.start()
    tokend.wait_event("refresh", account="alice", outcome="success", count=before + 2)
    bao.pause()
    try:
        tokend.wait_event("write_back_failed", account="alice", count=2, timeout=20)
        tokend.kill9()
    finally:
        bao.resume()
    tokend.start()
    count = len(tokend.events("refresh", account="alice", outcome="success"))
    tokend.wait_event("refresh", account="alice", outcome="success", count=count + 1)
    assert tokend.stop() == 0
    assert bao.get_secret(path)[0]["refresh_token"] == stored_refresh_token(tokend, "alice")
    assert reuse_detections(fresh_idp) == 0


def test_a_conflicting_writer_wins_and_its_token_is_adopted(
    fresh_idp: IdP, bao: Bao, tokend_factory: Any, tmp_path: Path
) -> None:
    path, first = seed_in_vault(fresh_idp, bao)
    # Polled rarely: only the check-and-set of the write-back finds the other writer.
    config = vault_config(fresh_idp, bao, tmp_path, poll_interval="1h")
    config["accounts"] = {
        "alice": {"provider": "idp", "refresh_token": f"vault://secret/{path}#refresh_token"}
    }
    tokend = tokend_factory(config).start()
    tokend.wait_event("refresh", account="alice", outcome="success", rotated=True)
    # Someone else (an operator re-consenting) writes a new grant's token.
    second = fresh_idp.seed_grant("basic-client")
    theirs = bao.put_secret(path, {"refresh_token": second["refresh_token"], "owner": "ops"})
    tokend.wait_event("seed_replaced", account="alice", timeout=20)
    tokend.wait_event(
        "refresh", account="alice", outcome="success", count=len(tokend.events("refresh")) + 1
    )
    assert tokend.stop() == 0
    # Their version was never overwritten: every later version continues their grant.
    versions = bao.call("GET", f"secret/metadata/{path}")["data"]["current_version"]
    assert versions > theirs
    assert bao.call("GET", f"secret/data/{path}?version={theirs}")["data"]["data"] == {
        "refresh_token": second["refresh_token"],
        "owner": "ops",
    }
    after = [e for e in fresh_idp.log() if e["t_start"] > 0 and e["grant_id"] == second["grant_id"]]
    assert after and all(e["status"] == 200 for e in after)
    assert bao.get_secret(path)[0]["refresh_token"] == stored_refresh_token(tokend, "alice")
    assert reuse_detections(fresh_idp) == 0
    assert first["grant_id"] != second["grant_id"]


def test_a_new_seed_revives_needs_reauth_from_the_vault_and_from_a_secret_volume(
    fresh_idp: IdP, bao: Bao, tokend_factory: Any, tmp_path: Path
) -> None:
    path, dead = seed_in_vault(fresh_idp, bao)
    fresh_idp.revoke_grant(dead["grant_id"])
    # A Kubernetes Secret volume: the file is a symlink through ..data to a version dir.
    volume = tmp_path / "secret-volume"
    (volume / "..v1").mkdir(parents=True)
    dead_file = fresh_idp.seed_grant("basic-client")
    fresh_idp.revoke_grant(dead_file["grant_id"])
    (volume / "..v1" / "refresh_token").write_text(dead_file["refresh_token"])
    os.symlink("..v1", volume / "..data")
    os.symlink("..data/refresh_token", volume / "refresh_token")
    config = vault_config(fresh_idp, bao, tmp_path)
    config["accounts"] = {
        "alice": {
            "provider": "idp",
            "refresh_token": f"vault://secret/{path}#refresh_token",
            "write_back": False,
        },
        "bob": {"provider": "idp", "refresh_token_file": str(volume / "refresh_token")},
    }
    tokend = tokend_factory(config).start()
    for name in ("alice", "bob"):
        tokend.wait_event("refresh", account=name, state="needs_reauth")
    version = bao.put_secret(path, {"refresh_token": fresh_idp.seed("basic-client")})
    (volume / "..v2").mkdir()
    (volume / "..v2" / "refresh_token").write_text(fresh_idp.seed("basic-client"))
    os.symlink("..v2", volume / "..data.tmp")
    os.replace(volume / "..data.tmp", volume / "..data")
    for name in ("alice", "bob"):
        tokend.wait_event("seed_replaced", account=name)
        tokend.wait_event("refresh", account=name, outcome="success")
    assert tokend.stop() == 0
    # A read-only seed is never written to.
    assert bao.get_secret(path)[1] == version


def test_bad_vault_seeds_are_one_line_each_and_the_others_run(
    fresh_idp: IdP, bao: Bao, tokend_factory: Any, tmp_path: Path
) -> None:
    good, _ = seed_in_vault(fresh_idp, bao)
    nofield = f"tokend/{uuid.uuid4().hex[:10]}"
    bao.put_secret(nofield, {"other": "s3cret-other-value"})
    config = vault_config(fresh_idp, bao, tmp_path)
    bad = {
        "missing": "vault://secret/tokend/not-there#refresh_token",
        "nofield": f"vault://secret/{nofield}#refresh_token",
        "kvone": "vault://kv1/tokend/alice#refresh_token",
        "denied": "vault://secret/other-team/alice#refresh_token",
    }
    config["accounts"] = {
        "good": {"provider": "idp", "refresh_token": f"vault://secret/{good}#refresh_token"},
        **{name: {"provider": "idp", "refresh_token": ref} for name, ref in bad.items()},
    }
    tokend = tokend_factory(config).start()
    tokend.wait_event("refresh", account="good", outcome="success")
    errors = {e["account"]: e["error"] for e in tokend.events("seed_unreadable")}
    assert set(errors) == set(bad)
    assert "no such secret" in errors["missing"]
    assert "field 'refresh_token' is missing" in errors["nofield"]
    assert "KV version 1" in errors["kvone"]
    assert "permission denied" in errors["denied"]
    for name, error in errors.items():
        assert "\n" not in error and f"account {name}" in error
    assert "s3cret-other-value" not in tokend.log_text()
    assert tokend.stop() == 0


def test_a_sign_in_writes_the_new_seed_to_the_vault(
    fresh_idp: IdP, bao: Bao, tmp_path: Path
) -> None:
    import anyio
    import yaml

    from tokend.config import load_config
    from tokend.login import LoginError, deliver_seed

    path, _ = seed_in_vault(fresh_idp, bao)
    config = vault_config(fresh_idp, bao, tmp_path)
    config["accounts"] = {
        "alice": {"provider": "idp", "refresh_token": f"vault://secret/{path}#refresh_token"},
        "bob": {
            "provider": "idp",
            "refresh_token": f"vault://secret/{path}#bob",
            "write_back": False,
        },
        "carol": {"provider": "idp", "refresh_token": "vault://secret/tokend/new-one#rt"},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    loaded = load_config(tmp_path / "config.yaml")
    said = anyio.run(deliver_seed, loaded, "alice", loaded.accounts["alice"], "signed-in-token")
    assert "version 2" in said
    assert bao.get_secret(path) == ({"refresh_token": "signed-in-token", "owner": "team-a"}, 2)
    # tokend's own policy has no 'create': a new secret is the operator's to make.
    with pytest.raises(LoginError, match="needs 'create' on secret/data/tokend/new-one"):
        anyio.run(deliver_seed, loaded, "carol", loaded.accounts["carol"], "carol-token")
    with pytest.raises(LoginError, match="read-only"):
        anyio.run(deliver_seed, loaded, "bob", loaded.accounts["bob"], "x")


def test_sighup_re_reads_a_vault_seed_whose_version_moved(
    fresh_idp: IdP, bao: Bao, tokend_factory: Any, tmp_path: Path
) -> None:
    import signal

    path, dead = seed_in_vault(fresh_idp, bao)
    fresh_idp.revoke_grant(dead["grant_id"])
    # Never polled: only the SIGHUP looks at the vault again.
    config = vault_config(fresh_idp, bao, tmp_path, poll_interval="1h")
    config["accounts"] = {
        "alice": {"provider": "idp", "refresh_token": f"vault://secret/{path}#refresh_token"}
    }
    tokend = tokend_factory(config).start()
    tokend.wait_event("refresh", account="alice", state="needs_reauth")
    bao.put_secret(path, {"refresh_token": fresh_idp.seed("basic-client")})
    tokend.signal(signal.SIGHUP)
    tokend.wait_event("seed_replaced", account="alice")
    tokend.wait_event("refresh", account="alice", outcome="success")
    assert tokend.stop() == 0
