"""Refresh-token lifetimes against the real IdP: an idle account is refreshed before its
refresh token would die of idleness (also right after a restart), and what tokend
knows of the chain's lifetime survives a SIGKILL."""

from __future__ import annotations

import itertools
import sqlite3
from typing import Any

from tests.conftest import Tokend, base_config, wait_until
from tests.idp_harness import IdP

MAX_IDLE = 12.0


def refreshes(idp: IdP, grant_id: str) -> list[dict[str, Any]]:
    return [
        e
        for e in idp.log()
        if e.get("grant_id") == grant_id
        and e["grant_type"] == "refresh_token"
        and e["status"] == 200
    ]


def stored(tokend: Tokend, account: str) -> dict[str, Any]:
    db = tokend.workdir / "state" / "tokend.db"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        conn.row_factory = sqlite3.Row
        row = conn.execute("SELECT * FROM accounts WHERE account = ?", (account,)).fetchone()
    conn.close()
    assert row is not None
    return dict(row)


def test_an_idle_account_is_kept_alive_and_its_chain_times_survive_a_kill(
    fresh_idp: IdP, tokend_factory: Any
) -> None:
    # Access tokens live 5 minutes, far beyond the 12 s idle window: only the idle
    # limit can make tokend refresh within it.
    fresh_idp.configure(access_token_ttl=300)
    config = base_config(fresh_idp)
    config["providers"]["idp"]["refresh_token_max_idle"] = f"{MAX_IDLE:g}s"
    config["providers"]["idp"]["refresh_token_max_age"] = "30d"
    seeded = fresh_idp.seed_grant("basic-client")
    grant = seeded["grant_id"]
    config["accounts"]["alice"] = {"provider": "idp", "refresh_token": seeded["refresh_token"]}
    tokend = tokend_factory(config).start()

    seen = wait_until(
        lambda: len(r := refreshes(fresh_idp, grant)) >= 3 and r, 30, what="3 refreshes"
    )
    starts = [r["t_start"] for r in seen]
    gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
    # Each comes before the idle window ends, and none is a loop.
    assert all(3.0 < gap < MAX_IDLE for gap in gaps), gaps
    before = wait_until(
        lambda: (row := stored(tokend, "alice"))["refresh_used_at"] >= starts[-1] - 1 and row,
        10,
        what="the last use stored",
    )
    assert before["consented_at"] is not None
    assert before["consented_at"] <= starts[0]

    tokend.kill9()
    last = refreshes(fresh_idp, grant)[-1]["t_start"]
    restarted = Tokend(tokend.workdir, config)
    restarted.log_path = tokend.workdir / "restarted.log"
    restarted.start()
    try:
        after = wait_until(
            lambda: [r for r in refreshes(fresh_idp, grant) if r["t_start"] > last],
            MAX_IDLE + 10,
            what="a refresh after the restart",
        )
        # The stored token is good for minutes: the refresh came for the idle limit,
        # counted from the last use before the kill.
        assert after[0]["t_start"] - last < MAX_IDLE
        restarted.wait_event("refresh", outcome="success", account="alice")
        assert stored(restarted, "alice")["consented_at"] == before["consented_at"]
    finally:
        restarted.stop()
