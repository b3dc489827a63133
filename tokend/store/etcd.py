"""The shared backend: accounts in etcd, owned one replica at a time.

Keys under the configured prefix ``P``::

    P members/<replica>   one per live replica, bound to its lease
    P owners/<account>    the replica that may refresh the account, bound to its lease
    P accounts/<account>  the account's record, AES-GCM sealed (account name as
                          associated data), in an envelope naming the writer

Ownership: accounts are spread over the live members by rendezvous hashing (each
account goes to the member with the highest hash of member and account), so every
replica computes the same assignment from the membership alone and a join or leave
moves only the accounts that must move. A replica acquires the owner keys of its
accounts (create-if-absent, bound to its lease) and gives up those that moved away
once no refresh of theirs is running. A replica that dies stops renewing its lease;
etcd deletes its member and owner keys when the lease expires, and the survivors
acquire its accounts.

Fencing: every write of an existing record is one txn comparing the record's
mod_revision and the owner key's create_revision as this replica acquired it. A
replica whose lease expired while it was paused finds its owner keys deleted (or
recreated by a successor) and can never commit; nothing it does after waking up lands.

The record's version is its mod_revision, so the engine's compare-and-swap and etcd's
are the same thing. Non-owners keep the records through one watch on the prefix and
hand them to the engine (``on_record``) so every replica serves every account.

Writes per refresh: the in-flight mark and the commit (2 txns); claim and release
are answered from memory while the replica holds the owner key.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import math
import os
import socket
import ssl
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import anyio
import orjson

from tokend.logs import get_logger
from tokend.model import StoredAccount, TokenSet
from tokend.store._base import (
    AccountsAcquired,
    Ownership,
    RecordWritten,
    StoreChange,
    StoreConflict,
    StoreError,
)
from tokend.store._crypto import STATE_KEY, RecordCipher, StateKeyError, configured_key
from tokend.store._etcd_client import (
    EtcdClient,
    EtcdError,
    EtcdRejected,
    KeyValue,
    LeaseNotFound,
    WatchCompacted,
    WatchEvent,
    compare_create,
    compare_mod,
    op_delete,
    op_put,
    op_range,
    prefix_end,
)
from tokend.store._secret_sources import SecretSource, SecretUnreadable, configured_secret

__all__ = ["EtcdSettings", "EtcdStore", "StoreFenced", "rendezvous_owner"]

_log = get_logger()

# Owner keys created (or deleted) per txn: etcd's default limit of operations per txn
# branch (--max-txn-ops 128). A cluster set lower refuses the txn; the batch is halved.
_KEYS_PER_TXN: Final = 128
# Batches in flight at once: a third of 10,000 accounts taken over by two survivors is
# one round of txns each.
_ACQUIRE_PARALLEL: Final = 16
_ENVELOPE_VERSION: Final = 1
# With state.username: the password, from the file, the environment or a credential.
ETCD_PASSWORD: Final = SecretSource(
    "etcd password", "state.password_file", "TOKEND_ETCD_PASSWORD", "tokend-etcd-password"
)
_SWEEP_INTERVAL: Final = 3.0


class StoreFenced(StoreConflict):
    """A write was refused because this replica no longer owns the account."""


@dataclass(frozen=True, slots=True)
class EtcdSettings:
    """What the etcd store needs, taken from ``state:`` in the config."""

    endpoints: Sequence[str]
    # None: the key comes from $TOKEND_STATE_KEY or the systemd credential (as for
    # the sqlite store); so does the password, with a username.
    encryption_key_file: Path | None = None
    prefix: str = "/tokend/"
    lease_ttl: float = 5.0
    request_timeout: float = 0.5
    call_timeout: float = 5.0
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    username: str | None = None
    password_file: Path | None = None
    replica_id: str | None = None
    # How often the watch is checked for having gone quiet while keys changed.
    watchdog_interval: float = 4.0


def rendezvous_owner(account: str, members: Iterable[str]) -> str | None:
    """The member with the highest hash of (member, account): every replica agrees."""
    best: tuple[bytes, str] | None = None
    encoded = account.encode()
    for member in members:
        score = hashlib.blake2b(member.encode() + b"\0" + encoded, digest_size=8).digest()
        if best is None or score > best[0]:
            best = (score, member)
    return None if best is None else best[1]


def _default_replica_id() -> str:
    # The host name (a pod name in Kubernetes) reads well in status and logs; the
    # random part keeps a restarted process apart from its predecessor, whose lease
    # may still be alive for a few seconds.
    host = socket.gethostname() or "tokend"
    return f"{host}-{os.urandom(3).hex()}"


@dataclass(slots=True)
class _FleetState:
    """What this replica knows about members and owner keys (from the watch)."""

    members: set[str] = field(default_factory=set)
    # account -> (owning replica, create_revision of the owner key)
    owners: dict[str, tuple[str, int]] = field(default_factory=dict)
    # accounts whose owner key this replica holds -> the key's create_revision
    held: dict[str, int] = field(default_factory=dict)
    # accounts with a refresh running here (claimed, not released)
    busy: set[str] = field(default_factory=set)
    # held accounts whose owner keys are being given up (no claim for them)
    releasing: set[str] = field(default_factory=set)
    # every account known to exist (records in etcd, or asked about)
    accounts: set[str] = field(default_factory=set)
    # accounts whose owner key was deleted since the last rebalance (a replica's lease
    # ran out, or it gave them up): the only ones a leave can have moved to this one
    orphans: set[str] = field(default_factory=set)
    # account -> its rendezvous owner among ``members``, filled as asked and emptied
    # when the membership changes: the sweep over every account every few seconds
    # is then lookups, not a hash per account and member
    assigned: dict[str, str | None] = field(default_factory=dict)

    def join(self, member: str) -> None:
        if member not in self.members:
            self.members.add(member)
            self.assigned.clear()

    def leave(self, member: str) -> None:
        if member in self.members:
            self.members.discard(member)
            self.assigned.clear()

    def owner_by_hash(self, account: str) -> str | None:
        try:
            return self.assigned[account]
        except KeyError:
            owner = self.assigned[account] = rendezvous_owner(account, self.members)
            return owner


class EtcdStore:
    """A :class:`~tokend.store.Store` shared by replicas through etcd (see above)."""

    def __init__(self, settings: EtcdSettings) -> None:
        self.settings = settings
        self.replica_id = settings.replica_id or _default_replica_id()
        prefix = settings.prefix.encode()
        self._members_prefix = prefix + b"members/"
        self._owners_prefix = prefix + b"owners/"
        self._accounts_prefix = prefix + b"accounts/"
        self._prefix = prefix
        self._client: EtcdClient | None = None
        self._cipher: RecordCipher | None = None
        self._state = _FleetState()
        self._lease = 0
        self._lease_ttl = max(2, math.ceil(settings.lease_ttl))
        # Monotonic time until which the lease is surely alive: the send time of the
        # last successful keep-alive plus the TTL it reported.
        self._lease_until = 0.0
        self._watch_revision = 0
        self._watch_scope: anyio.CancelScope | None = None
        self._problem: str | None = "etcd store is not open"
        self._keepalive_error: str | None = None
        self._rebalance_wanted = anyio.Event()
        self._closing = False
        self._keys_per_txn = _KEYS_PER_TXN
        # Records other replicas wrote, accounts taken over: to whoever follows
        # (bounded: a slow follower holds the watch back rather than memory growing).
        self._changes_send, self._changes_recv = anyio.create_memory_object_stream[StoreChange](
            1024
        )
        self._followed = False
        # Counters for metrics and benchmarks.
        self.fenced_writes = 0
        self.takeovers = 0
        self.records_followed = 0

    def __repr__(self) -> str:
        return f"EtcdStore({list(self.settings.endpoints)!r}, prefix={self.settings.prefix!r})"

    # -- lifecycle -------------------------------------------------------------------

    @property
    def client(self) -> EtcdClient:
        if self._client is None:
            raise StoreError("etcd store is not open")
        return self._client

    async def open(self) -> None:
        """Read the key and credentials, load the membership and ownership map (the
        replica joins in :meth:`run`). Fails with one clear StoreError when etcd
        cannot be reached."""
        if self._client is not None:
            return
        s = self.settings
        self._cipher = RecordCipher(_state_key(s))
        password = _password(s)
        client = EtcdClient(
            s.endpoints,
            request_timeout=s.request_timeout,
            call_timeout=s.call_timeout,
            ssl_context=_ssl_context(s),
            username=s.username,
            password=password,
        )
        await client.open()
        self._client = client
        try:
            await self._sync()
        except BaseException:
            self._client = None
            await client.close()
            raise

    async def close(self) -> None:
        """Give up the lease (so other replicas take over at once), then disconnect."""
        client, self._closing = self._client, True
        if client is None:
            return
        with anyio.CancelScope(shield=True):
            if self._lease:
                # On failure it expires by itself after its TTL.
                with contextlib.suppress(EtcdError):
                    await client.lease_revoke(self._lease, budget=2.0)
            self._state.held.clear()
            self._client = None
            await client.close()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Join the membership, then the store's background work: keep the lease
        alive, follow the watch, rebalance ownership. Runs until cancelled.

        The lease is granted here, not in :meth:`open`: what a replica does between
        the two (reading its config and every record, at 10,000 accounts several
        seconds on a loaded host) would otherwise outlast a lease nobody renews, and
        the others would take over and hand back its accounts for nothing."""
        await self._join()
        async with anyio.create_task_group() as group:
            group.start_soon(self._keepalive_loop)
            group.start_soon(self._watch_loop)
            group.start_soon(self._watchdog)
            group.start_soon(self._rebalance_loop)
            task_status.started()

    # -- Store protocol: reads -------------------------------------------------------

    async def load_all(self) -> dict[str, StoredAccount]:
        kvs, _ = await self.client.range_all(self._accounts_prefix)
        records = {}
        for kv in kvs:
            record = self._decode(kv)
            if record is not None:
                records[record.account] = record
                self._state.accounts.add(record.account)
        return records

    async def load(self, account: str) -> StoredAccount | None:
        result = await self.client.range(self._record_key(account))
        self._state.accounts.add(account)
        return self._decode(result.kvs[0]) if result.kvs else None

    # -- Store protocol: writes ------------------------------------------------------

    async def put(self, record: StoredAccount) -> StoredAccount:
        """Write ``record`` if its version is the stored mod_revision and this replica
        still holds the account's owner key (a first write only needs the key absent)."""
        account = record.account
        key = self._record_key(account)
        owner_key = self._owner_key(account)
        sealed = self._encode(record)
        first = record.version == 0
        compare = [compare_create(key, 0) if first else compare_mod(key, record.version)]
        held = self._state.held.get(account)
        if held is not None:
            compare.append(compare_create(owner_key, held))
        elif record.version != 0:
            self.fenced_writes += 1
            raise StoreFenced(
                f"etcd store: write of {account!r} refused: this replica does not own it"
            )
        self._state.accounts.add(account)
        result = await self.client.txn(
            compare, [op_put(key, sealed)], [op_range(key), op_range(owner_key)]
        )
        if result.succeeded:
            return record.evolve(version=result.revision)
        current, owner = result.ranges[0], result.ranges[1]
        if current and current[0].value == sealed:
            # An earlier attempt of this same call timed out after committing.
            return record.evolve(version=current[0].mod_revision)
        if held is not None and (not owner or owner[0].create_revision != held):
            self._lose(account, held)
            self.fenced_writes += 1
            raise StoreFenced(
                f"etcd store: write of {account!r} refused: ownership moved to "
                f"{_owner_name(owner)} (this replica's lease expired or it was rebalanced)"
            )
        if first and current:
            stored = self._decode(current[0])
            if stored is not None and stored.seed_fingerprint == record.seed_fingerprint:
                # Replicas starting together all create the record from the same seed:
                # the one stored is that chain (maybe rotated since), so it is the answer.
                return stored
        found = f"stored version is {current[0].mod_revision}" if current else "no stored record"
        raise StoreConflict(
            f"put of {account!r} lost a compare-and-swap: the write replaces version "
            f"{record.version} but {found}; reload and retry"
        )

    async def delete(self, account: str) -> None:
        await self.client.txn(
            [], [op_delete(self._record_key(account)), op_delete(self._owner_key(account))]
        )
        self._state.accounts.discard(account)
        self._state.assigned.pop(account, None)
        self._state.held.pop(account, None)

    # -- Store protocol: ownership ---------------------------------------------------

    async def claim(self, account: str, owner: str, ttl: float) -> bool:
        """True if this replica owns ``account`` now (acquiring it if it is this
        replica's by rendezvous and free) and its lease has time left."""
        st = self._state
        st.accounts.add(account)
        if not self._lease_usable() or account in st.releasing:
            return False
        if account not in st.held:
            if st.owner_by_hash(account) != self.replica_id:
                return False
            if account in st.owners:
                return False
            if not await self._acquire([account]):
                return False
        st.busy.add(account)
        return True

    async def release(self, account: str, owner: str) -> None:
        st = self._state
        st.busy.discard(account)
        if account in st.held and st.owner_by_hash(account) != self.replica_id:
            self._rebalance_wanted.set()

    def changes(self) -> AsyncIterator[StoreChange]:
        """Records other replicas wrote and accounts this one took over, in order, from
        this call on (one follower; until there is one, nothing is queued)."""
        self._followed = True
        return self._changes_recv.__aiter__()

    def owned_elsewhere(self, account: str) -> bool:
        entry = self._state.owners.get(account)
        return entry is not None and entry[0] != self.replica_id and self._lease_usable()

    async def _tell(self, change: StoreChange) -> None:
        if self._followed:
            await self._changes_send.send(change)

    def owns(self, account: str) -> bool:
        return account in self._state.held

    def owner_of(self, account: str) -> str | None:
        if account in self._state.held:
            return self.replica_id
        entry = self._state.owners.get(account)
        return None if entry is None else entry[0]

    def ownership(self) -> Ownership:
        st = self._state
        return Ownership(
            replica=self.replica_id,
            owned=len(st.held),
            replicas=len(st.members),
            acquired_total=self.takeovers,
            fenced_writes_total=self.fenced_writes,
            records_followed_total=self.records_followed,
        )

    @property
    def members(self) -> frozenset[str]:
        return frozenset(self._state.members)

    @property
    def held_count(self) -> int:
        return len(self._state.held)

    async def verify(self) -> str | None:
        """None while the lease is alive; else why this replica cannot refresh. One
        slow keep-alive is no problem yet: the lease has time left for the retry."""
        if self._problem is not None or self._lease_usable():
            return self._problem
        detail = f": {self._keepalive_error}" if self._keepalive_error else ""
        return (
            "etcd lease not confirmed recently (cluster unreachable or without quorum), "
            f"refreshes paused{detail}"
        )

    async def recreate(self) -> None:
        """Nothing to recreate: the cluster keeps the records."""

    # -- membership and lease --------------------------------------------------------

    async def _join(self) -> None:
        client = self.client
        started = anyio.current_time()
        lease, ttl = await client.lease_grant(self._lease_ttl)
        self._lease = lease
        self._lease_until = started + ttl
        self._state.held.clear()
        member = {"replica": self.replica_id, "lease": f"{lease:x}"}
        key = self._member_key(self.replica_id)
        await client.txn([], [op_put(key, orjson.dumps(member), lease)])
        self._state.join(self.replica_id)
        self._problem = None
        _log.info("etcd_joined", replica=self.replica_id, lease=f"{lease:x}", lease_ttl_s=ttl)

    def _lease_usable(self) -> bool:
        # A refresh needs the lease to outlive it with margin: claim only while at
        # least a quarter of the TTL is left. Keep-alives go every quarter, so one
        # that fails (and its retry) still leaves the lease usable.
        return bool(self._lease) and (
            self._lease_until - anyio.current_time() > self._lease_ttl / 4
        )

    async def _keepalive_loop(self) -> None:
        client = self.client
        interval = self._lease_ttl / 4
        while True:
            sent = anyio.current_time()
            try:
                ttl, _ = await client.lease_keepalive(self._lease, budget=max(0.5, interval))
            except LeaseNotFound:
                await self._rejoin("lease expired")
                continue
            except EtcdError as exc:
                self._keepalive_error = str(exc)
                await anyio.sleep(min(0.25, interval))
                continue
            self._lease_until = sent + ttl
            self._keepalive_error = None
            await anyio.sleep(max(0.05, interval - (anyio.current_time() - sent)))

    async def _rejoin(self, why: str) -> None:
        """The lease is gone (and with it every owner key): join again."""
        lost = list(self._state.held)
        self._state.held.clear()
        self._state.leave(self.replica_id)
        self._problem = f"etcd {why}: rejoining ({len(lost)} accounts given up)"
        while not self._closing:
            try:
                await self._join()
                break
            except EtcdError as exc:
                self._problem = f"etcd {why}, rejoin failed: {exc}"
                await anyio.sleep(0.25)
        self._rebalance_wanted.set()

    # -- watch -----------------------------------------------------------------------

    async def _sync(self) -> None:
        """Read members and owner keys (and which accounts exist) at one revision."""
        client = self.client
        # In pages at one revision: on a loaded host one answer with every key of
        # 10,000 accounts may outlast its deadline, retried whole each time.
        members, revision = await client.range_all(self._members_prefix)
        owners, _ = await client.range_all(self._owners_prefix, revision=revision)
        st = self._state
        st.members = {_suffix(kv.key, self._members_prefix) for kv in members}
        st.members.add(self.replica_id)
        st.assigned.clear()
        st.owners = {
            _suffix(kv.key, self._owners_prefix): (kv.value.decode(), kv.create_revision)
            for kv in owners
        }
        keys, _ = await client.range_all(
            self._accounts_prefix, revision=revision, keys_only=True, page=2000
        )
        st.accounts.update(_suffix(kv.key, self._accounts_prefix) for kv in keys)
        self._watch_revision = revision
        self._rebalance_wanted.set()

    async def _watch_loop(self) -> None:
        client = self.client
        pause = 0.05
        while True:
            try:
                with anyio.CancelScope() as scope:
                    # The watchdog cancels a watch that has gone quiet while keys
                    # changed (a member cut off from the quorum, or hung).
                    self._watch_scope = scope
                    async for _revision, events in client.watch(
                        self._prefix, prefix_end(self._prefix), self._watch_revision + 1
                    ):
                        pause = 0.05
                        for event in events:
                            await self._apply(event)
                            self._watch_revision = max(self._watch_revision, event.kv.mod_revision)
                if scope.cancelled_caught:
                    _log.warning("etcd_watch_restarted", endpoint=client.watch_endpoint)
                    client.avoid(client.watch_endpoint)
            except WatchCompacted:
                # Missed events are gone: read the state again, and every record.
                await self._resync()
            except EtcdError:
                await anyio.sleep(pause)
                pause = min(pause * 2, 1.0)

    async def _watchdog(self) -> None:
        """Restart a watch that has gone quiet while keys under the prefix changed (its
        member cut off from the quorum, or hung)."""
        client = self.client
        interval = self.settings.watchdog_interval
        prefix, end = self._prefix, prefix_end(self._prefix)
        while True:
            await anyio.sleep(interval)
            seen = self._watch_revision
            try:
                # The cluster's revision now (a count reads no values).
                count = await client.range(prefix, end, count_only=True, budget=interval / 2)
            except EtcdError:
                continue  # the keep-alive reports an unreachable cluster
            now = count.revision
            if now <= seen:
                continue  # nothing written anywhere since the last event seen
            # Give the events a moment to arrive: any event at all shows the watch alive.
            await anyio.sleep(interval / 2)
            if self._watch_revision != seen:
                continue
            # Nothing came, but the writes may all have been outside the prefix (a
            # cluster shared with others). Whether a key under it changed: etcd applies
            # min_mod_revision to the keys it returns, not to a count.
            try:
                changed = await client.range(
                    prefix,
                    end,
                    keys_only=True,
                    limit=1,
                    min_mod_revision=seen + 1,
                    budget=interval / 2,
                    bulk=True,
                )
            except EtcdError:
                continue
            scope = self._watch_scope
            if changed.kvs and self._watch_revision == seen and scope is not None:
                scope.cancel()

    async def _resync(self) -> None:
        try:
            await self._sync()
            records = await self.load_all()
        except EtcdError:
            return
        for record in records.values():
            await self._tell(RecordWritten(record))

    async def _apply(self, event: WatchEvent) -> None:
        key = event.kv.key
        st = self._state
        if key.startswith(self._accounts_prefix):
            account = _suffix(key, self._accounts_prefix)
            if event.deleted:
                st.accounts.discard(account)
                st.assigned.pop(account, None)
                return
            st.accounts.add(account)
            if not self._followed or _writer(event.kv.value) == self.replica_id:
                return  # this replica's own write: the engine has it already
            try:
                record = self._decode(event.kv)
            except StoreError as exc:
                _log.error("store_record_unreadable", account=account, error=str(exc))
                return
            if record is not None:
                self.records_followed += 1
                await self._tell(RecordWritten(record))
        elif key.startswith(self._owners_prefix):
            account = _suffix(key, self._owners_prefix)
            held = st.held.get(account)
            known = st.owners.get(account)
            # An acquisition's answer may come before the watch has caught up with
            # it: an event about an earlier owner key (given up, or its lease gone)
            # then says nothing about the one created since.
            if known is not None and known[1] > event.kv.mod_revision:
                return
            if event.deleted:
                st.owners.pop(account, None)
                st.orphans.add(account)
                if held is not None:
                    self._lose(account, held)
                self._rebalance_wanted.set()
            else:
                owner = (event.kv.value.decode(), event.kv.create_revision)
                st.owners[account] = owner
                if held is not None and owner[1] != held:
                    self._lose(account, held)
        elif key.startswith(self._members_prefix):
            member = _suffix(key, self._members_prefix)
            if event.deleted:
                if member == self.replica_id:
                    return  # the keep-alive finds out and rejoins
                st.leave(member)
                _log.info("etcd_member_left", member=member, members=len(st.members))
            else:
                if member not in st.members:
                    _log.info("etcd_member_joined", member=member, members=len(st.members) + 1)
                st.join(member)
            self._rebalance_wanted.set()

    def _lose(self, account: str, create_revision: int) -> None:
        if self._state.held.get(account) == create_revision:
            del self._state.held[account]

    # -- rebalancing -----------------------------------------------------------------

    async def _rebalance_loop(self) -> None:
        while True:
            # Events (members, owner keys) ask for a rebalance at once; the sweep every
            # few seconds catches an account that appeared without one.
            with anyio.move_on_after(_SWEEP_INTERVAL):
                await self._rebalance_wanted.wait()
            self._rebalance_wanted = anyio.Event()
            if not self._lease_usable():
                continue
            try:
                await self._rebalance()
            except EtcdError:
                await anyio.sleep(0.2)
                self._rebalance_wanted.set()

    async def _rebalance(self) -> None:
        st = self._state
        me = self.replica_id
        orphans, st.orphans = st.orphans, set()
        if orphans:
            # A takeover: the dead replica's owner keys went in one revision. Only
            # they can have become this replica's, so they go first, without the
            # pass over every account below (1,000,000 hashes per member at scale).
            await self._take(
                [
                    account
                    for account in orphans
                    if account not in st.owners
                    and account not in st.held
                    and account in st.accounts
                    and st.owner_by_hash(account) == me
                ]
            )
        want: list[str] = []
        give: list[str] = []
        for account in st.accounts:
            mine = st.owner_by_hash(account) == me
            if mine and account not in st.owners and account not in st.held:
                want.append(account)
            elif not mine and account in st.held and account not in st.busy:
                give.append(account)
        if give:
            await self._release_keys(give)
            _log.info("etcd_accounts_released", count=len(give), held=len(st.held))
        await self._take(want)

    async def _take(self, accounts: list[str]) -> None:
        if not accounts:
            return
        got = await self._acquire(sorted(accounts), announce=True)
        if got:
            self.takeovers += len(got)
            _log.info("etcd_accounts_acquired", count=len(got), held=len(self._state.held))

    async def _acquire(self, accounts: Sequence[str], *, announce: bool = False) -> list[str]:
        """Create the owner keys of ``accounts`` that are free, bound to the lease, a
        batch per txn and a few batches at once. ``announce``: tell the follower about
        each batch as it lands, so a takeover of thousands of accounts starts
        refreshing the first ones while the rest are still being acquired."""
        got: list[str] = []
        size = self._keys_per_txn
        batches = iter([accounts[i : i + size] for i in range(0, len(accounts), size)])

        async def worker() -> None:
            for batch in batches:
                won = await self._acquire_batch(batch)
                got.extend(won)
                if announce and won:
                    await self._tell(AccountsAcquired(tuple(won)))

        async with anyio.create_task_group() as group:
            for _ in range(min(_ACQUIRE_PARALLEL, -(-len(accounts) // size))):
                group.start_soon(worker)
        return got

    async def _acquire_batch(self, accounts: Sequence[str]) -> list[str]:
        try:
            return await self._acquire_txn(accounts)
        except EtcdRejected as exc:
            if len(accounts) < 2 or not _too_many_ops(exc):
                raise
        # The cluster allows fewer operations per txn than this batch has: halve it
        # (for good: later batches start at the size that worked).
        half = len(accounts) // 2
        self._keys_per_txn = min(self._keys_per_txn, half)
        _log.warning("etcd_txn_ops_limited", keys_per_txn=self._keys_per_txn)
        return [
            *await self._acquire_batch(accounts[:half]),
            *await self._acquire_batch(accounts[half:]),
        ]

    async def _acquire_txn(self, accounts: Sequence[str]) -> list[str]:
        client = self.client
        st = self._state
        lease = self._lease
        me = self.replica_id.encode()
        got: list[str] = []
        pending = list(accounts)
        while pending:
            keys = [self._owner_key(a) for a in pending]
            result = await client.txn(
                [compare_create(k, 0) for k in keys],
                [op_put(k, me, lease) for k in keys],
                [op_range(k) for k in keys],
            )
            # What the answer says about the owner keys is as of its revision. Once
            # the watch has applied that revision, the watch's view is as new or newer
            # (the key may have been deleted since, by a lease running out or its owner
            # giving it up): then the answer only confirms, never overwrites. Otherwise
            # the watch's later events correct what is set here.
            behind = result.revision > self._watch_revision
            if result.succeeded:
                for account in pending:
                    if behind or st.owners.get(account) == (self.replica_id, result.revision):
                        st.held[account] = result.revision
                        st.owners[account] = (self.replica_id, result.revision)
                        got.append(account)
                break
            free = []
            for account, found in zip(pending, result.ranges, strict=True):
                if not found:
                    free.append(account)
                    continue
                kv = found[0]
                owner = (kv.value.decode(), kv.create_revision)
                if behind:
                    st.owners[account] = owner
                if kv.lease == lease and kv.value == me and st.owners.get(account) == owner:
                    # An earlier attempt timed out after committing: it is ours.
                    st.held[account] = kv.create_revision
                    got.append(account)
            pending = free
        return got

    async def _release_keys(self, accounts: Sequence[str]) -> None:
        """Delete the owner keys of ``accounts`` (still held, not refreshing), a batch
        per txn; a batch whose compare fails (a key lost meanwhile) goes one by one."""
        st = self._state
        todo = [(a, st.held[a]) for a in accounts if a in st.held and a not in st.busy]
        # From here on no claim is granted for them: a refresh started now would find
        # its owner key deleted under it at commit time.
        st.releasing.update(a for a, _ in todo)
        try:
            size = self._keys_per_txn
            for start in range(0, len(todo), size):
                batch = todo[start : start + size]
                keys = [self._owner_key(a) for a, _ in batch]
                compare = [
                    compare_create(k, held) for k, (_, held) in zip(keys, batch, strict=True)
                ]
                try:
                    result = await self.client.txn(compare, [op_delete(k) for k in keys])
                except EtcdRejected as exc:
                    if len(batch) < 2 or not _too_many_ops(exc):
                        raise
                    # Fewer operations per txn allowed: the rebalance retries smaller.
                    self._keys_per_txn = len(batch) // 2
                    _log.warning("etcd_txn_ops_limited", keys_per_txn=self._keys_per_txn)
                    raise
                if not result.succeeded and len(batch) > 1:
                    for key, one in zip(keys, batch, strict=True):
                        await self.client.txn([compare_create(key, one[1])], [op_delete(key)])
                for account, held in batch:
                    self._lose(account, held)
                    st.releasing.discard(account)
                    if st.owners.get(account, ("", 0))[1] == held:
                        del st.owners[account]
        finally:
            # A batch that failed (etcd unreachable) keeps its keys: claims resume, and
            # the next rebalance tries again.
            st.releasing.difference_update(a for a, _ in todo)

    # -- encoding --------------------------------------------------------------------

    def _record_key(self, account: str) -> bytes:
        return self._accounts_prefix + account.encode()

    def _owner_key(self, account: str) -> bytes:
        return self._owners_prefix + account.encode()

    def _member_key(self, replica: str) -> bytes:
        return self._members_prefix + replica.encode()

    def _encode(self, record: StoredAccount) -> bytes:
        cipher = self._cipher
        if cipher is None:
            raise StoreError("etcd store is not open")
        _check_times(record)
        token = record.token
        body: dict[str, Any] = {
            "seed": record.seed_fingerprint,
            "rt": record.refresh_token,
            "flight": record.in_flight_since,
            "outcome": record.last_outcome,
            "error": record.last_error,
            "updated": record.updated_at,
        }
        # The refresh token's lifetime: optional keys, absent from older records.
        for key, value in (
            ("consented", record.consented_at),
            ("used", record.refresh_used_at),
            ("rt_exp", record.refresh_expires_at),
        ):
            if value is not None:
                body[key] = value
        if record.refresh_expiry_fixed:
            body["rt_exp_fixed"] = True
        if token is not None:
            body["at"] = {
                "token": token.access_token,
                "type": token.token_type,
                "exp": token.expires_at,
                "iat": token.issued_at,
                "scope": token.scope,
            }
        sealed = cipher.seal(record.account, orjson.dumps(body))
        envelope = {
            "v": _ENVELOPE_VERSION,
            "by": self.replica_id,
            "lease": f"{self._lease:x}",
            "sealed": sealed,
        }
        return orjson.dumps(envelope, default=_bytes_to_b64)

    def _decode(self, kv: KeyValue) -> StoredAccount | None:
        account = _suffix(kv.key, self._accounts_prefix)
        cipher = self._cipher
        if cipher is None:
            raise StoreError("etcd store is not open")
        try:
            envelope = orjson.loads(kv.value)
            if envelope.get("v") != _ENVELOPE_VERSION:
                raise ValueError(f"unknown record format {envelope.get('v')!r}")
            body = orjson.loads(cipher.open(account, base64.b64decode(envelope["sealed"])))
            at = body.get("at")
            token = None
            if at is not None:
                token = TokenSet(
                    access_token=str(at["token"]),
                    token_type=str(at["type"]),
                    expires_at=float(at["exp"]),
                    issued_at=float(at["iat"]),
                    scope=at.get("scope"),
                )
            return StoredAccount(
                account=account,
                seed_fingerprint=body.get("seed"),
                refresh_token=body.get("rt"),
                token=token,
                in_flight_since=body.get("flight"),
                last_outcome=body.get("outcome"),
                last_error=body.get("error"),
                updated_at=float(body.get("updated") or 0.0),
                version=kv.mod_revision,
                consented_at=_opt_float(body.get("consented")),
                refresh_used_at=_opt_float(body.get("used")),
                refresh_expires_at=_opt_float(body.get("rt_exp")),
                refresh_expiry_fixed=body.get("rt_exp_fixed") is True,
            )
        except StateKeyError as exc:
            raise StoreError(f"etcd store: {exc}") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(
                f"etcd store: the record of {account!r} is malformed ({type(exc).__name__}); "
                "was it written by something other than tokend?"
            ) from None


def _opt_float(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise ValueError("a time is not a number")


def _state_key(s: EtcdSettings) -> bytes:
    try:
        key = configured_key(s.encryption_key_file)
    except StateKeyError as exc:
        raise StoreError(str(exc)) from None
    if key is None:
        raise StoreError(
            "etcd store needs a state encryption key (refresh tokens leave this host): "
            + STATE_KEY.where()
        )
    return key


def _password(s: EtcdSettings) -> str | None:
    if s.username is None:
        return None
    try:
        found = configured_secret(ETCD_PASSWORD, s.password_file)
    except SecretUnreadable as exc:
        raise StoreError(str(exc)) from None
    if found is None:
        raise StoreError(f"etcd user {s.username!r} needs a password: {ETCD_PASSWORD.where()}")
    raw, where = found
    try:
        return raw.decode().strip()
    except UnicodeDecodeError:
        raise StoreError(f"{where}: the password is not UTF-8 text") from None


def _bytes_to_b64(value: object) -> str:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    raise TypeError(type(value).__name__)


def _writer(value: bytes) -> str | None:
    try:
        envelope = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    writer = envelope.get("by") if isinstance(envelope, dict) else None
    return writer if isinstance(writer, str) else None


def _too_many_ops(exc: EtcdRejected) -> bool:
    return "too many operations" in str(exc)


def _owner_name(found: list[KeyValue]) -> str:
    return found[0].value.decode(errors="replace") if found else "nobody yet"


def _suffix(key: bytes, prefix: bytes) -> str:
    return key[len(prefix) :].decode()


def _check_times(record: StoredAccount) -> None:
    token = record.token
    times = [record.updated_at, record.in_flight_since, record.consented_at]
    times += [record.refresh_used_at, record.refresh_expires_at]
    if token is not None:
        times += [token.expires_at, token.issued_at]
    if any(t is not None and not math.isfinite(t) for t in times):
        raise ValueError(f"record for {record.account!r} has a non-finite time")


def _ssl_context(s: EtcdSettings) -> ssl.SSLContext | None:
    if s.ca_file is None and s.cert_file is None:
        return None
    try:
        context = ssl.create_default_context(cafile=str(s.ca_file) if s.ca_file else None)
        if s.cert_file is not None:
            context.load_cert_chain(str(s.cert_file), str(s.key_file) if s.key_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise StoreError(f"etcd TLS files: cannot load them: {exc}") from None
    return context
