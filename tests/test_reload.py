"""SIGHUP reload: added accounts start, removed ones stop (their files go), unchanged
accounts are untouched, a bad config is rejected with the old one kept, and fixing a
provider's secret reopens its permanently open breaker."""

from __future__ import annotations

import signal
from typing import Any

from tests.conftest import base_config, wait_until
from tests.idp_harness import IdP


def test_reload_adds_removes_and_leaves_others_untouched(
    fresh_idp: IdP, tokend_factory: Any
) -> None:
    fresh_idp.configure(access_token_ttl=120)
    keep = fresh_idp.seed_grant("basic-client")
    gone = fresh_idp.seed_grant("basic-client")
    new = fresh_idp.seed_grant("basic-client")
    config = base_config(fresh_idp)
    config["accounts"] = {
        "keep": {"provider": "idp", "refresh_token": keep["refresh_token"]},
        "gone": {"provider": "idp", "refresh_token": gone["refresh_token"]},
    }
    tokend = tokend_factory(config).start()
    tokend.wait_event("refresh", outcome="success", count=2)
    keep_token = tokend.token_json("keep")
    assert (tokend.workdir / "tokens" / "gone").exists()
    fresh_idp.clear_log()

    del config["accounts"]["gone"]
    config["accounts"]["new"] = {"provider": "idp", "refresh_token": new["refresh_token"]}
    tokend.write_config(config)
    tokend.signal(signal.SIGHUP)
    tokend.wait_event("reloaded")
    tokend.wait_event("refresh", account="new", outcome="success")
    wait_until(lambda: not (tokend.workdir / "tokens" / "gone").exists(), what="files removed")
    # The unchanged account kept its token and was not refreshed by the reload.
    assert tokend.token_json("keep") == keep_token
    assert not [e for e in fresh_idp.log() if e["grant_id"] == keep["grant_id"]]
    assert tokend.stop() == 0


def test_bad_config_on_reload_is_rejected_and_the_old_one_kept(
    fresh_idp: IdP, tokend_factory: Any
) -> None:
    seeded = fresh_idp.seed_grant("basic-client")
    config = base_config(fresh_idp)
    config["accounts"]["alice"] = {"provider": "idp", "refresh_token": seeded["refresh_token"]}
    tokend = tokend_factory(config).start()
    tokend.wait_event("refresh", account="alice", outcome="success")
    tokend.config_path.write_text(tokend.config_path.read_text() + "\nbogus_key: 1\n")
    tokend.signal(signal.SIGHUP)
    rejected = tokend.wait_event("reload_rejected")[0]
    assert any("bogus_key" in line for line in rejected["errors"])
    # Still serving, still refreshing on the old config.
    tokend.wait_event("refresh", account="alice", outcome="success", count=3, timeout=20)
    assert tokend.stop() == 0


def test_fixing_an_invalid_client_secret_closes_the_breaker(
    fresh_idp: IdP, tokend_factory: Any
) -> None:
    seeded = fresh_idp.seed_grant("basic-client")
    config = base_config(fresh_idp)
    config["providers"]["idp"].pop("client_secret")
    config["providers"]["idp"]["client_secret_file"] = "client.secret"
    config["accounts"]["alice"] = {"provider": "idp", "refresh_token": seeded["refresh_token"]}
    tokend = tokend_factory(config)
    secret = tokend.workdir / "client.secret"
    secret.write_text("wrong-secret\n")
    tokend.start()
    opened = tokend.wait_event("circuit_opened", provider="idp")[0]
    assert opened["permanent"] is True
    requests_while_open = len(fresh_idp.log())
    secret.write_text("basic-secret\n")
    tokend.signal(signal.SIGHUP)
    tokend.wait_event("provider_updated", provider="idp")
    tokend.wait_event("refresh", account="alice", outcome="success", timeout=20)
    assert requests_while_open >= 1
    assert tokend.stop() == 0
