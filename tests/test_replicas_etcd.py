"""Replicas sharing accounts through a real 3-member etcd cluster, against the real IdP
with refresh token rotation on and no reuse grace: each account is refreshed by one
replica at a time, every replica serves every account, a dead replica's accounts are
taken over, and a paused replica that lost its lease commits nothing. A seed in a vault
is written back by the account's owner alone, and a takeover goes on with its chain."""

from __future__ import annotations

import base64
import io
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import Tokend, base_config, wait_until
from tests.etcd_cluster import EtcdCluster
from tests.idp_harness import IdP
from tests.vault_harness import Bao
from tokend.client_commands import status_command
from tokend.store._crypto import RecordCipher

LEASE_TTL = 2.0
# Half of it is the refresh margin, which must outlast the worst a kill can cost an
# account: the lease (2 s), a rebalance, an etcd leader election stalling writes
# (1.3-1.7 s here) and the refresh itself, on a machine loaded by the whole suite.
TOKEN_TTL = 12


class Fleet:
    """Replicas of one deployment: same config, same prefix, one workdir each."""

    def __init__(
        self,
        factory: Callable[..., Tokend],
        config: dict[str, Any],
        key: bytes,
        etcd: EtcdCluster,
    ) -> None:
        self.factory = factory
        self.config = config
        self.key = key
        self.etcd = etcd
        self.prefix: str = config["state"]["prefix"]
        self.replicas: list[Tokend] = []
        self.generation = 0
        # Called with each replica's workdir before it starts (its own files there).
        self.prepare: Callable[[Path], None] | None = None

    def start(self, count: int) -> list[Tokend]:
        started = [self.start_one() for _ in range(count)]
        for replica in started:
            replica.wait_event("etcd_joined")
        return started

    def start_one(self) -> Tokend:
        self.generation += 1
        replica = self.factory(self.config, name=f"replica-{self.generation}")
        (replica.workdir / "state.key").write_bytes(self.key)
        if self.prepare is not None:
            self.prepare(replica.workdir)
        replica.start()
        self.replicas.append(replica)
        return replica

    def alive(self) -> list[Tokend]:
        return [r for r in self.replicas if r.proc is not None and r.proc.poll() is None]

    @staticmethod
    def replica_id(replica: Tokend) -> str:
        return str(replica.wait_event("etcd_joined")[-1]["replica"])

    def records(self) -> dict[str, dict[str, Any]]:
        """Every account's record as stored: writer, revision and the decrypted body."""
        cipher = RecordCipher(self.key)
        out = {}
        for key, kv in self.etcd.get_prefix(self.prefix + "accounts/").items():
            account = key.rsplit("/", 1)[1]
            envelope = orjson.loads(kv["value"])
            body = orjson.loads(cipher.open(account, base64.b64decode(envelope["sealed"])))
            out[account] = {
                "by": envelope["by"],
                "lease": envelope["lease"],
                "mod_revision": int(kv["mod_revision"]),
                **body,
            }
        return out


@pytest.fixture
def fleet(
    etcd: EtcdCluster, fresh_idp: IdP, tokend_factory: Callable[..., Tokend], tmp_path: Path
) -> Fleet:
    config = base_config(fresh_idp)
    config["state"] = {
        "backend": "etcd",
        "endpoints": etcd.endpoints,
        "prefix": f"/replicas-{tmp_path.name}/",
        "encryption_key_file": "./state.key",
        "lease_ttl": f"{LEASE_TTL:g}s",
    }
    config["serve"]["drain_timeout"] = "3s"
    # A dead owner's accounts wait up to the lease TTL and a rebalance for their new
    # owner: the refresh margin covers that, so nobody is handed an expired token.
    fresh_idp.configure(access_token_ttl=TOKEN_TTL)
    config["refresh"] = {"min_margin": f"{TOKEN_TTL / 2:g}s"}
    return Fleet(tokend_factory, config, os.urandom(32), etcd)


def seed_accounts(fleet: Fleet, idp: IdP, count: int) -> list[str]:
    names = [f"acct-{i}" for i in range(count)]
    fleet.config["accounts"] = {
        name: {"provider": "idp", "refresh_token": idp.seed("basic-client")} for name in names
    }
    return names


def socket_get(replica: Tokend, path: str) -> httpx.Response:
    transport = httpx.HTTPTransport(uds=str(replica.workdir / "tokend.sock"))
    with httpx.Client(transport=transport, base_url="http://tokend", timeout=5) as client:
        return client.get(path)


def accounts_view(replica: Tokend) -> dict[str, dict[str, Any]]:
    """/v1/accounts of ``replica``, by account name."""
    return {a["name"]: a for a in socket_get(replica, "/v1/accounts").json()["accounts"]}


def owned_gauge(replica: Tokend) -> float:
    for line in socket_get(replica, "/metrics").text.splitlines():
        if line.startswith("tokend_accounts_owned "):
            return float(line.split()[1])
    raise AssertionError("no tokend_accounts_owned in /metrics")


def token_file_valid(replica: Tokend, account: str, now: float) -> bool:
    data = replica.token_json(account)
    return data is not None and float(data["expires_at"]) > now


def reuse_detections(idp: IdP) -> list[str]:
    """Refresh tokens presented more than once (each such request is a reuse to the IdP,
    which revokes the grant)."""
    counts = Counter(
        e["refresh_token_sha256"]
        for e in idp.log()
        if e["grant_type"] == "refresh_token" and e["refresh_token_sha256"]
    )
    return [sha for sha, n in counts.items() if n > 1]


class Reader:
    """Reads every account's token file from every running replica, continuously, and
    records any token it was handed after that token's expiry."""

    def __init__(self, fleet: Fleet, accounts: list[str]) -> None:
        self.fleet = fleet
        self.accounts = accounts
        self.expired: list[tuple[str, str, float]] = []
        self.reads = 0
        self.paused: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Reader:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            for replica in self.fleet.alive():
                if replica.proc is None or replica.proc.pid in self.paused:
                    continue
                for account in self.accounts:
                    try:
                        data = replica.token_json(account)
                    except (OSError, ValueError):
                        continue  # being replaced right now
                    now = time.time()
                    self.reads += 1
                    if data is None or replica.proc.poll() is not None:
                        continue  # a killed replica's files are not being served
                    late = now - float(data["expires_at"])
                    if late > 0.5:
                        self.expired.append((replica.workdir.name, account, late))
            self._stop.wait(0.05)


def test_kills_of_replicas_and_the_etcd_leader_cost_no_token(
    fleet: Fleet, fresh_idp: IdP, etcd: EtcdCluster
) -> None:
    rng = random.Random(int(os.environ.get("TOKEND_CHAOS_SEED", "12")))
    names = seed_accounts(fleet, fresh_idp, 6)
    first = fleet.start(3)
    wait_until(
        lambda: all(token_file_valid(r, n, time.time()) for r in fleet.alive() for n in names),
        timeout=30,
        what="every replica serving every account",
    )
    assert {rec["by"] for rec in fleet.records().values()} <= {fleet.replica_id(r) for r in first}
    with Reader(fleet, names) as reader:
        deadline = time.monotonic() + 16
        kills = 0
        leader_kills = 0
        while time.monotonic() < deadline:
            time.sleep(rng.uniform(1.0, 3.0))
            if rng.random() < 0.3:
                leader = etcd.leader()
                etcd.kill(leader)
                leader_kills += 1
                time.sleep(rng.uniform(0.2, 1.0))
                etcd.start(leader, wait=False)
                continue
            victim = rng.choice(fleet.alive())
            kill_outside_exchange(fleet, victim, reader)
            kills += 1
            fleet.start_one()
        etcd.wait_healthy()
        # After the chaos: every account is refreshed again and served everywhere.
        marker = time.time()
        wait_until(
            lambda: all(float(rec["at"]["iat"]) > marker for rec in fleet.records().values()),
            timeout=20,
            what="every account refreshed after the last kill",
        )
        wait_until(
            lambda: all(token_file_valid(r, n, time.time()) for r in fleet.alive() for n in names),
            timeout=20,
            what="every live replica serving every account",
        )
    assert kills >= 2
    assert reuse_detections(fresh_idp) == []
    assert not [e for e in fresh_idp.log() if e["error"] == "invalid_grant"]
    assert reader.expired == []
    assert reader.reads > 100


def kill_outside_exchange(fleet: Fleet, victim: Tokend, reader: Reader) -> None:
    """SIGKILL ``victim`` at a moment when none of its refresh tokens is at the IdP.

    A kill between sending a refresh token and committing its answer loses the rotated
    token by nature (no reuse grace: the IdP accepts neither copy again); that window
    lasts milliseconds and is what the reuse grace and the in-flight mark are for. The
    victim is stopped first, and killed only if it holds no in-flight mark."""
    assert victim.proc is not None
    replica = fleet.replica_id(victim)
    for _ in range(50):
        victim.proc.send_signal(signal.SIGSTOP)
        reader.paused.add(victim.proc.pid)
        marked = [a for a, rec in fleet.records().items() if rec["by"] == replica and rec["flight"]]
        if not marked:
            victim.proc.kill()
            victim.proc.wait(10)
            return
        victim.proc.send_signal(signal.SIGCONT)
        reader.paused.discard(victim.proc.pid)
        time.sleep(0.03)
    raise AssertionError("the victim always had a refresh in flight")


def test_a_paused_replica_past_its_lease_commits_nothing(fleet: Fleet, fresh_idp: IdP) -> None:
    names = seed_accounts(fleet, fresh_idp, 4)
    fleet.config["serve"]["socket"] = "./tokend.sock"
    paused, other = fleet.start(2)
    wait_until(
        lambda: all(token_file_valid(r, n, time.time()) for r in (paused, other) for n in names),
        timeout=30,
        what="both replicas serving every account",
    )
    assert paused.proc is not None
    paused_id = fleet.replica_id(paused)
    other_id = fleet.replica_id(other)

    # Both replicas show the same owner per account, each says whether it is the
    # owner, and the owned gauges add up to every account.
    def agreed() -> bool:
        views = [accounts_view(paused), accounts_view(other)]
        owners = {n: views[0][n]["owner"] for n in names}
        return (
            all(views[1][n]["owner"] == owners[n] for n in names)
            and set(owners.values()) <= {paused_id, other_id}
            and all(views[0][n]["owned_here"] == (owners[n] == paused_id) for n in names)
            and all(views[1][n]["owned_here"] == (owners[n] == other_id) for n in names)
            and owned_gauge(paused) == sum(owner == paused_id for owner in owners.values())
            and owned_gauge(paused) + owned_gauge(other) == len(names)
        )

    wait_until(agreed, timeout=10, what="both replicas agreeing on every account's owner")
    old_lease = paused.events("etcd_joined")[-1]["lease"]
    paused.proc.send_signal(signal.SIGSTOP)
    stopped_at = time.time()
    try:
        # The other replica takes over once the lease has expired, and refreshes.
        wait_until(
            lambda: all(
                rec["by"] != paused_id and float(rec["at"]["iat"]) > stopped_at
                for rec in fleet.records().values()
            ),
            timeout=LEASE_TTL + 12,
            what="the other replica owning and refreshing every account",
        )
        # The survivor owns every account, and says so.
        wait_until(lambda: owned_gauge(other) == len(names), timeout=5, what="the survivor's gauge")
        view = accounts_view(other)
        assert all(view[n]["owner"] == other_id and view[n]["owned_here"] for n in names)
        out = io.StringIO()
        socket = str(other.workdir / "tokend.sock")
        assert status_command(socket_arg=socket, config_arg=None, out=out) == 0
        table = out.getvalue().splitlines()
        assert "OWNER" in table[0].split()
        assert all(f"{other_id} (here)" in row for row in table[1:]), table
    finally:
        paused.proc.send_signal(signal.SIGCONT)
    # Awake again, with timers overdue and a lease that no longer exists.
    paused.wait_event("etcd_joined", count=2, timeout=10)
    time.sleep(LEASE_TTL)
    stale = [r for r in fleet.records().values() if r["lease"] == old_lease]
    assert stale == []
    assert reuse_detections(fresh_idp) == []
    assert not [e for e in fresh_idp.log() if e["error"] == "invalid_grant"]

    # SIGTERM: the replica revokes its lease on the way out, so the other one owns
    # every account at once rather than after the lease would have expired.

    def owners() -> list[str]:
        found = fleet.etcd.get_prefix(fleet.prefix + "owners/")
        return [kv["value"].decode() for kv in found.values()]

    wait_until(lambda: len(owners()) == len(names), timeout=10, what="every account owned")
    assert paused.stop() == 0
    exited = time.monotonic()
    wait_until(lambda: owners() == [other_id] * len(names), timeout=LEASE_TTL, what="handover")
    assert time.monotonic() - exited < LEASE_TTL


def test_without_quorum_tokens_stay_served_refreshes_pause_and_resume(
    fleet: Fleet, fresh_idp: IdP, etcd: EtcdCluster
) -> None:
    from tests.etcd_cluster import _free_ports

    names = seed_accounts(fleet, fresh_idp, 2)
    (port,) = _free_ports(1)
    fleet.config["serve"]["metrics_listen"] = f"127.0.0.1:{port}"
    (replica,) = fleet.start(1)
    wait_until(
        lambda: all(token_file_valid(replica, n, time.time()) for n in names),
        timeout=30,
        what="the replica serving every account",
    )

    def readyz() -> dict[str, Any]:
        answer = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
        body: dict[str, Any] = answer.json()
        body["status"] = answer.status_code
        return body

    down = etcd.members[:2]
    for member in down:
        etcd.kill(member)
    try:
        degraded = wait_until(
            lambda: (r := readyz())["status"] == 503 and r, timeout=10, what="/readyz 503"
        )
        assert degraded["store"]["degraded"] is True
        assert "etcd" in degraded["store"]["error"]
        sent = len(fresh_idp.log())
        # Tokens already held stay served while they are valid; nothing is refreshed
        # that could not be committed.
        assert all(token_file_valid(replica, n, time.time()) for n in names)
        time.sleep(TOKEN_TTL / 2)
        assert len(fresh_idp.log()) == sent
    finally:
        for member in down:
            etcd.start(member, wait=False)
    etcd.wait_healthy()
    back = time.time()
    wait_until(lambda: readyz()["status"] == 200, timeout=10, what="/readyz 200 again")
    wait_until(
        lambda: all(float(rec["at"]["iat"]) > back for rec in fleet.records().values()),
        timeout=TOKEN_TTL + 5,
        what="refreshes resumed",
    )
    assert reuse_detections(fresh_idp) == []


@pytest.fixture
def audited_bao(tmp_path: Path) -> Iterator[Bao]:
    """An OpenBao dev server of the test's own, whose audit log names who wrote what."""
    workdir = tmp_path / "bao"
    workdir.mkdir()
    server = Bao(workdir, audit_log=workdir / "audit.log").start()
    try:
        yield server
    finally:
        server.stop()


def vault_calls(bao: Bao, path: str, *operations: str) -> Counter[str]:
    """Answered requests of ``operations`` on secret/data/PATH, by the display name of
    the token that made them (the test's own token is "token")."""
    assert bao.audit_log is not None
    calls: Counter[str] = Counter()
    for line in bao.audit_log.read_text().splitlines():
        entry = orjson.loads(line)
        request = entry.get("request") or {}
        if (
            entry.get("type") == "response"
            and request.get("operation") in operations
            and request.get("path") == f"secret/data/{path}"
            and not entry.get("error")
        ):
            calls[entry["auth"]["display_name"]] += 1
    return calls


def vault_writes(bao: Bao, path: str) -> Counter[str]:
    return vault_calls(bao, path, "create", "update")


def vault_chain(bao: Bao, path: str) -> list[str]:
    """The refresh token of every version of ``path``, oldest first, as sha256."""
    current = bao.call("GET", f"secret/metadata/{path}")["data"]["current_version"]
    return [
        IdP.token_sha256(
            bao.call("GET", f"secret/data/{path}?version={v}")["data"]["data"]["refresh_token"]
        )
        for v in range(1, current + 1)
    ]


def test_a_vault_seed_is_refreshed_and_written_back_by_its_owner_alone(
    fleet: Fleet, fresh_idp: IdP, audited_bao: Bao
) -> None:
    bao = audited_bao
    grant = fresh_idp.seed_grant("basic-client")
    path = "tokend/alice"
    bao.put_secret(path, {"refresh_token": grant["refresh_token"], "owner": "team-a"})
    bao.call("POST", f"secret/metadata/{path}", {"max_versions": 100})
    fleet.config["vault"] = {
        "address": bao.address,
        "auth": {"method": "token", "token_file": "./vault-token"},
        "timeout": "1s",
        "poll_interval": "1s",
    }
    fleet.config["serve"]["socket"] = "./tokend.sock"
    fleet.config["accounts"] = {
        "alice": {"provider": "idp", "refresh_token": f"vault://secret/{path}#refresh_token"}
    }

    def own_vault_token(workdir: Path) -> None:
        # Each replica its own token: the audit log tells their writes apart.
        token = bao.token(["tokend"], display_name=workdir.name)
        (workdir / "vault-token").write_text(token + "\n")

    fleet.prepare = own_vault_token
    replicas = fleet.start(2)
    by_id = {fleet.replica_id(r): r for r in replicas}

    def agreed_owner() -> Tokend | None:
        try:
            views = [accounts_view(r)["alice"] for r in replicas]
        except httpx.TransportError:
            return None  # a socket not bound yet
        owner = by_id.get(views[0]["owner"])
        if owner is None or views[1]["owner"] != views[0]["owner"]:
            return None
        return owner if [v["owned_here"] for v in views] == [r is owner for r in replicas] else None

    def refreshes(replica: Tokend) -> list[dict[str, Any]]:
        return replica.events("refresh", account="alice", outcome="success")

    def presented() -> list[str]:
        return [e["refresh_token_sha256"] for e in fresh_idp.log()]

    def in_step() -> bool:
        # The vault holds what etcd's record holds, and no refresh is on its way.
        record = fleet.records()["alice"]
        newest = bao.get_secret(path)[0]["refresh_token"]
        return record["flight"] is None and newest == record["rt"] != grant["refresh_token"]

    agreed = wait_until(agreed_owner, timeout=20, what="both replicas naming one owner")
    assert agreed is not None
    owner = agreed
    follower = next(r for r in replicas if r is not owner)
    # The first replica up may have refreshed before the second joined and took the
    # account (a join moves it by rendezvous hashing): counted from here on.
    wait_until(in_step, timeout=10, what="the vault in step with etcd")
    settled = (vault_writes(bao, path), len(refreshes(owner)), len(refreshes(follower)))
    owner.wait_event("refresh", account="alice", outcome="success", count=settled[1] + 2)
    wait_until(in_step, timeout=10, what="the vault in step with etcd")

    # (a) The owner alone refreshed and wrote back: every version of the secret is the
    # next link of the chain the IdP saw, written once, and the newest is the token the
    # IdP issued last (not presented yet).
    chain = vault_chain(bao, path)
    assert chain[:-1] == presented()
    assert chain[-1] not in presented()
    assert len(refreshes(follower)) == settled[2]
    writes = vault_writes(bao, path)
    owner_name = f"token-{owner.workdir.name}"
    assert writes - settled[0] == {owner_name: len(refreshes(owner)) - settled[1]}
    assert sum(writes.values()) == len(chain)
    # The follower reads the secret when its version moves, and writes nothing.
    reads = vault_calls(bao, path, "read")[f"token-{follower.workdir.name}"]
    assert reads <= len(chain), reads
    assert not accounts_view(follower)["alice"]["vault_writeback_pending"]
    assert bao.get_secret(path)[0]["owner"] == "team-a"

    # (c) A revoke sent to the follower is refused and revokes nothing: the owner's
    # next refresh still succeeds.
    transport = httpx.HTTPTransport(uds=str(follower.workdir / "tokend.sock"))
    with httpx.Client(transport=transport, base_url="http://tokend", timeout=5) as client:
        answer = client.post("/v1/accounts/alice/revoke")
    assert answer.status_code == 502
    assert answer.json()["error"] == "revoke_failed"
    assert "another replica owns this account" in answer.json()["detail"]
    done = len(refreshes(owner))
    owner.wait_event("refresh", account="alice", outcome="success", count=done + 1)
    assert accounts_view(follower)["alice"]["state"] == "valid"

    # (b) The owner dies: the follower takes over, goes on with the same chain, and
    # writes back from then on.
    owner_writes = vault_writes(bao, path)[owner_name]
    kill_outside_exchange(fleet, owner, Reader(fleet, []))
    killed = time.monotonic()
    follower_id = fleet.replica_id(follower)
    wait_until(
        lambda: accounts_view(follower)["alice"]["owner"] == follower_id,
        timeout=LEASE_TTL + 10,
        what="the follower owning the account",
    )
    took_over = time.monotonic() - killed
    follower.wait_event("refresh", account="alice", outcome="success", count=settled[2] + 2)
    wait_until(in_step, timeout=10, what="the vault in step with etcd after the takeover")
    # Still one link per version: nothing skipped, nothing written twice. (A new owner
    # that took over before its next poll saw the dead owner's last write is refused by
    # the vault's check-and-set once, re-reads, and writes the next link.)
    chain = vault_chain(bao, path)
    assert chain[:-1] == presented()
    assert chain[-1] not in presented()
    writes = vault_writes(bao, path)
    assert writes[owner_name] == owner_writes
    follower_name = f"token-{follower.workdir.name}"
    assert writes[follower_name] - settled[0][follower_name] == (
        len(refreshes(follower)) - settled[2]
    )
    assert sum(writes.values()) == len(chain)
    log = fresh_idp.log()
    assert {e["grant_id"] for e in log} == {grant["grant_id"]}
    assert all(e["status"] == 200 for e in log), log
    assert reuse_detections(fresh_idp) == []
    for replica in replicas:
        # No replica tried a record write it had no right to; the only vault refusals
        # are the check-and-set conflicts of a new owner (see above), each recovered.
        assert replica.events("store_write_failed") == []
        refused = replica.events("write_back_failed")
        assert all("written by someone else" in e["error"] for e in refused), refused
        assert len(refused) <= 2, refused
    assert took_over < LEASE_TTL + 5
    print(f"requests={len(log)} writes={dict(writes)} takeover={took_over:.2f}s")
