"""The etcd store against a real 3-member cluster: records, compare-and-swap, ownership
spread and takeover, fencing of a replica whose lease expired, leader loss, no quorum."""

from __future__ import annotations

import base64
import itertools
import os
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import httpx
import pytest

from tests.etcd_cluster import EtcdCluster, b64
from tokend.model import StoredAccount, TokenSet
from tokend.store import StoreConflict, StoreError
from tokend.store.etcd import EtcdSettings, EtcdStore, StoreFenced, rendezvous_owner

_prefixes = itertools.count()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "state.key"
    path.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    return path


@pytest.fixture
def settings(etcd: EtcdCluster, key_file: Path) -> Callable[..., EtcdSettings]:
    prefix = f"/test-{os.getpid()}-{next(_prefixes)}/"

    def make(replica: str, **changes: object) -> EtcdSettings:
        values: dict[str, object] = {
            "endpoints": etcd.endpoints,
            "encryption_key_file": key_file,
            "prefix": prefix,
            "lease_ttl": 2.0,
            "replica_id": replica,
        }
        values.update(changes)
        return EtcdSettings(**values)  # type: ignore[arg-type]

    return make


@asynccontextmanager
async def running(settings: EtcdSettings) -> AsyncIterator[EtcdStore]:
    store = EtcdStore(settings)
    await store.open()
    try:
        async with anyio.create_task_group() as group:
            await group.start(store.run)
            try:
                yield store
            finally:
                group.cancel_scope.cancel()
    finally:
        await store.close()


async def wait_for(predicate: Callable[[], object], within: float = 10.0) -> None:
    """Poll ``predicate`` (state the stores' background tasks change) until it holds."""
    with anyio.fail_after(within):
        while not predicate():  # noqa: ASYNC110 - the state has no event to wait on
            await anyio.sleep(0.02)


def record(name: str, rt: str = "rt-1", version: int = 0) -> StoredAccount:
    return StoredAccount(
        account=name,
        seed_fingerprint="seed",
        refresh_token=rt,
        token=TokenSet("at-" + rt, "Bearer", 2_000_000_000.0, 1_000_000_000.0, "read"),
        updated_at=1.0,
        version=version,
    )


@pytest.mark.anyio
async def test_records_round_trip_encrypted_with_cas(
    settings: Callable[..., EtcdSettings], etcd: EtcdCluster
) -> None:
    async with running(settings("a")) as store:
        first = await store.put(record("alice", "secret-refresh-1"))
        assert first.version > 0
        loaded = await store.load("alice")
        assert loaded == first
        # Raw etcd holds neither token in the clear.
        raw = etcd.get_prefix(store.settings.prefix)
        value = raw[f"{store.settings.prefix}accounts/alice"]["value"]
        assert b"secret-refresh-1" not in value and b"at-secret" not in value
        assert await store.claim("alice", "x", 10)
        second = await store.put(first.evolve(refresh_token="secret-refresh-2"))
        assert second.version > first.version
        with pytest.raises(StoreConflict):
            await store.put(first.evolve(refresh_token="stale"))
        with pytest.raises(StoreConflict):  # a create over a record of another seed
            await store.put(record("alice", "again").evolve(seed_fingerprint="other"))
        # Replicas starting together create it from the same seed: the stored one wins.
        assert await store.put(record("alice", "again")) == second
        assert (await store.load_all()) == {"alice": second}


@pytest.mark.anyio
async def test_wrong_key_is_one_clear_error(
    settings: Callable[..., EtcdSettings], tmp_path: Path
) -> None:
    async with running(settings("a")) as store:
        await store.put(record("alice"))
    other = tmp_path / "other.key"
    other.write_bytes(os.urandom(32))
    async with running(settings("b", encryption_key_file=other)) as store:
        with pytest.raises(StoreError, match="does not decrypt with the configured key") as info:
            await store.load("alice")
        assert "rt-1" not in str(info.value)


@pytest.mark.anyio
async def test_accounts_spread_over_replicas_and_move_when_one_leaves(
    settings: Callable[..., EtcdSettings],
) -> None:
    names = [f"acct-{i}" for i in range(40)]
    async with running(settings("a")) as a:
        for name in names:
            await a.put(record(name))
        async with running(settings("b")) as b, running(settings("c")) as c:
            stores = (a, b, c)
            await wait_for(lambda: all(s.members == {"a", "b", "c"} for s in stores))

            def settled() -> bool:
                return all(
                    [s.replica_id for s in stores if s.owns(name)]
                    == [rendezvous_owner(name, ["a", "b", "c"])]
                    for name in names
                )

            # Whoever joined first took some of the others' accounts meanwhile: they
            # move to their rendezvous owners (and each account has one owner only).
            await wait_for(settled, within=20)
            assert all(s.held_count > 0 for s in stores)
        # b and c closed (leases revoked): a owns everything again, at once.
        await wait_for(lambda: a.held_count == len(names), within=3)


@pytest.mark.anyio
async def test_a_granted_claim_is_never_fenced_by_a_rebalance(
    settings: Callable[..., EtcdSettings],
) -> None:
    names = [f"acct-{i}" for i in range(64)]
    fenced: list[str] = []
    async with running(settings("a")) as a:
        records = {n: await a.put(record(n)) for n in names}
        await wait_for(lambda: a.held_count == len(names))
        stop = anyio.Event()

        async def refresh_all_the_time() -> None:
            while not stop.is_set():
                for name in names:
                    if not await a.claim(name, "a", 10):
                        continue
                    try:
                        records[name] = await a.put(records[name].evolve(updated_at=2.0))
                    except StoreFenced:
                        fenced.append(name)
                    finally:
                        await a.release(name, "a")

        async with anyio.create_task_group() as group:
            group.start_soon(refresh_all_the_time)
            async with running(settings("b")) as b:
                await wait_for(lambda: b.held_count > 0 and a.held_count + b.held_count == 64)
            stop.set()
    assert fenced == []


@pytest.mark.anyio
async def test_dead_owner_is_taken_over_within_lease_ttl(
    settings: Callable[..., EtcdSettings],
) -> None:
    names = [f"acct-{i}" for i in range(20)]
    async with running(settings("survivor")) as survivor:
        victim = EtcdStore(settings("victim"))
        await victim.open()
        async with anyio.create_task_group() as group:
            await group.start(victim.run)
            for name in names:
                await survivor.put(record(name))
            await wait_for(lambda: victim.held_count > 0 and survivor.held_count > 0)
            group.cancel_scope.cancel()  # dies: no revoke, the lease runs out
        started = anyio.current_time()
        await wait_for(lambda: survivor.held_count == len(names), within=6)
        took = anyio.current_time() - started
        assert took < 2.0 + 1.5, took
        await victim.client.close()


@pytest.mark.anyio
async def test_replica_whose_lease_expired_while_paused_commits_nothing(
    settings: Callable[..., EtcdSettings],
) -> None:
    p = EtcdStore(settings("p"))
    await p.open()
    async with anyio.create_task_group() as group:
        await group.start(p.run)
        await p.put(record("alice"))
        await wait_for(lambda: p.owns("alice"))
        assert await p.claim("alice", "p", 10)
        stale = await p.load("alice")
        assert stale is not None
        marked = await p.put(stale.evolve(in_flight_since=5.0))
        group.cancel_scope.cancel()  # paused: nothing renews the lease any more
    async with running(settings("s")) as s:
        await wait_for(lambda: s.owns("alice"), within=6)
        current = await s.load("alice")
        assert current is not None and current.version == marked.version
        newer = await s.put(current.evolve(refresh_token="rt-s", in_flight_since=None))
        # p wakes up and tries to commit what it got with the old token: refused by
        # etcd (its owner key is gone), although p still believes it owns alice.
        assert p.owns("alice")
        with pytest.raises(StoreFenced):
            await p.put(marked.evolve(refresh_token="rt-p", in_flight_since=None))
        # Writing on top of the newest version is refused too: it owns nothing now.
        with pytest.raises(StoreFenced):
            await p.put(newer.evolve(refresh_token="rt-p"))
        assert await s.load("alice") == newer
    await p.client.close()


@pytest.mark.anyio
async def test_a_watch_on_a_hung_member_is_moved_to_another(
    settings: Callable[..., EtcdSettings], etcd: EtcdCluster
) -> None:
    from tokend.store import RecordWritten

    async with running(settings("follower", watchdog_interval=1.0)) as follower:
        changes = follower.changes()
        hung = next(m for m in etcd.members if m.client_url == follower.client.watch_endpoint)
        others = [m.client_url for m in etcd.members if m is not hung]
        assert hung.proc is not None
        hung.proc.send_signal(signal.SIGSTOP)
        try:
            async with running(settings("writer", endpoints=others)) as writer:
                await writer.put(record("alice", "rt-new"))
                with anyio.fail_after(15):
                    async for change in changes:
                        if isinstance(change, RecordWritten):
                            assert change.record.refresh_token == "rt-new"
                            break
        finally:
            hung.proc.send_signal(signal.SIGCONT)


@pytest.mark.anyio
async def test_writes_survive_the_loss_of_the_leader(
    settings: Callable[..., EtcdSettings], etcd: EtcdCluster
) -> None:
    async with running(settings("a")) as store:
        current = await store.put(record("alice"))
        await wait_for(lambda: store.owns("alice"))
        leader = etcd.leader()
        etcd.kill(leader)
        try:
            for i in range(5):
                current = await store.put(current.evolve(refresh_token=f"rt-{i}"))
            assert (await store.load("alice")) == current
        finally:
            etcd.start(leader)


@pytest.mark.anyio
async def test_no_quorum_stops_claims_and_they_resume_when_it_returns(
    settings: Callable[..., EtcdSettings], etcd: EtcdCluster
) -> None:
    async with running(settings("a", call_timeout=1.0)) as store:
        await store.put(record("alice"))
        await wait_for(lambda: store.owns("alice"))
        assert await store.verify() is None
        down = etcd.members[:2]
        for member in down:
            etcd.kill(member)
        try:
            await wait_for(lambda: not store._lease_usable(), within=5)
            assert await store.verify() is not None
            assert not await store.claim("alice", "a", 10)
        finally:
            for member in down:
                etcd.start(member, wait=False)
        etcd.wait_healthy()
        started = anyio.current_time()
        await wait_for(lambda: store._lease_usable(), within=10)
        assert await store.verify() is None
        await wait_for(lambda: store.owns("alice"), within=10)
        assert await store.claim("alice", "a", 10)
        # Seconds, not a backoff's minutes (generous: the machine may be loaded).
        assert anyio.current_time() - started < 10


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"backend": "etcd"}, "needs endpoints"),
        ({"backend": "etcd", "endpoints": ["127.0.0.1:2379"]}, "a URL like"),
        (
            {
                "backend": "etcd",
                "endpoints": ["https://e:2379"],
                "encryption_key_file": "k",
                "password_file": "p",
            },
            "password_file needs username",
        ),
        (
            {
                "backend": "etcd",
                "endpoints": ["https://e:2379"],
                "encryption_key_file": "k",
                "tls": {"cert_file": "c.pem"},
            },
            "cert_file and key_file go together",
        ),
    ],
)
def test_etcd_state_config_is_checked(state: dict[str, object], message: str) -> None:
    from pydantic import ValidationError

    from tokend.config._schema import StateConfig

    with pytest.raises(ValidationError, match=message):
        StateConfig.model_validate(state)


@pytest.mark.anyio
async def test_refresh_token_lifetimes_round_trip_and_are_optional(
    settings: Callable[..., EtcdSettings], etcd: EtcdCluster
) -> None:
    async with running(settings("a")) as store:
        plain = await store.put(record("bob"))
        assert plain.consented_at is None and plain.refresh_expiry_fixed is False
        # The record's owner is settled in the background: wait for this replica's claim.
        with anyio.fail_after(10):
            while not await store.claim("bob", "x", 10):  # noqa: ASYNC110 - no event for it
                await anyio.sleep(0.05)
        tracked = await store.put(
            plain.evolve(
                consented_at=10.5,
                refresh_used_at=20.25,
                refresh_expires_at=30.0,
                refresh_expiry_fixed=True,
            )
        )
        assert await store.load("bob") == tracked


def test_etcd_state_config_leaves_the_key_and_password_to_other_sources() -> None:
    """Like the sqlite store's, the key (and with a username the password) may come
    from the environment or a systemd credential: the config need not name a file."""
    from tokend.config._schema import StateConfig
    from tokend.store import open_store

    state = StateConfig.model_validate(
        {"backend": "etcd", "endpoints": ["https://e:2379"], "username": "tokend"}
    )
    store = open_store(state)
    assert isinstance(store, EtcdStore)
    assert store.settings.encryption_key_file is None and store.settings.password_file is None


@pytest.fixture
def credentials(tmp_path: Path, key_file: Path) -> Path:
    """A systemd credentials directory: the state key and the etcd password."""
    directory = tmp_path / "credentials"
    directory.mkdir()
    (directory / "tokend-state-key").write_bytes(key_file.read_bytes())
    (directory / "tokend-etcd-password").write_text("tokend-pw\n")
    return directory


@pytest.mark.anyio
@pytest.mark.parametrize("source", ["environment", "credential"])
async def test_the_state_key_comes_from_the_environment_or_a_systemd_credential(
    settings: Callable[..., EtcdSettings],
    credentials: Path,
    monkeypatch: pytest.MonkeyPatch,
    source: str,
) -> None:
    monkeypatch.delenv("TOKEND_STATE_KEY", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    elsewhere = EtcdStore(settings("a", encryption_key_file=None))
    with pytest.raises(StoreError) as missing:
        await elsewhere.open()
    for where in ("state.encryption_key_file", "$TOKEND_STATE_KEY", "tokend-state-key"):
        assert where in str(missing.value)
    if source == "environment":
        key = (credentials / "tokend-state-key").read_text()
        monkeypatch.setenv("TOKEND_STATE_KEY", key.strip())
    else:
        monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    await elsewhere.open()
    try:
        written = await elsewhere.put(record("alice", "rt-sealed"))
    finally:
        await elsewhere.close()
    # Sealed with that key: a store reading the same key from a file opens it.
    async with running(settings("b")) as reader:
        assert await reader.load("alice") == written


AUTH_PREFIX = "/auth-test/"


@pytest.fixture
def auth_cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A cluster with authentication on (a member of its own: auth is cluster-wide),
    and a user ``tokend`` (password ``tokend-pw``) that may use AUTH_PREFIX only."""

    def post(path: str, body: dict[str, object]) -> None:
        httpx.post(f"{endpoint}/v3/auth/{path}", json=body, timeout=10).raise_for_status()

    with EtcdCluster(tmp_path / "etcd", size=1) as cluster:
        endpoint = cluster.endpoints[0]
        post("role/add", {"name": "root"})
        post("user/add", {"name": "root", "password": "root-pw"})
        post("user/grant", {"user": "root", "role": "root"})
        post("role/add", {"name": "tokend"})
        scope = {
            "key": b64(AUTH_PREFIX),
            "range_end": b64(AUTH_PREFIX[:-1] + "0"),
            "permType": "READWRITE",
        }
        post("role/grant", {"name": "tokend", "perm": scope})
        post("user/add", {"name": "tokend", "password": "tokend-pw"})
        post("user/grant", {"user": "tokend", "role": "tokend"})
        post("enable", {})
        yield cluster


@pytest.mark.anyio
async def test_the_etcd_password_comes_from_a_file_the_environment_or_a_credential(
    auth_cluster: EtcdCluster,
    key_file: Path,
    credentials: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TOKEND_ETCD_PASSWORD", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)

    def settings(**changes: object) -> EtcdSettings:
        values: dict[str, object] = {
            "endpoints": auth_cluster.endpoints,
            "encryption_key_file": key_file,
            "prefix": AUTH_PREFIX,
            "username": "tokend",
            "replica_id": "r",
        }
        values.update(changes)
        return EtcdSettings(**values)  # type: ignore[arg-type]

    with pytest.raises(StoreError, match=r"\$TOKEND_ETCD_PASSWORD"):
        await EtcdStore(settings()).open()
    sources = [
        ("file", {"password_file": credentials / "tokend-etcd-password"}, {}),
        ("environment", {}, {"TOKEND_ETCD_PASSWORD": "tokend-pw"}),
        ("credential", {}, {"CREDENTIALS_DIRECTORY": str(credentials)}),
    ]
    for name, changes, env in sources:
        with monkeypatch.context() as scoped:
            for var, value in env.items():
                scoped.setenv(var, value)
            async with running(settings(**changes)) as store:
                written = await store.put(record(f"via-{name}"))
                assert await store.load(f"via-{name}") == written
    # A wrong password is refused by the cluster, with a message naming the user.
    monkeypatch.setenv("TOKEND_ETCD_PASSWORD", "wrong")
    with pytest.raises(StoreError, match="tokend"):
        await EtcdStore(settings()).open()
