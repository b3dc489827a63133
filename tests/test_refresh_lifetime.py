"""Refresh-token lifetimes against the real IdP: an idle account is refreshed before its
refresh token would die of idleness (also right after a restart), and what tokend
knows of the chain's lifetime survives a SIGKILL."""

from __future__ import annotations

import itertools
import json
import re
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

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


def test_an_expiry_the_idp_reports_becomes_a_deadline_in_status_metrics_and_logs(
    fresh_idp: IdP, tokend_factory: Any
) -> None:
    # As Keycloak's SSO session max: every token response counts down to the same end.
    end = time.time() + 3 * 86400
    fresh_idp.configure(refresh_expires_at=end)
    sock_dir = Path(tempfile.mkdtemp(prefix="tokend-", dir="/tmp"))
    sock = sock_dir / "t.sock"
    config = base_config(
        fresh_idp, socket=str(sock), metrics_listen="127.0.0.1:0", per_account_metrics=True
    )
    seeded = fresh_idp.seed_grant("basic-client")
    config["accounts"]["alice"] = {"provider": "idp", "refresh_token": seeded["refresh_token"]}
    tokend = tokend_factory(config).start()
    try:
        port = tokend.wait_event("metrics_listening")[0]["port"]
        client = httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://t")

        def alice() -> dict[str, Any]:
            accounts = client.get("/v1/accounts").json()["accounts"]
            return next(a for a in accounts if a["name"] == "alice")

        # The first answer alone cannot tell a sliding expiry from a fixed one; the
        # next refresh (5 s tokens) shows it did not move: a deadline.
        view = wait_until(lambda: (a := alice())["reauth_deadline"] and a, 20, what="a deadline")
        assert abs(view["reauth_deadline"] - end) <= 2
        assert view["reauth_warning"] is True  # within the default 14 days
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        deadline = re.search(
            r'^tokend_reauth_deadline_seconds\{account="alice"\} (\S+)$', metrics, re.M
        )
        assert deadline is not None and abs(float(deadline.group(1)) - end) <= 2
        assert re.search(r'^tokend_reauth_warning_accounts\{provider="idp"\} 1\.0$', metrics, re.M)
        logged = tokend.wait_event("reauth_due_soon", account="alice")
        # Once a day at most: the refreshes since said nothing more.
        tokend.wait_event("refresh", outcome="success", account="alice", count=3)
        assert len(tokend.events("reauth_due_soon")) == 1
        assert logged[0]["level"] == "warning" and 2.9 < logged[0]["days_left"] <= 3.0
        assert seeded["refresh_token"] not in json.dumps(logged)
    finally:
        tokend.stop()
        shutil.rmtree(sock_dir, ignore_errors=True)
