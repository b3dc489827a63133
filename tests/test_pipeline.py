"""The refresh pipeline's promises across restarts, crashes, drains and a shared state
file, against the real test IdP (rotation on) and tokend as a subprocess."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Tokend, base_config, wait_until
from tests.idp_harness import IdP


def grant_requests(idp: IdP, grant_ids: set[str]) -> list[dict[str, Any]]:
    return [e for e in idp.log() if e.get("grant_id") in grant_ids]


def stored(tokend: Tokend, account: str) -> dict[str, Any] | None:
    db = tokend.workdir / "state" / "tokend.db"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        conn.row_factory = sqlite3.Row
        row = conn.execute("SELECT * FROM accounts WHERE account = ?", (account,)).fetchone()
    return dict(row) if row else None


def hold_next_refresh_at_the_idp(idp: IdP, grant_id: str, delay_ms: int) -> None:
    """Delay the IdP's answers, and return once the grant's next refresh is at the IdP."""
    idp.fault("delay", delay_ms=delay_ms)
    wait_until(
        lambda: any(r["t_end"] is None for r in grant_requests(idp, {grant_id})),
        15,
        what="a refresh in flight",
    )


def many_accounts(idp: IdP, config: dict[str, Any], n: int) -> dict[str, str]:
    """``n`` accounts with fresh grants; returns account name -> grant id."""
    grants = {}
    for i in range(n):
        seeded = idp.seed_grant("basic-client")
        name = f"acct{i:03d}"
        config["accounts"][name] = {"provider": "idp", "refresh_token": seeded["refresh_token"]}
        grants[name] = seeded["grant_id"]
    return grants


def fast_provider(config: dict[str, Any]) -> None:
    config["providers"]["idp"]["rate_limit"] = {"rate": 200, "burst": 200}
    config["providers"]["idp"]["max_concurrency"] = 8


def successes(tokend: Tokend) -> set[str]:
    return {e["account"] for e in tokend.events("refresh", outcome="success")}


def test_restart_with_due_stored_tokens_strands_no_account(
    fresh_idp: IdP, tokend_factory: Any
) -> None:
    """A restart finding many valid but already-due tokens (token files on) refreshes
    every one of them: a wake-up that meets an account busy republishing its restored
    token is coalesced, not dropped."""
    fresh_idp.configure(access_token_ttl=30)
    config = base_config(fresh_idp)
    fast_provider(config)
    grants = many_accounts(fresh_idp, config, 300)
    first = tokend_factory(config, name="first").start()
    wait_until(lambda: successes(first) >= set(grants), 30, what="every first token")
    assert first.stop() == 0
    # Restart with the tokens (30 s, a few seconds old) already past their refresh time.
    config["refresh"] = {"at_fraction": 0.02, "jitter_fraction": 0, "min_margin": "1s"}
    second = Tokend(first.workdir, config)
    second.log_path = first.workdir / "second.log"
    second.start()
    try:
        wait_until(lambda: successes(second) >= set(grants), 30, what="every account refreshed")
        # And they stay scheduled: each refreshes again.
        wait_until(
            lambda: all(
                len(second.events("refresh", account=name, outcome="success")) >= 2
                for name in grants
            ),
            40,
            what="a second refresh of every account",
        )
    finally:
        assert second.stop() == 0


def test_once_refreshes_every_due_account(fresh_idp: IdP, tokend_factory: Any) -> None:
    fresh_idp.configure(access_token_ttl=30)
    config = base_config(fresh_idp)
    fast_provider(config)
    grants = many_accounts(fresh_idp, config, 60)
    tokend = tokend_factory(config)
    assert tokend.run_once().returncode == 0
    config["refresh"] = {"at_fraction": 0.01, "jitter_fraction": 0, "min_margin": "1s"}
    before = {e["grant_id"] for e in grant_requests(fresh_idp, set(grants.values()))}
    fresh_idp.reset()
    result = tokend.run_once()
    assert result.returncode == 0, result.stderr[-2000:]
    refreshed = {e["grant_id"] for e in grant_requests(fresh_idp, set(grants.values()))}
    assert before == refreshed == set(grants.values())
    assert all(e["status"] == 200 for e in fresh_idp.log())


def test_restart_after_kill9_retries_the_in_flight_refresh_at_once(
    fresh_idp: IdP, tokend_factory: Any
) -> None:
    """The successor of a killed process neither waits for its claims nor misses the
    IdP's reuse grace: the refresh found in flight is retried first, at once."""
    fresh_idp.configure(reuse_grace_seconds=15)
    seeded = fresh_idp.seed_grant("basic-client")
    config = base_config(fresh_idp)
    config["accounts"]["alice"] = {"provider": "idp", "refresh_token": seeded["refresh_token"]}
    tokend = tokend_factory(config).start()
    tokend.wait_event("refresh", account="alice", outcome="success")
    # The next refresh reaches the IdP, which rotates the token; tokend dies before the
    # answer arrives.
    hold_next_refresh_at_the_idp(fresh_idp, seeded["grant_id"], delay_ms=800)
    tokend.kill9()
    killed_at = time.time()
    row = stored(tokend, "alice")
    assert row is not None and row["in_flight_since"] is not None
    wait_until(
        lambda: all(
            r["t_end"] is not None for r in grant_requests(fresh_idp, {seeded["grant_id"]})
        ),
        10,
        what="the IdP to finish the abandoned request",
    )
    fresh_idp.fault("none")
    successor = Tokend(tokend.workdir, config)
    successor.log_path = tokend.workdir / "successor.log"
    successor.start()
    try:
        successor.wait_event("refresh_was_in_flight", account="alice", timeout=30)
        successor.wait_event("refresh", account="alice", outcome="success", timeout=30)
        retry = next(
            r for r in grant_requests(fresh_idp, {seeded["grant_id"]}) if r["t_start"] > killed_at
        )
        # Inside the grace: nothing was lost. (A successor that waited out the dead
        # process's claims, provider timeout + 30 s, would miss it.) Usually the IdP
        # rotated the token for the dead process and the retry is answered from the
        # grace; when the kill reached the IdP first, the token was never spent and
        # simply works. Either way the stored token still works: 200, not invalid_grant.
        assert retry["t_start"] - killed_at < 15.0
        assert retry["status"] == 200
        row = stored(successor, "alice")
        assert row is not None and row["in_flight_since"] is None
        successor.wait_event("refresh", account="alice", outcome="success", count=2, timeout=30)
        assert not successor.events("refresh", outcome="account_permanent")
    finally:
        assert successor.stop() == 0


def test_a_second_process_on_the_state_file_is_refused(fresh_idp: IdP, tokend_factory: Any) -> None:
    config = base_config(fresh_idp)
    grants = many_accounts(fresh_idp, config, 3)
    first = tokend_factory(config).start()
    wait_until(lambda: successes(first) >= set(grants), 20, what="first tokens")
    second = Tokend(first.workdir, config)
    second.log_path = first.workdir / "second.log"
    second.start()
    assert second.proc is not None and second.proc.wait(15) == 2
    errors = [e for e in second.events() if e.get("level") == "error"]
    assert [e["event"] for e in errors] == ["cannot_open_store"]
    assert f"pid {first.proc.pid}" in errors[0]["error"] if first.proc else False
    assert not second.events("refresh")
    # The first keeps every chain alive.
    fresh_idp.reset()
    wait_until(
        lambda: (
            {e["grant_id"] for e in fresh_idp.log() if e["status"] == 200} >= set(grants.values())
        ),
        20,
        what="the first process to keep refreshing",
    )
    assert not [e for e in fresh_idp.log() if e["status"] != 200]
    assert first.stop() == 0


def test_drain_starts_nothing_new_and_commits_what_is_in_flight(
    fresh_idp: IdP, tokend_factory: Any
) -> None:
    config = base_config(fresh_idp)
    # Half a second between requests: time enough, even on a loaded machine, for the
    # start to queue every account before the second is admitted.
    config["providers"]["idp"]["rate_limit"] = {"rate": 2, "burst": 1}
    config["providers"]["idp"]["max_concurrency"] = 1
    grants = many_accounts(fresh_idp, config, 30)
    fresh_idp.fault("delay", delay_ms=300)
    tokend = tokend_factory(config).start()
    # Paced at 2/s, most accounts wait in their provider's queue.
    wait_until(lambda: len(fresh_idp.log()) >= 3, 15, what="a few refreshes")
    tokend.signal(signal.SIGTERM)
    stopped_at = time.time()
    assert tokend.proc is not None and tokend.proc.wait(15) == 0
    started_after = [e for e in fresh_idp.log() if e["t_start"] > stopped_at + 0.05]
    assert started_after == []
    # Whatever reached the IdP was committed: each stored token is the newest rotation.
    for name, grant in grants.items():
        seen = grant_requests(fresh_idp, {grant})
        row = stored(tokend, name)
        assert row is not None
        if seen:
            assert all(e["status"] == 200 for e in seen)
            assert row["in_flight_since"] is None
            assert IdP.token_sha256(row["refresh_token"]) != seen[-1]["refresh_token_sha256"]
    assert tokend.events("stopped", exit_code=0)


@pytest.fixture
def tiny_state(tokend_factory: Any) -> Any:
    """A 1 MB tmpfs for the state directory of a tokend (a disk that fills)."""
    libc = ctypes.CDLL(None, use_errno=True)
    mounted: list[bytes] = []

    def mount(tokend: Tokend) -> Any:
        state = tokend.workdir / "state"
        state.mkdir()
        if libc.mount(b"tmpfs", str(state).encode(), b"tmpfs", 0, b"size=1m") != 0:
            pytest.skip(f"cannot mount a tmpfs here: {os.strerror(ctypes.get_errno())}")
        mounted.append(str(state).encode())
        return state

    yield mount
    for path in mounted:
        libc.umount2(path, 2)


def fill(directory: Any) -> Any:
    filler = directory / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


def test_drain_that_cannot_commit_says_so_and_exits_3(
    fresh_idp: IdP, tokend_factory: Any, tiny_state: Any
) -> None:
    seeded = fresh_idp.seed_grant("basic-client")
    config = base_config(fresh_idp, drain_timeout="3s")
    config["accounts"]["alice"] = {"provider": "idp", "refresh_token": seeded["refresh_token"]}
    tokend = tokend_factory(config)
    state = tiny_state(tokend)
    tokend.start()
    tokend.wait_event("refresh", account="alice", outcome="success")
    hold_next_refresh_at_the_idp(fresh_idp, seeded["grant_id"], delay_ms=1500)
    fill(state)
    tokend.signal(signal.SIGTERM)
    assert tokend.proc is not None and tokend.proc.wait(20) == 3
    critical = tokend.events("rotated_tokens_not_saved")
    assert critical and critical[0]["level"] == "critical"
    assert critical[0]["accounts"] == ["alice"]
    assert seeded["refresh_token"] not in tokend.log_text()


def test_a_deleted_state_file_is_rebuilt_and_shown_until_then(
    fresh_idp: IdP, tokend_factory: Any, short_dir: Any
) -> None:
    sock = short_dir / "t.sock"
    config = base_config(fresh_idp, socket=str(sock))
    grants = many_accounts(fresh_idp, config, 3)
    tokend = tokend_factory(config).start()
    wait_until(lambda: successes(tokend) >= set(grants), 20, what="first tokens")
    client = httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://t")
    state = tokend.workdir / "state"
    # The state file vanishes, and a directory takes its name: it cannot be rebuilt yet.
    for leftover in state.glob("tokend.db*"):
        if leftover.name != "tokend.db.lock":
            leftover.unlink()
    (state / "tokend.db").mkdir()
    degraded = tokend.wait_event("store_degraded", timeout=10)[0]
    assert "deleted" in degraded["error"] and degraded["level"] == "error"
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["store"]["degraded"] is True
    assert "tokend_store_degraded 1.0" in client.get("/metrics").text
    # Room for the file again: every record is written into a new one.
    (state / "tokend.db").rmdir()
    tokend.wait_event("store_recovered", timeout=40)
    assert client.get("/readyz").status_code == 200
    assert "tokend_store_degraded 0.0" in client.get("/metrics").text
    for name in grants:
        row = stored(tokend, name)
        assert row is not None and row["refresh_token"]
    # A crash now restarts from the rebuilt file and continues every chain.
    tokend.kill9()
    fresh_idp.reset()
    successor = Tokend(tokend.workdir, config)
    successor.log_path = tokend.workdir / "successor.log"
    successor.start()
    try:
        wait_until(lambda: successes(successor) >= set(grants), 20, what="chains continued")
        assert all(e["status"] == 200 for e in fresh_idp.log())
    finally:
        client.close()
        assert successor.stop() == 0


def test_earliest_expiry_goes_first_and_waiting_accounts_say_queued(
    fresh_idp: IdP, tokend_factory: Any, short_dir: Any
) -> None:
    """More accounts due than the provider's rate admits: the tokens that expire first
    are refreshed first, not the accounts that came due first."""
    fresh_idp.configure(access_token_ttl=60)
    sock = short_dir / "t.sock"
    config = base_config(fresh_idp, socket=str(sock))
    grants = many_accounts(fresh_idp, config, 12)
    tokend = tokend_factory(config).start()
    wait_until(lambda: successes(tokend) >= set(grants), 20, what="first tokens")
    assert tokend.stop() == 0
    # Give the stored tokens different expiries, all of them long past their refresh time.
    db = tokend.workdir / "state" / "tokend.db"
    now = time.time()
    expiry = {name: now + 20 + 3 * i for i, name in enumerate(reversed(sorted(grants)))}
    with sqlite3.connect(db) as conn:
        for name, at in expiry.items():
            conn.execute(
                "UPDATE accounts SET expires_at = ?, issued_at = ? WHERE account = ?",
                (at, at - 600, name),
            )
    # Half a second between requests: time enough, even on a loaded machine, for the
    # start to queue every account before the second is admitted.
    config["providers"]["idp"]["rate_limit"] = {"rate": 2, "burst": 1}
    config["providers"]["idp"]["max_concurrency"] = 1
    fresh_idp.reset()
    fresh_idp.configure(access_token_ttl=60)  # no account comes due twice meanwhile
    restarted = Tokend(tokend.workdir, config)
    restarted.log_path = tokend.workdir / "restarted.log"
    restarted.start()
    client = httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://t")
    try:
        wait_until(lambda: sock.exists(), 10, what="the socket")
        states = {a["name"]: a["state"] for a in client.get("/v1/accounts").json()["accounts"]}
        assert "queued" in states.values()
        wait_until(lambda: successes(restarted) >= set(grants), 30, what="every refresh")
        order = [e["account"] for e in restarted.events("refresh", outcome="success")]
        # The first goes as soon as it comes due (the bucket holds one request); by the
        # next, every account is queued, and they go in order of expiry.
        assert order[1 : len(grants)] == sorted(set(grants) - {order[0]}, key=expiry.__getitem__)
    finally:
        client.close()
        assert restarted.stop() == 0


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: a unix socket's path is limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="tkd"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_chaos_short_kill9_during_rotation_loses_nothing_inside_a_grace(
    fresh_idp: IdP, tmp_path: Path
) -> None:
    """A short run of ``python -m bench chaos``: kill -9 at random moments while short
    tokens rotate, then a clean run. With a reuse grace (Okta's 30 s, generous enough
    for a slow machine's restarts; the benchmark measures a grace of a few seconds) no
    account is lost, and every refresh token presented twice (a rotation a kill lost: one
    kill may lose several accounts' at once) is one the grace accepted."""
    from bench.chaos import run_chaos

    provider = base_config(fresh_idp)["providers"]["idp"]
    result = run_chaos(
        fresh_idp,
        tmp_path,
        provider=provider,
        client_id="basic-client",
        accounts=6,
        kills=4,
        grace=30.0,
        seed=7,
        let_recover=True,
    )
    assert result.lost == []
    assert result.grace_reuses == result.represented
    assert result.represented <= result.kills * result.accounts
    assert result.refreshes > result.kills


def test_a_dead_chain_stays_dead_across_a_restart(fresh_idp: IdP, tokend_factory: Any) -> None:
    """After invalid_grant the account needs re-authorization, and a restart does not
    send the dead token again: the state comes back from the store."""
    seeded = fresh_idp.seed_grant("basic-client")
    fresh_idp.revoke_grant(seeded["grant_id"])
    config = base_config(fresh_idp)
    config["accounts"]["alice"] = {"provider": "idp", "refresh_token": seeded["refresh_token"]}
    tokend = tokend_factory(config)
    assert tokend.run_once().returncode == 1
    assert len(grant_requests(fresh_idp, {seeded["grant_id"]})) == 1
    assert tokend.run_once().returncode == 1
    assert len(grant_requests(fresh_idp, {seeded["grant_id"]})) == 1
