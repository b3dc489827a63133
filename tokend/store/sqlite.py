"""The local backend: one SQLite file holding every account's record and the leases.

Durability: WAL journal with ``synchronous=FULL``, so every committed transaction has
been fsynced before ``put`` returns; a crash (of the process or the machine) after that
cannot lose a rotated refresh token. Every write is one ``BEGIN IMMEDIATE ... COMMIT``
transaction; on any error it is rolled back, so nothing partial is ever stored.

Threading: SQLite calls block (disk I/O, fsync, busy waits on another process's lock),
so none of them run on the event loop. They run through ``anyio.to_thread`` behind a
``CapacityLimiter(1)``: one call at a time, on one connection, which is never touched
concurrently (hence ``check_same_thread=False``; the pool may hand consecutive calls to
different worker threads, which SQLite allows when calls never overlap).

Group commit: writes that queue up while another call holds the connection are
committed together, in one transaction and one fsync, each in its own savepoint (so
one write's compare-and-swap conflict undoes that write alone, and each caller gets
its own result). Every write still returns only once it is durable. With many
accounts refreshing at once (four store writes per refresh), this turns a queue of
writes, each waiting for the fsyncs and thread hand-offs of all before it, into one
commit per hand-off. A batch that fails as a whole (a full disk, say) is retried one
write at a time, so each write gets the outcome it would have had alone.

One process per state file: the daemon opens the store ``exclusive``, holding an
``flock`` on ``PATH.lock`` for as long as it runs, and a second ``tokend run`` on the
same file exits with one error line instead of spending the same refresh tokens. The
kernel drops the lock with the process, however it dies, so a successor never waits
for a dead one's claims: in exclusive mode a claim is the process's own business
(granted in memory). Without ``exclusive`` (tools, tests), several connections may share
the file: the compare-and-swap on ``version`` keeps their writes from clobbering each
other, and the ``leases`` table lets one of them at a time refresh a given account.

The file's identity (device and inode) is noted at open: :meth:`SqliteStore.verify`
reports a state file deleted or replaced under the running process, which SQLite itself
never notices (it keeps writing to the unlinked inode), and :meth:`SqliteStore.recreate`
starts over on a fresh file at the same path.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final, Generic, TypeVar

import anyio

from tokend.model import StoredAccount, TokenSet
from tokend.store._base import StoreConflict, StoreError
from tokend.store._crypto import StateKeyError, TokenCipher, is_sealed

__all__ = ["SCHEMA_VERSION", "SqliteStore"]

_T = TypeVar("_T")

# Each entry upgrades the schema by one version; PRAGMA user_version records how many
# have been applied. Never edit a released entry: append a new one.
_MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """
        CREATE TABLE accounts (
            account          TEXT PRIMARY KEY NOT NULL,
            seed_fingerprint TEXT,
            refresh_token    TEXT,
            access_token     TEXT,
            token_type       TEXT,
            expires_at       REAL,
            issued_at        REAL,
            scope            TEXT,
            in_flight_since  REAL,
            last_outcome     TEXT,
            last_error       TEXT,
            updated_at       REAL NOT NULL,
            version          INTEGER NOT NULL CHECK (version > 0),
            -- A stored access token is only usable with its type and times.
            CHECK (access_token IS NULL OR (token_type IS NOT NULL
                   AND expires_at IS NOT NULL AND issued_at IS NOT NULL))
        )
        """,
        """
        CREATE TABLE leases (
            account    TEXT PRIMARY KEY NOT NULL,
            owner      TEXT NOT NULL,
            expires_at REAL NOT NULL
        )
        """,
    ),
    # Facts about the file itself: the state key's check value, when tokens are sealed.
    ("CREATE TABLE meta (name TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL)",),
    # The refresh token's own lifetime: when its chain began, when it was last used,
    # and the expiry the IdP reported (NULL in records written before: unknown).
    (
        "ALTER TABLE accounts ADD COLUMN consented_at REAL",
        "ALTER TABLE accounts ADD COLUMN refresh_used_at REAL",
        "ALTER TABLE accounts ADD COLUMN refresh_expires_at REAL",
        "ALTER TABLE accounts ADD COLUMN refresh_expiry_fixed INTEGER NOT NULL DEFAULT 0",
    ),
)
SCHEMA_VERSION: Final = len(_MIGRATIONS)

_COLUMNS: Final = (
    "account",
    "seed_fingerprint",
    "refresh_token",
    "access_token",
    "token_type",
    "expires_at",
    "issued_at",
    "scope",
    "in_flight_since",
    "last_outcome",
    "last_error",
    "updated_at",
    "version",
    "consented_at",
    "refresh_used_at",
    "refresh_expires_at",
    "refresh_expiry_fixed",
)
_SELECT: Final = f"SELECT {', '.join(_COLUMNS)} FROM accounts"
_INSERT: Final = (
    f"INSERT INTO accounts ({', '.join(_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in _COLUMNS)}) ON CONFLICT (account) DO NOTHING"
)
_UPDATE: Final = (
    "UPDATE accounts SET "
    + ", ".join(f"{c} = ?" for c in _COLUMNS[1:])
    + " WHERE account = ? AND version = ?"
)
# A lease is granted when there is none, when it has expired, or when the asker holds it
# already (which extends it). Doing it in one statement keeps check and grant atomic.
_CLAIM: Final = (
    "INSERT INTO leases (account, owner, expires_at) VALUES (?, ?, ?) "
    "ON CONFLICT (account) DO UPDATE SET owner = excluded.owner, "
    "expires_at = excluded.expires_at "
    "WHERE leases.owner = excluded.owner OR leases.expires_at <= ?"
)

# Primary result codes (the low byte of an extended code) mapped to what an operator
# should look at. The text goes into StoreError, which ends up in logs and the API.
_REASONS: Final[dict[int, str]] = {
    3: "permission denied",  # SQLITE_PERM
    5: "database is locked by another connection",  # SQLITE_BUSY
    6: "database table is locked",  # SQLITE_LOCKED
    7: "out of memory",  # SQLITE_NOMEM
    8: "database is read-only (check file/directory permissions and the mount)",
    10: "I/O error (check the disk and the kernel log)",  # SQLITE_IOERR
    11: "database file is corrupt",  # SQLITE_CORRUPT
    13: "disk full (free space on the filesystem holding it)",  # SQLITE_FULL
    14: "cannot open the database file (check the path and permissions)",
    15: "file locking protocol error (is it on a network filesystem?)",  # SQLITE_PROTOCOL
    19: "constraint violated (invalid record)",  # SQLITE_CONSTRAINT
    23: "authorization denied",  # SQLITE_AUTH
    26: "file is not a SQLite database",  # SQLITE_NOTADB
}
_BUSY_CODES: Final = frozenset({5, 6})


class SqliteStore:
    """A :class:`~tokend.store.Store` in one SQLite file (see the module docstring)."""

    def __init__(
        self,
        path: Path | str,
        *,
        busy_timeout: float = 5.0,
        exclusive: bool = False,
        cipher: TokenCipher | None = None,
    ) -> None:
        self.path = Path(path)
        # Seals the tokens at rest (AES-GCM, see _crypto); None: stored as they are.
        self.cipher = cipher
        self.exclusive = exclusive
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._lock_fd: int | None = None
        # (st_dev, st_ino) of the database file and the lock file as opened.
        self._identity: tuple[int, int] | None = None
        self._lock_identity: tuple[int, int] | None = None
        # How long one call waits for another process's write lock before failing. The
        # wait happens on the worker thread, so it delays other store calls but never
        # the event loop.
        self.busy_timeout = busy_timeout
        self._conn: sqlite3.Connection | None = None
        self._limiter: anyio.CapacityLimiter | None = None
        # Writes waiting to be committed by whichever caller next holds the connection.
        self._pending: list[_Write[Any]] = []

    def __repr__(self) -> str:
        return f"SqliteStore({str(self.path)!r})"

    # -- lifecycle -------------------------------------------------------------------

    async def open(self) -> None:
        """Create the file (0600) and its directory (0700) if needed, and the schema."""
        if self._limiter is not None:
            return
        # Created here rather than in __init__: a limiter belongs to the running loop.
        limiter = anyio.CapacityLimiter(1)
        self._limiter = limiter
        try:
            await anyio.to_thread.run_sync(self._open_sync, limiter=limiter)
        except BaseException:
            self._limiter = None
            # A cancelled open still runs to the end on its thread and may have left a
            # connection behind; close it rather than leak it to the next open().
            with anyio.CancelScope(shield=True), contextlib.suppress(StoreError):
                await anyio.to_thread.run_sync(self._close_sync, limiter=limiter)
            raise

    async def close(self) -> None:
        """Wait for the call in progress (if any), then close. Safe to call twice."""
        limiter, self._limiter = self._limiter, None
        if limiter is None:
            return
        # Shielded: a cancelled close must still close the connection, or the WAL is
        # left un-checkpointed and the file handle open.
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._close_sync, limiter=limiter)

    def _open_sync(self) -> None:
        if self.exclusive and self._lock_fd is None:
            self._lock_sync()
        try:
            self._connect_sync()
        except BaseException:
            self._unlock_sync()
            raise

    def _lock_sync(self) -> None:
        """Take the state file's process lock, or say who holds it."""
        try:
            self.lock_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StoreError(
                f"sqlite store {self.path}: cannot open the lock file {self.lock_path}: "
                f"{exc.strerror or exc}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            who = f"pid {holder}" if holder.isdigit() else "another process"
            raise StoreError(
                f"sqlite store {self.path}: another tokend ({who}) is running on this "
                "state file; one process per state file (give each its own state.path)"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise StoreError(
                f"sqlite store {self.path}: cannot lock {self.lock_path}: {exc.strerror or exc}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        st = os.fstat(fd)
        self._lock_fd, self._lock_identity = fd, (st.st_dev, st.st_ino)

    def _unlock_sync(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)

    def _connect_sync(self) -> None:
        try:
            self._create_file()
        except OSError as exc:
            raise StoreError(
                f"sqlite store {self.path}: cannot create the database file: {exc.strerror or exc}"
            ) from None
        try:
            conn = sqlite3.connect(
                self.path,
                timeout=self.busy_timeout,
                # Autocommit mode: this module issues BEGIN/COMMIT itself, so no
                # statement ever runs in an implicit transaction left open.
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise self._error("open", exc) from None
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                # Without WAL the durability and multi-process claims above do not hold.
                raise StoreError(
                    f"sqlite store {self.path}: cannot enable the WAL journal "
                    f"(got {mode!r}); is the file on a network filesystem?"
                )
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            _write(conn, self._migrate)
            _write(conn, self._check_key)
        except sqlite3.Error as exc:
            conn.close()
            raise self._error("open", exc) from None
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        st = os.stat(self.path)
        self._identity = (st.st_dev, st.st_ino)

    def _create_file(self) -> None:
        parent = self.path.parent
        if not parent.exists():
            # Only the last component gets 0700; existing parents are the operator's.
            parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.path.exists():
            return
        # Created by us before SQLite sees it, so it is 0600 from the first byte; SQLite
        # gives the -wal and -shm files the database file's mode.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.close(fd)
        # The new directory entry must survive a crash along with the data in it.
        dir_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _migrate(self, conn: sqlite3.Connection) -> None:
        # Runs inside BEGIN IMMEDIATE, so two processes opening a fresh file at once
        # cannot both apply the same migration.
        current = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if current > SCHEMA_VERSION:
            raise StoreError(
                f"sqlite store {self.path}: schema version {current} was written by a "
                f"newer tokend (this one knows up to {SCHEMA_VERSION}); upgrade tokend"
            )
        for statements in _MIGRATIONS[current:]:
            for statement in statements:
                conn.execute(statement)
        if current != SCHEMA_VERSION:
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _check_key(self, conn: sqlite3.Connection) -> None:
        """A wrong or missing key is one clear error at open, never records that fail
        to decode later (or a silent start from the seeds)."""
        row = conn.execute("SELECT value FROM meta WHERE name = 'key_check'").fetchone()
        cipher = self.cipher
        if cipher is None:
            if row is not None:
                raise StoreError(
                    f"sqlite store {self.path}: the state file is encrypted and no key is "
                    "configured: set state.encryption_key_file (or $TOKEND_STATE_KEY, or the "
                    "systemd credential tokend-state-key) to the key it was written with"
                )
            return
        if row is None:
            # The first open with a key: seal what was stored in the clear.
            _reseal_all(conn, None, cipher)
            conn.execute(
                "INSERT INTO meta (name, value) VALUES ('key_check', ?)", (cipher.check_value(),)
            )
        elif not cipher.verify(str(row[0])):
            raise StoreError(
                f"sqlite store {self.path}: the configured state key does not open this "
                "state file (it was written with another key): configure the key it was "
                "written with; to change keys use tokend rekey"
            )

    async def rekey(self, new: TokenCipher) -> int:
        """Re-seal every stored token with ``new``, in one transaction; returns how many
        records were re-sealed. From then on the file opens with ``new`` only."""
        old = self.cipher

        def body(conn: sqlite3.Connection) -> int:
            count = _reseal_all(conn, old, new)
            conn.execute(
                "INSERT INTO meta (name, value) VALUES ('key_check', ?) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (new.check_value(),),
            )
            return count

        count = await self._write("rekey", body)
        self.cipher = new
        return count

    def _close_sync(self) -> None:
        try:
            self._disconnect_sync()
        finally:
            self._unlock_sync()

    def _disconnect_sync(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            conn.close()
        except sqlite3.Error as exc:
            raise self._error("close", exc) from None

    # -- identity --------------------------------------------------------------------

    async def verify(self) -> str | None:
        """None while the file open is still the one at ``path``; else what happened."""
        return await anyio.to_thread.run_sync(self._verify_sync)

    def _verify_sync(self) -> str | None:
        if self._identity is None:
            return None
        for path, identity, what in (
            (self.path, self._identity, "state file"),
            (self.lock_path, self._lock_identity, "state lock file"),
        ):
            if identity is None:
                continue
            try:
                st = os.stat(path)
            except FileNotFoundError:
                return f"sqlite store {self.path}: the {what} {path} was deleted"
            except OSError as exc:
                return f"sqlite store {self.path}: cannot stat the {what}: {exc.strerror or exc}"
            if (st.st_dev, st.st_ino) != identity:
                return f"sqlite store {self.path}: the {what} {path} was replaced by another file"
        return None

    async def recreate(self) -> None:
        """Reopen on whatever file is at ``path`` now (a new one if none is): after a
        deleted or replaced state file. The caller writes its records into it."""
        limiter = self._limiter
        if limiter is None:
            raise StoreError(f"sqlite store {self.path}: recreate failed: store is not open")

        def reopen() -> None:
            self._disconnect_sync()
            if self.exclusive and self._verify_lock_sync() is not None:
                self._unlock_sync()
                self._lock_sync()
            self._connect_sync()

        async with limiter:
            await anyio.to_thread.run_sync(reopen)

    def _verify_lock_sync(self) -> str | None:
        try:
            st = os.stat(self.lock_path)
        except OSError:
            return "gone"
        return None if (st.st_dev, st.st_ino) == self._lock_identity else "replaced"

    # -- reads -----------------------------------------------------------------------

    async def load_all(self) -> dict[str, StoredAccount]:
        def body(conn: sqlite3.Connection) -> dict[str, StoredAccount]:
            # Token types, scopes and outcomes repeat across accounts; sqlite returns a
            # new string for each row (about 10 MB at 100,000 accounts).
            shared: dict[str, str] = {}
            records = (_decode(row, shared, self.cipher) for row in conn.execute(_SELECT))
            return {r.account: r for r in records}

        return await self._run("load_all", body)

    async def load(self, account: str) -> StoredAccount | None:
        def body(conn: sqlite3.Connection) -> StoredAccount | None:
            row = conn.execute(f"{_SELECT} WHERE account = ?", (account,)).fetchone()
            return None if row is None else _decode(row, None, self.cipher)

        return await self._run(f"load of {account!r}", body)

    # -- writes ----------------------------------------------------------------------

    async def put(self, record: StoredAccount) -> StoredAccount:
        _validate(record)
        return await self._write(
            f"put of {record.account!r}",
            lambda c: _put_one(c, record, self.cipher),
            _secrets([record]),
        )

    async def put_many(self, records: Sequence[StoredAccount]) -> list[StoredAccount]:
        """Write every record in one transaction: all land, or none do.

        Records are applied in order, each with the same compare-and-swap as
        :meth:`put`; one conflict rolls the whole batch back and raises it.
        """
        if not records:
            return []
        for record in records:
            _validate(record)
        batch = list(records)
        return await self._write(
            f"put of {len(batch)} records",
            lambda c: [_put_one(c, r, self.cipher) for r in batch],
            _secrets(batch),
        )

    async def delete(self, account: str) -> None:
        def delete_both(c: sqlite3.Connection) -> None:
            c.execute("DELETE FROM accounts WHERE account = ?", (account,))
            c.execute("DELETE FROM leases WHERE account = ?", (account,))

        await self._write(f"delete of {account!r}", delete_both)

    # -- leases ----------------------------------------------------------------------

    async def claim(self, account: str, owner: str, ttl: float) -> bool:
        """Grant ``account``'s lease to ``owner`` unless another owner holds it unexpired.

        Expiry uses the wall clock (``time.time``): every process sharing the file runs
        on the same machine (SQLite's WAL needs shared memory), so they read the same
        clock, and unlike a monotonic clock it still means something after a reboot,
        when leases written before it are still in the file. A clock step moves every
        lease's expiry by the step; leases last seconds, and the cost of a misjudged one
        is a refresh delayed or, at worst, two processes refreshing once concurrently,
        which the compare-and-swap on ``version`` still turns into one stored winner.
        """
        if not ttl > 0:
            raise ValueError(f"lease ttl must be positive, got {ttl!r}")
        if self.exclusive:
            return True  # the process lock already keeps every other process out

        def grant(conn: sqlite3.Connection) -> bool:
            # Read the clock after the write lock is held, so "now" is not stale by the
            # time spent waiting for it.
            now = time.time()
            cursor = conn.execute(_CLAIM, (account, owner, now + ttl, now))
            return cursor.rowcount == 1

        return await self._write(f"claim of {account!r}", grant, durable=False)

    async def release(self, account: str, owner: str) -> None:
        if self.exclusive:
            return

        def drop(c: sqlite3.Connection) -> None:
            c.execute("DELETE FROM leases WHERE account = ? AND owner = ?", (account, owner))

        await self._write(f"release of {account!r}", drop, durable=False)

    # -- plumbing --------------------------------------------------------------------

    async def _run(
        self,
        what: str,
        body: Callable[[sqlite3.Connection], _T],
        secrets: frozenset[str] = frozenset(),
        *,
        write: bool = False,
    ) -> _T:
        limiter = self._limiter
        if limiter is None:
            raise StoreError(f"sqlite store {self.path}: {what} failed: store is not open")

        def call() -> _T:
            conn = self._conn
            if conn is None:
                # Queued before close() and run after it.
                raise StoreError(f"sqlite store {self.path}: {what} failed: store is closed")
            try:
                return body(conn)
            except sqlite3.Error as exc:
                # ``from None``: the sqlite3 exception's frames hold the bound parameters
                # (raw tokens); a traceback printed for the StoreError leaves them out.
                raise self._error(what, exc, secrets, write=write) from None
            except _BadRow as exc:
                raise self._bad_row(what, exc) from None

        return await anyio.to_thread.run_sync(call, limiter=limiter)

    async def _write(
        self,
        what: str,
        body: Callable[[sqlite3.Connection], _T],
        secrets: frozenset[str] = frozenset(),
        *,
        durable: bool = True,
    ) -> _T:
        """Run ``body`` in a write transaction, together with the writes queued
        meanwhile (see the module docstring), and return its result once committed."""
        limiter = self._limiter
        if limiter is None:
            raise StoreError(f"sqlite store {self.path}: {what} failed: store is not open")
        write = _Write(what, body, secrets, durable)
        self._pending.append(write)
        try:
            async with limiter:
                if not write.taken:
                    # Ours is still queued: commit it and everything queued with it.
                    batch, self._pending = self._pending, []
                    for queued in batch:
                        queued.taken = True
                    await anyio.to_thread.run_sync(self._commit_batch, batch)
        except BaseException:
            if not write.taken:
                # Cancelled while waiting: it never ran, and now never will.
                self._pending.remove(write)
            raise
        return write.outcome()

    def _commit_batch(self, batch: list[_Write[Any]]) -> None:
        """Commit ``batch`` in one transaction (worker thread, holding the connection)."""
        conn = self._conn
        if len(batch) == 1 or conn is None:
            for write in batch:
                self._commit_alone(write)
            return
        try:
            results = _write(
                conn,
                lambda c: [_in_savepoint(c, w.body) for w in batch],
                durable=any(w.durable for w in batch),
            )
        except Exception:
            # Nothing of the batch landed; each write alone gets its own outcome.
            for write in batch:
                self._commit_alone(write)
            return
        for write, (ok, value) in zip(batch, results, strict=True):
            write.settle(ok, value)

    def _commit_alone(self, write: _Write[Any]) -> None:
        conn = self._conn
        try:
            if conn is None:
                # Queued before close() and run after it.
                raise StoreError(f"sqlite store {self.path}: {write.what} failed: store is closed")
            try:
                value = _write(conn, write.body, durable=write.durable)
            except sqlite3.Error as exc:
                # ``from None``: the sqlite3 exception's frames hold the bound parameters
                # (raw tokens); a traceback printed for the StoreError leaves them out.
                raise self._error(write.what, exc, write.secrets, write=True) from None
            except _BadRow as exc:
                raise self._bad_row(write.what, exc) from None
        except Exception as exc:
            # Settled whatever happened: another caller may be waiting for it.
            write.settle(False, exc)
        else:
            write.settle(True, value)

    def _bad_row(self, what: str, exc: _BadRow) -> StoreError:
        return StoreError(
            f"sqlite store {self.path}: {what} failed: a stored record is "
            f"malformed ({exc}); was the file edited by hand?"
        )

    def _error(
        self,
        what: str,
        exc: sqlite3.Error,
        secrets: Iterable[str] = (),
        *,
        write: bool = False,
    ) -> StoreError:
        code = getattr(exc, "sqlite_errorcode", None)
        name = getattr(exc, "sqlite_errorname", None) or type(exc).__name__
        primary = code & 0xFF if isinstance(code, int) else None
        if primary in _BUSY_CODES:
            reason = (
                f"{_REASONS[primary]} for longer than the {self.busy_timeout:g} s busy "
                "timeout (another tokend, or a tool holding a write transaction?)"
            )
        elif primary is not None and primary in _REASONS:
            reason = _REASONS[primary]
        else:
            reason = "sqlite error"
        # SQLite's messages are fixed templates that do not echo bound values; the
        # redaction is a second line of defence for the one rule that must never break.
        detail = _redact(str(exc), secrets)
        outcome = "; the transaction was rolled back" if write else ""
        return StoreError(
            f"sqlite store {self.path}: {what} failed: {reason} [{name}: {detail}]{outcome}"
        )


def _write(
    conn: sqlite3.Connection,
    body: Callable[[sqlite3.Connection], _T],
    *,
    durable: bool = True,
) -> _T:
    """Run ``body`` in one write transaction; commit, or roll back on any exception."""
    # Leases need not survive a power cut: it kills every process that could hold one.
    # Skipping their fsync halves the syncs on the refresh path (claim/release around
    # each refresh). Set per transaction so one level never leaks into the next.
    conn.execute("PRAGMA synchronous = FULL" if durable else "PRAGMA synchronous = NORMAL")
    # IMMEDIATE takes the write lock up front (waiting up to the busy timeout), so the
    # compare-and-swap read and the write cannot interleave with another process.
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = body(conn)
        conn.execute("COMMIT")
    except BaseException:
        # After SQLITE_FULL or an I/O error SQLite may have rolled back on its own.
        # A failed rollback still leaves nothing committed, and the original error is
        # what the operator needs to see.
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise
    return result


@dataclass(eq=False, slots=True)
class _Write(Generic[_T]):
    """One queued write and, once committed or failed, its outcome."""

    what: str
    body: Callable[[sqlite3.Connection], _T]
    secrets: frozenset[str]
    durable: bool
    # Taken into a batch by the caller that holds the connection.
    taken: bool = False
    settled: bool = False
    ok: bool = False
    value: Any = None

    def settle(self, ok: bool, value: Any) -> None:
        self.settled, self.ok, self.value = True, ok, value

    def outcome(self) -> _T:
        if not self.settled:  # pragma: no cover - the batch always settles every write
            raise StoreError(f"{self.what} failed: the write was not committed")
        if not self.ok:
            raise self.value
        result: _T = self.value
        return result


def _in_savepoint(
    conn: sqlite3.Connection, body: Callable[[sqlite3.Connection], _T]
) -> tuple[bool, _T | StoreConflict]:
    """Run one write of a batch; a lost compare-and-swap undoes that write alone."""
    conn.execute("SAVEPOINT one_write")
    try:
        value = body(conn)
    except StoreConflict as exc:
        conn.execute("ROLLBACK TO one_write")
        conn.execute("RELEASE one_write")
        return False, exc
    conn.execute("RELEASE one_write")
    return True, value


def _put_one(
    conn: sqlite3.Connection, record: StoredAccount, cipher: TokenCipher | None = None
) -> StoredAccount:
    stored = replace(record, version=record.version + 1)
    values = _encode(stored, cipher)
    if record.version == 0:
        cursor = conn.execute(_INSERT, values)
    else:
        cursor = conn.execute(_UPDATE, (*values[1:], record.account, record.version))
    if cursor.rowcount != 1:
        row = conn.execute(
            "SELECT version FROM accounts WHERE account = ?", (record.account,)
        ).fetchone()
        found = "no stored record" if row is None else f"stored version is {row[0]}"
        raise StoreConflict(
            f"put of {record.account!r} lost a compare-and-swap: the write replaces "
            f"version {record.version} but {found}; reload and retry"
        )
    return stored


def _validate(record: StoredAccount) -> None:
    # SQLite stores NaN as NULL, which would silently drop a time or trip a constraint
    # with a confusing message; a NaN here is a bug upstream, so say so.
    token = record.token
    times = [
        record.updated_at,
        record.in_flight_since,
        record.consented_at,
        record.refresh_used_at,
        record.refresh_expires_at,
    ]
    if token is not None:
        times += [token.expires_at, token.issued_at]
    if any(t is not None and math.isnan(t) for t in times):
        raise ValueError(f"record for {record.account!r} has a NaN time")
    if record.version < 0:
        raise ValueError(f"record for {record.account!r} has a negative version")


def _encode(r: StoredAccount, cipher: TokenCipher | None = None) -> tuple[object, ...]:
    t = r.token
    refresh_token = r.refresh_token
    access_token = None if t is None else t.access_token
    if cipher is not None:
        refresh_token = _seal(cipher, r.account, "refresh_token", refresh_token)
        access_token = _seal(cipher, r.account, "access_token", access_token)
    return (
        r.account,
        r.seed_fingerprint,
        refresh_token,
        access_token,
        None if t is None else t.token_type,
        None if t is None else t.expires_at,
        None if t is None else t.issued_at,
        None if t is None else t.scope,
        r.in_flight_since,
        r.last_outcome,
        r.last_error,
        r.updated_at,
        r.version,
        r.consented_at,
        r.refresh_used_at,
        r.refresh_expires_at,
        1 if r.refresh_expiry_fixed else 0,
    )


def _seal(cipher: TokenCipher, account: str, column: str, value: str | None) -> str | None:
    return None if value is None else cipher.seal(account, column, value)


def _open(cipher: TokenCipher | None, account: object, column: str, value: object) -> object:
    if cipher is None or value is None:
        if is_sealed(value if isinstance(value, str) else None):
            raise _BadRow(f"{column} is encrypted but no state key is configured")
        return value
    try:
        return cipher.open(_str(account), column, _str(value))
    except StateKeyError as exc:
        raise _BadRow(f"{column}: {exc}") from None


def _reseal_all(conn: sqlite3.Connection, old: TokenCipher | None, new: TokenCipher) -> int:
    """Re-seal every row's tokens (opened with ``old``, or stored in the clear)."""
    rows = conn.execute("SELECT account, refresh_token, access_token FROM accounts").fetchall()
    for account, refresh_token, access_token in rows:
        values = [
            _seal(new, account, column, _opt_str(_open(old, account, column, value)))
            for column, value in (("refresh_token", refresh_token), ("access_token", access_token))
        ]
        conn.execute(
            "UPDATE accounts SET refresh_token = ?, access_token = ? WHERE account = ?",
            (*values, account),
        )
    return len(rows)


def _decode(
    row: Sequence[object],
    shared: dict[str, str] | None = None,
    cipher: TokenCipher | None = None,
) -> StoredAccount:
    """The record in ``row``; equal strings of the repetitive columns (token type,
    scope, last outcome) are taken from ``shared`` when given."""
    (
        account,
        seed_fingerprint,
        refresh_token,
        access_token,
        token_type,
        expires_at,
        issued_at,
        scope,
        in_flight_since,
        last_outcome,
        last_error,
        updated_at,
        version,
        consented_at,
        refresh_used_at,
        refresh_expires_at,
        refresh_expiry_fixed,
    ) = row
    if cipher is not None or is_sealed(refresh_token if isinstance(refresh_token, str) else None):
        refresh_token = _open(cipher, account, "refresh_token", refresh_token)
        access_token = _open(cipher, account, "access_token", access_token)
    token = None
    if access_token is not None:
        token = TokenSet(
            access_token=_str(access_token),
            token_type=_share(_str(token_type), shared),
            expires_at=_float(expires_at),
            issued_at=_float(issued_at),
            scope=_share(_opt_str(scope), shared),
        )
    if not isinstance(version, int):
        raise _BadRow(f"version is {type(version).__name__}, not INTEGER")
    return StoredAccount(
        account=_str(account),
        seed_fingerprint=_opt_str(seed_fingerprint),
        refresh_token=_opt_str(refresh_token),
        token=token,
        in_flight_since=None if in_flight_since is None else _float(in_flight_since),
        last_outcome=_share(_opt_str(last_outcome), shared),
        last_error=_opt_str(last_error),
        updated_at=_float(updated_at),
        version=version,
        consented_at=_opt_float(consented_at),
        refresh_used_at=_opt_float(refresh_used_at),
        refresh_expires_at=_opt_float(refresh_expires_at),
        refresh_expiry_fixed=bool(refresh_expiry_fixed),
    )


_S = TypeVar("_S", str, str | None)


def _share(value: _S, shared: dict[str, str] | None) -> _S:
    if value is None or shared is None:
        return value
    return shared.setdefault(value, value)


class _BadRow(Exception):
    """A stored value has the wrong type (the file was edited by hand)."""


# The column affinities make these checks hold for anything this module wrote; they
# only fail for a file edited by hand, and then loudly rather than with a wrong type.
def _str(value: object) -> str:
    if not isinstance(value, str):
        raise _BadRow(f"expected TEXT, got {type(value).__name__}")
    return value


def _opt_str(value: object) -> str | None:
    return None if value is None else _str(value)


def _float(value: object) -> float:
    if not isinstance(value, int | float):
        raise _BadRow(f"expected REAL, got {type(value).__name__}")
    return float(value)


def _opt_float(value: object) -> float | None:
    return None if value is None else _float(value)


def _secrets(records: Iterable[StoredAccount]) -> frozenset[str]:
    found: set[str] = set()
    for r in records:
        if r.refresh_token:
            found.add(r.refresh_token)
        if r.token is not None and r.token.access_token:
            found.add(r.token.access_token)
    return frozenset(found)


def _redact(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "<redacted>")
    return text
