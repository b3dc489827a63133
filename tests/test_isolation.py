"""Providers stay apart, and a reload's new accounts start with the new publishers:
tokend as a subprocess against the real test IdP."""

from __future__ import annotations

import signal
import time
from typing import Any

from tests.conftest import base_config, wait_until
from tests.idp_harness import POST_SECRET, IdP


def test_one_providers_backlog_never_delays_another(fresh_idp: IdP, tokend_factory: Any) -> None:
    """A provider paced far below its backlog holds only its own accounts: a second,
    healthy provider's accounts get their tokens at once."""
    config = base_config(fresh_idp)
    config["providers"]["idp"]["rate_limit"] = {"rate": 5, "burst": 1}
    config["providers"]["other"] = {
        "issuer": fresh_idp.issuer,
        "client_id": "post-client",
        "client_secret": POST_SECRET,
        "auth_method": "client_secret_post",
        "timeout": "3s",
    }
    slow = [f"slow{i:03d}" for i in range(250)]
    fast = [f"fast{i}" for i in range(3)]
    for name in slow:
        seed = fresh_idp.seed("basic-client")
        config["accounts"][name] = {"provider": "idp", "refresh_token": seed}
    for name in fast:
        seed = fresh_idp.seed("post-client")
        config["accounts"][name] = {"provider": "other", "refresh_token": seed}
    tokend = tokend_factory(config).start()
    started = time.monotonic()
    tokend.wait_event("starting")

    def refreshed(names: list[str]) -> set[str]:
        hits = tokend.events("refresh", outcome="success")
        return {e["account"] for e in hits} & set(names)

    wait_until(lambda: refreshed(fast) == set(fast), 30, what="the healthy provider's tokens")
    # 250 accounts at 5/s take 50 s; the other provider did not wait behind them (with
    # shared slots it waited for its place among them: on average half the backlog).
    assert len(refreshed(slow)) < 40, time.monotonic() - started
    assert tokend.stop() == 0


def test_reload_publishes_a_readded_account_with_the_new_outputs(
    fresh_idp: IdP, tokend_factory: Any
) -> None:
    fresh_idp.configure(access_token_ttl=60)
    config = base_config(fresh_idp)
    config["accounts"]["alice"] = {
        "provider": "idp",
        "refresh_token": fresh_idp.seed("basic-client"),
    }
    bob = {"provider": "idp", "refresh_token": fresh_idp.seed("basic-client")}
    config["accounts"]["bob"] = dict(bob)
    tokend = tokend_factory(config).start()
    tokend.wait_event("refresh", account="bob", outcome="success")
    del config["accounts"]["bob"]
    tokend.write_config()
    tokend.signal(signal.SIGHUP)
    tokend.wait_event("account_removed", account="bob")
    # Back, with an output it never had: its stored (still valid) token is published
    # through the new outputs at once, not at its next refresh in ~45 s.
    config["accounts"]["bob"] = {
        **bob,
        "outputs": [{"file": "auth-header", "template": "Authorization: Bearer {access_token}"}],
    }
    tokend.write_config()
    tokend.signal(signal.SIGHUP)
    tokend.wait_event("account_added", account="bob")
    header = tokend.workdir / "tokens" / "bob" / "auth-header"
    wait_until(header.exists, 5, what="bob's new output")
    token = (tokend.workdir / "tokens" / "bob" / "token").read_text()
    assert header.read_text() == f"Authorization: Bearer {token}"
    assert len(tokend.events("refresh", account="bob", outcome="success")) == 1
    assert tokend.stop() == 0
