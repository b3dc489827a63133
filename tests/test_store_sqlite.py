"""SqliteStore against real files: durability, compare-and-swap, leases, a full disk."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import signal
import sqlite3
import stat
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokend._gc import paused_gc
from tokend.model import StoredAccount, TokenSet
from tokend.store import Store, StoreConflict, StoreError
from tokend.store.sqlite import SCHEMA_VERSION, SqliteStore

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[1]
REFRESH = "rt-0123456789-secret-refresh"
ACCESS = "at-9876543210-secret-access"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "tokend.db"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(db_path)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


def full_record(account: str = "alice", **changes: object) -> StoredAccount:
    record = StoredAccount(
        account=account,
        seed_fingerprint="f00dfeedf00dfeed",
        refresh_token=REFRESH,
        token=TokenSet(
            access_token=ACCESS,
            token_type="Bearer",
            expires_at=1_700_003_600.25,
            issued_at=1_700_000_000.5,
            scope="read write",
        ),
        in_flight_since=1_699_999_999.125,
        last_outcome="ok",
        last_error="invalid_grant: not really",
        updated_at=1_700_000_000.75,
    )
    return record.evolve(**changes)


# -- round trip and compare-and-swap --------------------------------------------------


def test_implements_the_store_protocol(db_path: Path) -> None:
    # Checked by mypy: SqliteStore must stay assignable to the Store protocol.
    store: Store = SqliteStore(db_path)
    assert store is not None


async def test_round_trip_of_every_field(store: SqliteStore) -> None:
    record = full_record()
    stored = await store.put(record)
    assert stored == record.evolve(version=1)
    assert await store.load("alice") == stored
    assert await store.load_all() == {"alice": stored}
    assert await store.load("nobody") is None


async def test_absent_token_and_nulls_round_trip(store: SqliteStore) -> None:
    bare = StoredAccount(account="bare")
    no_scope = full_record("no-scope").evolve(
        token=TokenSet(access_token="x", token_type="DPoP", expires_at=2.0, issued_at=1.0)
    )
    for record in (bare, no_scope):
        stored = await store.put(record)
        assert await store.load(record.account) == stored
    loaded = await store.load("bare")
    assert loaded is not None and loaded.token is None and loaded.refresh_token is None


async def test_put_advances_version_and_stale_write_conflicts(store: SqliteStore) -> None:
    v1 = await store.put(full_record())
    v2 = await store.put(v1.evolve(last_outcome="second"))
    assert v2.version == 2
    with pytest.raises(StoreConflict, match="stored version is 2") as info:
        await store.put(v1.evolve(last_outcome="stale"))
    assert REFRESH not in str(info.value) and ACCESS not in str(info.value)
    assert await store.load("alice") == v2


async def test_double_insert_conflicts(store: SqliteStore) -> None:
    first = await store.put(full_record())
    with pytest.raises(StoreConflict):
        await store.put(full_record(last_outcome="second insert"))
    assert await store.load("alice") == first


async def test_update_of_missing_record_conflicts(store: SqliteStore) -> None:
    with pytest.raises(StoreConflict, match="no stored record"):
        await store.put(full_record(version=3))
    assert await store.load_all() == {}


async def test_conflict_between_two_stores_on_one_file(db_path: Path) -> None:
    a, b = SqliteStore(db_path), SqliteStore(db_path)
    await a.open()
    await b.open()
    try:
        base = await a.put(full_record())
        seen_by_b = await b.load("alice")
        assert seen_by_b == base
        await a.put(base.evolve(last_outcome="a wins"))
        with pytest.raises(StoreConflict):
            await b.put(seen_by_b.evolve(last_outcome="b loses"))
        loaded = await b.load("alice")
        assert loaded is not None and loaded.last_outcome == "a wins"
    finally:
        await a.close()
        await b.close()


async def test_put_many_is_all_or_nothing(store: SqliteStore) -> None:
    existing = await store.put(full_record("bob"))
    written = await store.put_many([full_record("a"), full_record("b")])
    assert [r.version for r in written] == [1, 1]
    with pytest.raises(StoreConflict):
        # The stale "bob" write comes last: the new "c" before it must roll back too.
        await store.put_many([full_record("c"), existing.evolve(version=0)])
    assert set(await store.load_all()) == {"a", "b", "bob"}
    assert await store.put_many([]) == []


async def test_nan_time_is_refused_before_writing(store: SqliteStore) -> None:
    with pytest.raises(ValueError, match="NaN"):
        await store.put(full_record(in_flight_since=float("nan")))
    assert await store.load_all() == {}


async def test_delete(store: SqliteStore) -> None:
    await store.put(full_record())
    assert await store.claim("alice", "me", 30)
    await store.delete("alice")
    assert await store.load("alice") is None
    # The lease went with the record.
    assert await store.claim("alice", "someone else", 30)
    await store.delete("alice")  # deleting nothing is fine


# -- durability -----------------------------------------------------------------------

_READER = """
import json, sqlite3, sys
conn = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True)
rows = conn.execute("SELECT account, refresh_token, access_token, version FROM accounts")
print(json.dumps(sorted(rows.fetchall())))
"""


async def read_in_subprocess(path: Path) -> list[list[object]]:
    with anyio.fail_after(30):
        proc = await anyio.run_process([sys.executable, "-c", _READER, str(path)])
    rows: list[list[object]] = json.loads(proc.stdout)
    return rows


async def test_durable_across_reopen_and_processes(db_path: Path) -> None:
    first = SqliteStore(db_path)
    await first.open()
    stored = await first.put(full_record())
    # Committed data is visible to another process while the writer is still open...
    assert await read_in_subprocess(db_path) == [["alice", REFRESH, ACCESS, 1]]
    await first.close()
    # ...and after it closed, both to a fresh store and to a plain sqlite3 reader.
    second = SqliteStore(db_path)
    await second.open()
    try:
        assert await second.load_all() == {"alice": stored}
    finally:
        await second.close()
    assert await read_in_subprocess(db_path) == [["alice", REFRESH, ACCESS, 1]]


_KILLED_WRITER = """
import os, signal, sys
import anyio
from tokend.model import StoredAccount
from tokend.store.sqlite import SqliteStore

async def main() -> None:
    store = SqliteStore(sys.argv[1])
    await store.open()
    await store.put(StoredAccount(account="killed", refresh_token=sys.argv[2], updated_at=1.0))
    # Die without closing: no checkpoint, no cleanup; only what put made durable remains.
    os.kill(os.getpid(), signal.SIGKILL)

anyio.run(main)
"""


async def test_put_survives_the_process_being_killed(db_path: Path) -> None:
    with anyio.fail_after(30):
        proc = await anyio.run_process(
            [sys.executable, "-c", _KILLED_WRITER, str(db_path), REFRESH], cwd=REPO, check=False
        )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    store = SqliteStore(db_path)
    await store.open()
    try:
        record = await store.load("killed")
    finally:
        await store.close()
    assert record is not None and record.refresh_token == REFRESH and record.version == 1


# -- concurrency and the event loop -----------------------------------------------------


async def test_200_concurrent_puts_all_land(store: SqliteStore) -> None:
    async def put(i: int) -> None:
        await store.put(full_record(f"acct-{i:03d}", last_error=str(i)))

    async with anyio.create_task_group() as tg:
        for i in range(200):
            tg.start_soon(put, i)
    loaded = await store.load_all()
    assert len(loaded) == 200
    assert all(r.version == 1 and r.last_error == str(int(a[5:])) for a, r in loaded.items())


async def test_event_loop_stays_responsive_during_a_burst(store: SqliteStore) -> None:
    gaps: list[float] = []
    done = anyio.Event()

    async def tick() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await anyio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    async def burst() -> None:
        async with anyio.create_task_group() as puts:
            for i in range(300):
                puts.start_soon(store.put, full_record(f"burst-{i}"))
                # All 300 are queued within a few milliseconds, but not in one loop
                # iteration: starting 300 tasks at once stalls the loop by itself
                # (~0.1 ms of scheduling each), which would measure the test's
                # spawning, not the store.
                if i % 10 == 9:
                    await anyio.lowlevel.checkpoint()
        done.set()

    started = time.perf_counter()
    # A full collection of the test process's own heap (large after the whole suite)
    # can pause for 100+ ms; that is not the store blocking the loop.
    with paused_gc():
        async with anyio.create_task_group() as tg:
            tg.start_soon(tick)
            tg.start_soon(burst)
    elapsed = time.perf_counter() - started
    print(
        f"\n[sqlite store] 300 concurrent puts took {elapsed * 1000:.0f} ms; "
        f"event-loop tick gap max {max(gaps) * 1000:.1f} ms over {len(gaps)} ticks"
    )
    assert len(await store.load_all()) == 300
    assert max(gaps) < 0.1


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def test_commit_latency_is_measured(store: SqliteStore, db_path: Path) -> None:
    """Prints the time of one durable put (and of a lease claim) on this machine."""
    record = await store.put(full_record())
    put_times: list[float] = []
    for i in range(300):
        started = time.perf_counter()
        record = await store.put(record.evolve(last_outcome=f"n{i}"))
        put_times.append(time.perf_counter() - started)
    claim_times: list[float] = []
    for i in range(300):
        started = time.perf_counter()
        assert await store.claim("alice", f"owner-{i}", 1e-6)
        claim_times.append(time.perf_counter() - started)
    batch = [full_record(f"batch-{i}") for i in range(100)]
    started = time.perf_counter()
    await store.put_many(batch)
    batch_time = time.perf_counter() - started
    ms = 1000
    print(
        f"\n[sqlite store] {db_path.parent}: put p50 {statistics.median(put_times) * ms:.2f} ms"
        f", p99 {percentile(put_times, 0.99) * ms:.2f} ms, max {max(put_times) * ms:.2f} ms;"
        f" claim p50 {statistics.median(claim_times) * ms:.2f} ms"
        f", p99 {percentile(claim_times, 0.99) * ms:.2f} ms;"
        f" put_many(100) {batch_time * ms:.2f} ms"
    )
    assert record.version == 301


# -- failures -------------------------------------------------------------------------

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_MNT_DETACH = 2


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 512 KiB filesystem, so the disk can really fill up."""
    if not sys.platform.startswith("linux"):
        pytest.skip("tmpfs mounts need Linux")
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    target = os.fsencode(mount_point)
    if _libc.mount(b"tmpfs", target, b"tmpfs", 0, b"size=512k,mode=0700") != 0:
        err = ctypes.get_errno()
        if err == errno.EPERM:
            pytest.skip(f"cannot mount a tmpfs here: {os.strerror(err)} (needs root)")
        raise OSError(err, f"mount tmpfs on {mount_point}: {os.strerror(err)}")
    try:
        yield mount_point
    finally:
        if _libc.umount2(target, 0) != 0:
            _libc.umount2(target, _MNT_DETACH)


def fill(path: Path) -> None:
    """Write ``path`` until the filesystem has no byte left."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        # Unbuffered, shrinking writes: the last ones fill the final partial page.
        for size in (64 * 1024, 4096, 512, 1):
            chunk = b"\0" * size
            try:
                while True:
                    os.write(fd, chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)


async def test_full_disk_fails_cleanly_and_recovers(tiny_fs: Path) -> None:
    path = tiny_fs / "tokend.db"
    store = SqliteStore(path)
    await store.open()
    try:
        before = await store.put(full_record())
        filler = tiny_fs / "filler"
        fill(filler)
        # Big enough that the WAL must grow into space that no longer exists.
        update = before.evolve(last_error="x" * 64 * 1024)
        with pytest.raises(StoreError) as info:
            await store.put(update)
        exc = info.value
        rendered = "".join(traceback.format_exception(exc))
        print(f"\n[sqlite store] full disk: {exc}")
        assert not isinstance(exc, StoreConflict)
        assert "disk full" in str(exc) and str(path) in str(exc)
        assert REFRESH not in rendered and ACCESS not in rendered
        assert await store.load("alice") == before

        filler.unlink()
        after = await store.put(update)
        assert after.version == 2
        assert await store.load("alice") == after
    finally:
        await store.close()
    reopened = SqliteStore(path)
    await reopened.open()
    try:
        assert await reopened.load_all() == {"alice": after}
    finally:
        await reopened.close()


async def test_lock_held_beyond_busy_timeout_fails_then_recovers(db_path: Path) -> None:
    store = SqliteStore(db_path, busy_timeout=0.2)
    await store.open()
    other = sqlite3.connect(db_path, isolation_level=None)
    try:
        before = await store.put(full_record())
        other.execute("BEGIN IMMEDIATE")
        started = time.perf_counter()
        with pytest.raises(StoreError, match="locked") as info:
            await store.put(before.evolve(last_outcome="blocked"))
        assert time.perf_counter() - started >= 0.19
        assert REFRESH not in str(info.value) and ACCESS not in str(info.value)
        other.execute("ROLLBACK")
        assert (await store.put(before.evolve(last_outcome="unblocked"))).version == 2
    finally:
        other.close()
        await store.close()


async def test_not_a_database_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not sqlite" * 1000)
    with pytest.raises(StoreError, match="not a SQLite database"):
        await SqliteStore(path).open()


async def test_newer_schema_is_refused(db_path: Path) -> None:
    store = SqliteStore(db_path)
    await store.open()
    await store.close()
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer tokend"):
        await SqliteStore(db_path).open()


async def test_close_is_idempotent_and_later_calls_fail(db_path: Path) -> None:
    store = SqliteStore(db_path)
    with pytest.raises(StoreError, match="not open"):
        await store.load_all()
    await store.open()
    await store.open()  # a second open is a no-op
    await store.put(full_record())
    await store.close()
    await store.close()
    with pytest.raises(StoreError, match="not open"):
        await store.put(full_record("bob"))
    await store.open()  # and it can be opened again
    try:
        assert set(await store.load_all()) == {"alice"}
    finally:
        await store.close()


async def test_close_waits_for_queued_calls(store: SqliteStore) -> None:
    results: list[object] = []

    async def put(i: int) -> None:
        try:
            results.append(await store.put(full_record(f"q-{i}")))
        except StoreError as exc:
            results.append(exc)

    async with anyio.create_task_group() as tg:
        for i in range(20):
            tg.start_soon(put, i)
        await anyio.lowlevel.checkpoint()
        await store.close()
    # Every call either landed before the close or was told the store is closed.
    assert len(results) == 20
    assert all(
        isinstance(r, StoredAccount) or "closed" in str(r) or "not open" in str(r) for r in results
    )


# -- leases ---------------------------------------------------------------------------


async def test_leases_between_two_stores(db_path: Path) -> None:
    a, b = SqliteStore(db_path), SqliteStore(db_path)
    await a.open()
    await b.open()
    try:
        assert await a.claim("acct", "A", 30)
        assert not await b.claim("acct", "B", 30)
        assert await a.claim("acct", "A", 30)  # the holder extends it
        assert await b.claim("other", "B", 30)  # leases are per account
        await b.release("acct", "B")  # not the holder: no effect
        assert not await b.claim("acct", "B", 30)
        await a.release("acct", "A")
        assert await b.claim("acct", "B", 0.2)
        assert not await a.claim("acct", "A", 30)
        await anyio.sleep(0.3)
        assert await a.claim("acct", "A", 30)  # expired: handed over
        assert not await b.claim("acct", "B", 30)
        with pytest.raises(ValueError):
            await a.claim("acct", "A", 0)
    finally:
        await a.close()
        await b.close()


async def test_racing_claims_grant_exactly_one(db_path: Path) -> None:
    stores = [SqliteStore(db_path) for _ in range(2)]
    for s in stores:
        await s.open()
    granted: list[str] = []

    async def claim(s: SqliteStore, owner: str) -> None:
        if await s.claim("contended", owner, 30):
            granted.append(owner)

    try:
        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(claim, stores[i % 2], f"owner-{i}")
    finally:
        for s in stores:
            await s.close()
    assert len(granted) == 1


# -- files ----------------------------------------------------------------------------


async def test_file_modes_ignore_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "new" / "dir" / "tokend.db"
    old_umask = os.umask(0)
    try:
        store = SqliteStore(path)
        await store.open()
        try:
            await store.put(full_record())
            for f in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
                assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
        finally:
            await store.close()
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


# -- property ---------------------------------------------------------------------------

_times = st.floats(allow_nan=False)
_opt_text = st.none() | st.text(max_size=40)
_tokens = st.none() | st.builds(
    TokenSet,
    access_token=st.text(min_size=1, max_size=40),
    token_type=st.text(max_size=10),
    expires_at=_times,
    issued_at=_times,
    scope=_opt_text,
)
_writes = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "ü-ñ", "1.5", ""]),
        st.fixed_dictionaries(
            {
                "seed_fingerprint": _opt_text,
                "refresh_token": _opt_text,
                "token": _tokens,
                "in_flight_since": st.none() | _times,
                "last_outcome": _opt_text,
                "last_error": _opt_text,
                "updated_at": _times,
            }
        ),
    ),
    max_size=12,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(writes=_writes)
def test_any_sequence_of_puts_round_trips_the_last_write(
    writes: list[tuple[str, dict[str, object]]],
) -> None:
    async def run(path: Path) -> None:
        expected: dict[str, StoredAccount] = {}
        store = SqliteStore(path)
        await store.open()
        try:
            for account, fields in writes:
                version = expected[account].version if account in expected else 0
                record = StoredAccount(account=account, version=version).evolve(**fields)
                expected[account] = await store.put(record)
                assert expected[account].version == version + 1
            assert await store.load_all() == expected
        finally:
            await store.close()
        reopened = SqliteStore(path)
        await reopened.open()
        try:
            assert await reopened.load_all() == expected
        finally:
            await reopened.close()

    with tempfile.TemporaryDirectory() as tmp:
        anyio.run(run, Path(tmp) / "prop.db")


async def test_a_file_from_before_lifetimes_opens_and_keeps_its_records(db_path: Path) -> None:
    from tokend.store.sqlite import _MIGRATIONS

    db_path.parent.mkdir(parents=True)
    with sqlite3.connect(db_path) as conn:
        for statements in _MIGRATIONS[:2]:
            for statement in statements:
                conn.execute(statement)
        conn.execute("PRAGMA user_version = 2")
        conn.execute(
            "INSERT INTO accounts (account, refresh_token, updated_at, version) "
            "VALUES ('old', 'rt-old', 1.0, 3)"
        )
    conn.close()
    store = SqliteStore(db_path)
    await store.open()
    try:
        old = await store.load("old")
        assert old is not None and old.refresh_token == "rt-old" and old.version == 3
        assert old.consented_at is None and old.refresh_used_at is None
        assert old.refresh_expires_at is None and old.refresh_expiry_fixed is False
        tracked = await store.put(
            old.evolve(
                consented_at=10.5,
                refresh_used_at=20.25,
                refresh_expires_at=30.0,
                refresh_expiry_fixed=True,
            )
        )
        assert await store.load("old") == tracked
    finally:
        await store.close()
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()
