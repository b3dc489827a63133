"""tokend as a process, end to end against the real IdP: refresh ahead of expiry,
rotation stored and used, crash recovery, every client auth method, single flight,
graceful drain, and no secret in any log line."""

from __future__ import annotations

import itertools
import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Tokend, base_config, wait_until
from tests.idp_harness import IdP


def stored_refresh_token(tokend: Tokend, account: str) -> str | None:
    db = tokend.workdir / "state" / "tokend.db"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        row = conn.execute(
            "SELECT refresh_token FROM accounts WHERE account = ?", (account,)
        ).fetchone()
    return row[0] if row else None


def grant_requests(idp: IdP, grant_id: str) -> list[dict[str, Any]]:
    return [e for e in idp.log() if e.get("grant_id") == grant_id]


def read_token_json(tokend: Tokend, account: str) -> dict[str, Any] | None:
    try:
        return tokend.token_json(account)
    except (OSError, ValueError):
        return None


def test_refreshes_before_expiry_and_uses_rotated_tokens(
    fresh_idp: IdP, tokend_factory: Any
) -> None:
    seeded = fresh_idp.seed_grant("basic-client")
    config = base_config(fresh_idp)
    config["accounts"]["alice"] = {"provider": "idp", "refresh_token": seeded["refresh_token"]}
    tokend = tokend_factory(config).start()

    first = wait_until(lambda: read_token_json(tokend, "alice"), what="first token")
    tokend.wait_event("refresh", count=3, account="alice", outcome="success")
    second = read_token_json(tokend, "alice")
    assert second is not None and second["access_token"] != first["access_token"]

    requests = grant_requests(fresh_idp, seeded["grant_id"])
    assert len(requests) >= 3
    assert all(r["status"] == 200 for r in requests)
    # Each refresh presents the token the previous one returned (rotation is used)...
    presented = [r["refresh_token_sha256"] for r in requests]
    assert len(set(presented)) == len(presented)
    assert presented[0] == IdP.token_sha256(seeded["refresh_token"])
    # ...and happens before the previous access token expired (5 s tokens).
    for earlier, later in itertools.pairwise(requests):
        assert later["t_start"] < earlier["t_end"] + 5.0 - 0.5

    # The store holds the newest rotated token, not the seed.
    stored = stored_refresh_token(tokend, "alice")
    assert stored is not None and stored != seeded["refresh_token"]
    assert tokend.stop() == 0


def test_kill_9_and_restart_carries_on_with_the_stored_token(
    fresh_idp: IdP, tokend_factory: Any
) -> None:
    seeded = fresh_idp.seed_grant("basic-client")
    config = base_config(fresh_idp)
    config["accounts"]["alice"] = {"provider": "idp", "refresh_token": seeded["refresh_token"]}
    tokend = tokend_factory(config).start()
    tokend.wait_event("refresh", count=2, account="alice", outcome="success")
    tokend.kill9()
    before_restart = stored_refresh_token(tokend, "alice")
    assert before_restart != seeded["refresh_token"]
    served_before = read_token_json(tokend, "alice")
    assert served_before is not None

    tokend.start()
    tokend.wait_event("refresh", count=3, account="alice", outcome="success")
    requests = grant_requests(fresh_idp, seeded["grant_id"])
    # The seed was presented once only: after the restart the stored chain is used,
    # and the IdP never saw a reused (rotated) token, which would revoke the grant.
    seed_hash = IdP.token_sha256(seeded["refresh_token"])
    assert [r["refresh_token_sha256"] for r in requests].count(seed_hash) == 1
    assert all(r["status"] == 200 for r in requests), requests
    assert tokend.stop() == 0


def test_every_client_auth_method(fresh_idp: IdP, tokend_factory: Any, idp_keys: Any) -> None:
    issuer = fresh_idp.issuer
    providers = {
        "basic": {
            "client_id": "basic-client",
            "client_secret": "basic-secret",
            "auth_method": "client_secret_basic",
        },
        "post": {
            "client_id": "post-client",
            "client_secret": "post-secret",
            "auth_method": "client_secret_post",
        },
        "jwt-es256": {
            "client_id": "jwt-client",
            "auth_method": "private_key_jwt",
            "private_key_file": str(idp_keys["ec_pem"]),
        },
        "jwt-rs256": {
            "client_id": "jwt-client",
            "auth_method": "private_key_jwt",
            "private_key_file": str(idp_keys["rsa_pem"]),
        },
        "jwt-jwk": {
            "client_id": "jwt-client",
            "auth_method": "private_key_jwt",
            "private_key_file": str(idp_keys["ec_jwk"]),
        },
        "public": {"client_id": "public-client", "auth_method": "none"},
        "cc": {
            "client_id": "cc-client",
            "client_secret": "s3cr:et/+&%=",
            "auth_method": "client_secret_basic",
        },
    }
    config = base_config(fresh_idp)
    config["providers"] = {
        name: {"token_endpoint": fresh_idp.token_endpoint, **p}
        if name == "post"
        else {"issuer": issuer, **p}
        for name, p in providers.items()
    }
    for name, p in providers.items():
        if name == "cc":
            config["accounts"]["cc"] = {
                "provider": "cc",
                "grant": "client_credentials",
                "scope": "read",
            }
        else:
            config["accounts"][name] = {
                "provider": name,
                "refresh_token": fresh_idp.seed(p["client_id"]),
            }
    tokend = tokend_factory(config)
    result = tokend.run_once()
    assert result.returncode == 0, tokend.log_text()[-3000:]
    for account in config["accounts"]:
        token = tokend.token_json(account)
        assert token is not None and token["access_token"], account
        assert token["expires_in"] > 0
        raw = tokend.token_file(account).read_text()
        assert raw == token["access_token"]
    seen = {e["client_id"]: set() for e in fresh_idp.log()}
    for entry in fresh_idp.log():
        seen[entry["client_id"]].add(entry["auth_method_seen"])
    assert seen["basic-client"] == {"basic"}
    assert seen["post-client"] == {"post"}
    assert seen["jwt-client"] == {"jwt"}
    assert seen["public-client"] == {"none"}
    assert seen["cc-client"] == {"basic"}
    assert tokend.token_json("cc")["scope"] == "read"  # type: ignore[index]
    assert all(e["user_agent"].startswith("tokend/") for e in fresh_idp.log())


def test_never_two_concurrent_refreshes_of_one_account(fresh_idp: IdP, tokend_factory: Any) -> None:
    config = base_config(fresh_idp)
    grants = []
    for i in range(12):
        seeded = fresh_idp.seed_grant("basic-client")
        grants.append(seeded["grant_id"])
        config["accounts"][f"acct{i}"] = {
            "provider": "idp",
            "refresh_token": seeded["refresh_token"],
        }
    # Slow answers make overlapping refreshes likely if single flight were broken.
    fresh_idp.fault("delay", delay_ms=700)
    fresh_idp.reset_stats()
    tokend = tokend_factory(config).start()
    tokend.wait_event("refresh", count=36, outcome="success", timeout=40)
    stats = fresh_idp.stats()
    per_grant = {g: stats["max_concurrent_per_grant"].get(g, 0) for g in grants}
    assert all(n == 1 for n in per_grant.values()), per_grant
    assert stats["max_concurrent_total"] > 1  # accounts themselves did run in parallel
    assert tokend.stop() == 0


def test_sigterm_drains_an_in_flight_refresh(fresh_idp: IdP, tokend_factory: Any) -> None:
    seeded = fresh_idp.seed_grant("basic-client")
    config = base_config(fresh_idp)
    config["accounts"]["alice"] = {"provider": "idp", "refresh_token": seeded["refresh_token"]}
    tokend = tokend_factory(config).start()
    tokend.wait_event("refresh", account="alice", outcome="success")
    fresh_idp.fault("delay", delay_ms=1500)
    # Wait until the next refresh is at the IdP, then ask tokend to stop.
    wait_until(
        lambda: any(r["t_end"] is None for r in grant_requests(fresh_idp, seeded["grant_id"])),
        timeout=10,
        what="a refresh in flight",
    )
    tokend.signal(signal.SIGTERM)
    assert tokend.proc is not None and tokend.proc.wait(15) == 0
    # The in-flight refresh finished and its rotated token was committed.
    last = grant_requests(fresh_idp, seeded["grant_id"])[-1]
    assert last["status"] == 200
    assert (
        IdP.token_sha256(stored_refresh_token(tokend, "alice") or "")
        != last["refresh_token_sha256"]
    )
    assert tokend.events("refresh", outcome="success")[-1]["account"] == "alice"
    assert tokend.events("stopped")


def test_once_exits_1_when_an_account_has_no_valid_token(
    fresh_idp: IdP, tokend_factory: Any
) -> None:
    good = fresh_idp.seed_grant("basic-client")
    dead = fresh_idp.seed_grant("basic-client")
    fresh_idp.revoke_grant(dead["grant_id"])
    config = base_config(fresh_idp)
    config["accounts"] = {
        "good": {"provider": "idp", "refresh_token": good["refresh_token"]},
        "dead": {"provider": "idp", "refresh_token": dead["refresh_token"]},
    }
    tokend = tokend_factory(config)
    result = tokend.run_once()
    assert result.returncode == 1
    assert tokend.token_json("good") is not None
    assert tokend.token_json("dead") is None
    assert tokend.events("refresh", account="dead", outcome="account_permanent")
    # The summary names the account (a field about tokens, not a token: not redacted).
    [done] = tokend.events("once_done")
    assert (done["ok"], done["accounts_without_token"]) == (False, ["dead"])


def test_restart_serves_valid_stored_tokens_at_once(fresh_idp: IdP, tokend_factory: Any) -> None:
    seeded = fresh_idp.seed_grant("basic-client")
    config = base_config(fresh_idp)
    config["refresh"] = {"min_margin": "1s"}
    fresh_idp.configure(access_token_ttl=120)
    config["accounts"]["alice"] = {"provider": "idp", "refresh_token": seeded["refresh_token"]}
    tokend = tokend_factory(config)
    assert tokend.run_once().returncode == 0
    first = tokend.token_json("alice")
    fresh_idp.clear_log()
    # A second --once finds a valid stored token: nothing to refresh, exit 0 at once.
    assert tokend.run_once().returncode == 0
    assert grant_requests(fresh_idp, seeded["grant_id"]) == []
    assert (
        tokend.token_json("alice") == first
        or tokend.token_json("alice")[  # type: ignore[index]
            "access_token"
        ]
        == first["access_token"]
    )  # type: ignore[index]


def test_a_new_seed_wins_over_the_stored_chain(fresh_idp: IdP, tokend_factory: Any) -> None:
    old = fresh_idp.seed_grant("basic-client")
    config = base_config(fresh_idp)
    seed_file = Path("seed")
    config["accounts"]["alice"] = {"provider": "idp", "refresh_token_file": str(seed_file)}
    tokend = tokend_factory(config)
    (tokend.workdir / seed_file).write_text(old["refresh_token"] + "\n")
    assert tokend.run_once().returncode == 0
    # The operator re-consents and drops in a new seed: it replaces the stored chain.
    new = fresh_idp.seed_grant("basic-client")
    fresh_idp.revoke_grant(old["grant_id"])
    (tokend.workdir / seed_file).write_text(new["refresh_token"] + "\n")
    fresh_idp.configure(access_token_ttl=5)
    time.sleep(0)  # (no timing involved: --once refreshes tokens near expiry anyway)
    config["refresh"] = {"min_margin": "10s"}  # force: 5 s tokens are always due
    assert tokend.run_once().returncode == 0
    assert grant_requests(fresh_idp, new["grant_id"])
    assert tokend.events("seed_changed", account="alice")


def test_no_secret_ever_appears_in_logs(fresh_idp: IdP, tokend_factory: Any, idp_keys: Any) -> None:
    canary_secret = "canary-client-secret-7f3a9c"
    seeded = fresh_idp.seed_grant("basic-client")
    config = base_config(fresh_idp)
    # A wrong secret at a second provider: its error path must not leak the secret.
    config["providers"]["wrong"] = {
        "issuer": fresh_idp.issuer,
        "client_id": "basic-client",
        "client_secret": canary_secret,
    }
    wrong_seed = fresh_idp.seed("basic-client")
    config["accounts"] = {
        "alice": {"provider": "idp", "refresh_token": seeded["refresh_token"]},
        "mallory": {"provider": "wrong", "refresh_token": wrong_seed},
    }
    tokend = tokend_factory(config).start()
    tokend.wait_event("refresh", count=3, account="alice", outcome="success")
    tokend.wait_event("refresh", account="mallory")
    assert tokend.stop() == 0
    log = tokend.log_text()
    secrets = {canary_secret, "basic-secret", seeded["refresh_token"], wrong_seed}
    stored = stored_refresh_token(tokend, "alice")
    assert stored
    secrets.add(stored)
    token = tokend.token_json("alice")
    assert token
    secrets.add(token["access_token"])
    leaked = [s for s in secrets if s in log]
    assert not leaked
    # Every line is JSON (nothing printed around the logger).
    for line in log.splitlines():
        json.loads(line)


def test_check_reports_errors_and_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "providers:\n  idp:\n    issuer: http://127.0.0.1:1\n    client_id: x\n"
        "    client_secret: hunter2-secret\n    tiemout: 3s\naccounts:\n"
        "  alice:\n    provider: nope\n    refresh_token: rt-canary-123\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "tokend", "check", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert f"{config}:6:5: providers.idp.tiemout" in result.stderr
    assert "accounts.alice.provider" in result.stderr
    assert "hunter2-secret" not in result.stderr + result.stdout
    assert "rt-canary-123" not in result.stderr + result.stdout

    config.write_text(config.read_text().replace("    tiemout: 3s\n", "").replace("nope", "idp"))
    result = subprocess.run(
        [sys.executable, "-m", "tokend", "check", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert "1 providers" in result.stdout or "1 provider" in result.stdout


def test_version() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tokend", "--version"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0 and result.stdout.startswith("tokend ")


@pytest.mark.skipif(sys.platform != "linux", reason="tmpfs mounts are Linux-only")
def test_full_disk_holds_the_rotated_token_and_publishes_nothing_until_saved(
    fresh_idp: IdP, tokend_factory: Any
) -> None:
    import ctypes
    import os

    seeded = fresh_idp.seed_grant("basic-client")
    config = base_config(fresh_idp)
    # Commit retries back off like refreshes; keep them short so that the recovery
    # after space returns is seconds, not minutes, however long the outage lasted.
    config["providers"]["idp"]["backoff"] = {"initial": "0.5s", "max": "2s"}
    config["accounts"]["alice"] = {"provider": "idp", "refresh_token": seeded["refresh_token"]}
    tokend = tokend_factory(config)
    state = tokend.workdir / "state"
    state.mkdir()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"tmpfs", str(state).encode(), b"tmpfs", 0, b"size=1m") != 0:
        pytest.skip(f"cannot mount a tmpfs here: {os.strerror(ctypes.get_errno())}")
    try:
        tokend.start()
        tokend.wait_event("refresh", count=1, account="alice", outcome="success")
        # The disk fills while a refresh is at the IdP: the in-flight mark was written,
        # the IdP rotates the token, and the commit of the rotated token fails.
        fresh_idp.fault("delay", delay_ms=2500)
        wait_until(
            lambda: any(r["t_end"] is None for r in grant_requests(fresh_idp, seeded["grant_id"])),
            timeout=15,
            what="a refresh in flight",
        )
        filler = state / "filler"
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        fresh_idp.fault("none")
        tokend.wait_event("commit_failed", account="alice", timeout=20)
        published = read_token_json(tokend, "alice")
        # While unsaved: nothing new is published and the IdP sees no further refresh.
        n_requests = len(grant_requests(fresh_idp, seeded["grant_id"]))
        tokend.wait_event("commit_failed", count=3, account="alice", timeout=30)
        # (The old token may meanwhile be marked expired; a new one never appears.)
        current = read_token_json(tokend, "alice")
        assert current is not None and published is not None
        assert current["access_token"] in (published["access_token"], None)
        assert len(grant_requests(fresh_idp, seeded["grant_id"])) == n_requests
        # Space comes back: the held token is committed, published, and used next.
        filler.unlink()
        tokend.wait_event("commit_recovered", account="alice", timeout=60)
        wait_until(
            lambda: (
                (read_token_json(tokend, "alice") or {}).get("access_token")
                not in (None, published["access_token"])
            ),
            what="new token file",
        )
        tokend.wait_event("refresh", count=3, account="alice", outcome="success", timeout=30)
        assert all(r["status"] == 200 for r in grant_requests(fresh_idp, seeded["grant_id"]))
        assert tokend.stop() == 0
    finally:
        if tokend.proc is not None and tokend.proc.poll() is None:
            tokend.proc.kill()
            tokend.proc.wait(10)
        libc.umount2(str(state).encode(), 2)
