"""The refresh engine: the account registry, scheduling, provider queues, the task group.

How an account moves::

    due time (heap; one APScheduler job wakes the engine)
      -> wake: busy? coalesce into a re-check when the holder finishes
      -> the provider's queue (earliest expiry first; state ``queued``)
      -> the provider's pump: a concurrency slot, the rate limit, the breaker
      -> one refresh (refresh.py: claim, reload, mark, exchange, commit, publish, release)
      -> the next due time, set by the refresh's outcome

Every task lives in this engine's task groups: the pumps, the refreshes, the clock and
store watchers. A due wake-up is never dropped: it either queues the account, or marks
it for a re-check that runs when whoever holds the account lets go.
"""

from __future__ import annotations

import asyncio
import functools
import math
import random
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Final

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup, TaskStatus

from tokend._gc import paused_gc
from tokend.clock import Clock, SystemClock
from tokend.config import (
    AccountConfig,
    Config,
    RefreshPolicyConfig,
)
from tokend.logs import get_logger, register_secret
from tokend.model import AccountState, StoredAccount, TokenSet
from tokend.oauth import FailureKind, ProviderClient
from tokend.observe import Observer
from tokend.policy import (
    AccountPolicyState,
    RefreshLifetime,
    RefreshTiming,
    breaker_abandon_probe,
    breaker_admit,
    bucket_reserve,
    reauth_warning,
)
from tokend.publish import Publisher
from tokend.publish._base import ExpiringPublisher
from tokend.refresh import (
    Admission,
    Refresh,
    SeedWriteBack,
    adopt_record,
    hold_for_breaker,
    iso,
    planned_refresh_at,
    publish,
    put,
    unusable,
)
from tokend.revoke import (
    REVOKED_NOTE,
    RevokeError,
    revoke_refresh_token,
    revoke_token,
    revokes_on_remove,
)
from tokend.runtime import UNKNOWN_LIFETIME, Account, ProviderRuntime
from tokend.schedule import RefreshSchedule
from tokend.seed import new_seed_record, write_seed_file
from tokend.sources import Seed, SeedSources, continues_chain
from tokend.store import RecordWritten, SharedStore, Store, StoreChange, StoreError

__all__ = ["Account", "Engine", "ProviderRuntime"]

_log = get_logger()

# A wall-clock jump bigger than this (against the monotonic clock) re-plans every
# account's schedule, token expiry and breaker.
_CLOCK_JUMP_TOLERANCE = 2.0
_CLOCK_CHECK_INTERVAL = 5.0
# How often the store is asked whether it is still what it was at start (its file
# deleted or replaced, say).
_STORE_CHECK_INTERVAL = 1.0
_STORE_RECOVERY_MAX_INTERVAL = 30.0
# Concurrent workers reconciling stored records with the config at start.
_LOAD_WORKERS = 32
# Concurrent workers republishing restored tokens at start.
_RESTORE_WORKERS = 8
# Accounts due at start are spread over up to this many seconds.
_START_SPREAD_MAX = 5.0
# How long a crashed refresh waits before its account is tried again.
_CRASH_RETRY: Final = 30.0
# Exit status of a drain that could not commit a rotated refresh token.
EXIT_UNSAVED: Final = 3
# An account nearing its re-authorization deadline is logged at most this often (and
# once at every start); every account is looked at this often even when idle.
_REAUTH_LOG_INTERVAL: Final = 86400.0
_REAUTH_SWEEP_INTERVAL: Final = 3600.0
# Accounts looked at between two yields to the event loop during that sweep.
_REAUTH_SWEEP_STEP: Final = 512


class Engine:
    """Keeps every configured account's access token fresh."""

    def __init__(
        self,
        config: Config,
        store: Store,
        clients: Mapping[str, ProviderClient],
        *,
        publishers: Sequence[Publisher] = (),
        observers: Sequence[Observer] = (),
        client_errors: Mapping[str, str] | None = None,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        owner: str | None = None,
        write_back: SeedWriteBack | None = None,
        seeds: SeedSources | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self._publishers = list(publishers)
        self.observers = list(observers)
        self.clock = clock or SystemClock()
        self.rng = rng or random.Random()
        self.write_back = write_back
        # Where seeds come from (files, the vault); vault seeds are read ahead there.
        self.seeds = seeds or SeedSources(None)
        # Identifies this process in a shared store's per-account claims.
        self.owner = owner or f"tokend-{uuid.uuid4().hex[:12]}"
        self.accounts: dict[str, Account] = {}
        now = self.clock.time()
        self.providers: dict[str, ProviderRuntime] = {
            name: ProviderRuntime.build(
                name, pconf, clients.get(name), (client_errors or {}).get(name), now
            )
            for name, pconf in config.providers.items()
        }
        # Why the store is degraded (its file vanished, say), or None while it is sound.
        self.store_problem: str | None = None
        self._refresh = Refresh(self)
        self._slots = anyio.Semaphore(config.max_concurrency)
        self._stop = anyio.Event()
        self._stopping = False
        self._refreshes: TaskGroup | None = None
        self._pumps: TaskGroup | None = None
        self._pump_scopes: dict[str, anyio.CancelScope] = {}
        # Refreshes queued or running: ``run_once`` waits for it to reach zero.
        self._active = 0
        self._idle = anyio.Event()
        self.due = RefreshSchedule(self._on_due, self.clock)
        # When each published token expires: an expired token must not look valid.
        self.expiries = RefreshSchedule(self._on_expired, self.clock, job_id="tokend-expiry")
        self._expired_send, self._expired_recv = anyio.create_memory_object_stream[str](math.inf)
        self._loaded = False
        # When each account nearing its re-authorization deadline was last logged.
        self._reauth_logged: dict[str, float] = {}

    @property
    def publishers(self) -> Sequence[Publisher]:
        return self._publishers

    @publishers.setter
    def publishers(self, publishers: Sequence[Publisher]) -> None:
        self._publishers = list(publishers)

    # -- what one refresh asks of the engine (refresh.RefreshHost) ---------------------------

    def schedule(self, account: Account, at: float) -> None:
        account.next_attempt_at = at
        if account.name in self.accounts:
            self.due.set(account.name, at)
            # Whatever moved the schedule (a refresh, a failure, a new seed) may have
            # moved the re-authorization deadline too.
            self._note_reauth(account)

    def token_published(self, account: Account, token: TokenSet) -> None:
        self.expiries.set(account.name, token.expires_at)

    # -- start: load the store, reconcile seeds, serve what is still valid -------------

    async def load(self) -> None:
        """Load stored state and reconcile it with the configured seeds."""
        if self._loaded:
            return
        with paused_gc():
            stored = await self.store.load_all()
            now = self.clock.time()
            loaded: dict[str, Account] = {}
            pending = iter(self.config.accounts.items())

            async def reconcile_some() -> None:
                for name, aconf in pending:
                    loaded[name] = await self._reconcile(name, aconf, stored.get(name), now)

            # A first start (or new seeds) writes one record per account: several at
            # once let the store commit them together (100,000 new accounts: 43 s
            # one by one).
            async with anyio.create_task_group() as workers:
                for _ in range(_LOAD_WORKERS):
                    workers.start_soon(reconcile_some)
            self.accounts.update((name, loaded[name]) for name in self.config.accounts)
            if self.write_back is not None:
                for account in self.accounts.values():
                    self._note_write_back(account)
        self._loaded = True

    def _timing_for(self, aconf: AccountConfig) -> RefreshTiming:
        pconf = self.config.providers[aconf.provider]
        return _resolve_timing(self.config.refresh, pconf.refresh, aconf.refresh)

    def _lifetime_for(self, aconf: AccountConfig) -> RefreshLifetime:
        pconf = self.config.providers[aconf.provider]
        return _resolve_lifetime(
            pconf.refresh_token_max_idle, pconf.refresh_token_max_age, pconf.reauth_warning
        )

    def _new_account(self, name: str, aconf: AccountConfig, record: StoredAccount) -> Account:
        account = Account(name, aconf, self._timing_for(aconf), record)
        account.lifetime = self._lifetime_for(aconf)
        return account

    async def _reconcile(
        self, name: str, aconf: AccountConfig, stored: StoredAccount | None, now: float
    ) -> Account:
        try:
            seed = await self._read_seed(name, aconf)
        except (OSError, ValueError) as exc:
            record = stored or StoredAccount(account=name)
            account = self._new_account(name, aconf, record)
            account.last_error = f"cannot read the seed refresh token: {exc}"
            _log.error("seed_unreadable", account=name, error=account.last_error)
            self._adopt_stored_token(account, now)
            return account
        seed_fp = seed.fingerprint if seed is not None else None
        if stored is not None and (
            stored.seed_fingerprint == seed_fp
            or (seed is not None and continues_chain(seed, stored))
        ):
            # The store holds the chain rotated from this seed: the store wins.
            record = stored
            first_seen = stored.consented_at is None and stored.refresh_token is not None
            if first_seen:
                # A record from before lifetimes were tracked: its chain is taken as
                # begun now (first seen), and last used when its token was issued.
                token = stored.token
                record = record.evolve(
                    consented_at=now,
                    refresh_used_at=stored.refresh_used_at or (token.issued_at if token else None),
                )
            if seed_fp != stored.seed_fingerprint:
                # The same token at a new vault version (another field, or our own
                # write-back whose record update did not land): the chain goes on. In a
                # shared store the owner keeps it with its next write.
                record = record.evolve(seed_fingerprint=seed_fp)
                if self._owned_here(name):
                    record = await self._put_or_keep(record)
            elif first_seen and not isinstance(self.store, SharedStore):
                # Kept at once. In a shared store only the account's owner may write
                # it: there it goes with the record's next write (the next refresh).
                record = await self._put_or_keep(record)
            register_secret(record.refresh_token)
            if record.in_flight_since is not None:
                _log.warning(
                    "refresh_was_in_flight",
                    account=name,
                    since=iso(record.in_flight_since),
                    detail="tokend stopped while a refresh was in flight; the IdP may have "
                    "rotated the refresh token. Trying the stored one.",
                )
        else:
            # First start, or the operator supplied a new seed: the new seed wins.
            record = StoredAccount(
                account=name,
                seed_fingerprint=seed_fp,
                refresh_token=seed.value if seed is not None else None,
                updated_at=now,
                version=stored.version if stored is not None else 0,
                consented_at=now if seed is not None else None,
            )
            if stored is not None:
                _log.info(
                    "seed_changed",
                    account=name,
                    detail="a new seed token replaces the stored chain",
                )
            record = await self._put_or_keep(record)
        account = self._new_account(name, aconf, record)
        if record.last_outcome == FailureKind.ACCOUNT_PERMANENT.value:
            # The IdP declared this chain dead before the restart: sending it again
            # would only meet invalid_grant (or, with rotation, count as token reuse).
            # A new seed revives it. A still-valid access token is served until it expires.
            self._adopt_stored_token(account, now)
            account.state = AccountState.NEEDS_REAUTH
            account.last_error = record.last_error
            return account
        if aconf.grant == "refresh_token" and record.refresh_token is None:
            # Nothing to refresh with until someone signs in (or a seed is configured).
            self._adopt_stored_token(account, now)
            account.state = AccountState.NEEDS_REAUTH
            account.last_error = record.last_error or (
                f"no refresh token yet: run `tokend login {name}` (or configure a seed)"
            )
            return account
        if record.in_flight_since is not None:
            # The last run may have lost a rotated token: the policy treats the next
            # invalid_grant as the consequence of that, and may use the reuse grace.
            account.policy = AccountPolicyState(lost_response_at=record.in_flight_since)
        self._adopt_stored_token(account, now)
        return account

    def _adopt_stored_token(self, account: Account, now: float) -> None:
        token = account.record.token
        if token is not None and token.is_valid(now):
            register_secret(token.access_token)
            account.published = token
            account.state = AccountState.VALID
            account.last_refresh_at = token.issued_at

    async def _read_seed(self, name: str, aconf: AccountConfig) -> Seed | None:
        return await self.seeds.read(name, aconf)

    async def _put_or_keep(self, record: StoredAccount) -> StoredAccount:
        try:
            return await put(self, record)
        except StoreError as exc:
            # The seed is in the config; nothing is lost if this write waits.
            _log.error("store_write_failed", account=record.account, error=str(exc))
            return record

    # -- running ----------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> int:
        """Serve until :meth:`stop`; then drain in-flight refreshes (bounded) and return
        the process's exit status: 0, or :data:`EXIT_UNSAVED` if a rotated refresh
        token could not be committed."""
        await self.load()
        self._schedule_start()
        loop = asyncio.get_running_loop()
        self.due.start(loop)
        self.expiries.start(loop)
        try:
            async with anyio.create_task_group() as outer:
                outer.start_soon(self._watch_clock)
                outer.start_soon(self._expire_loop)
                outer.start_soon(self._watch_store)
                outer.start_soon(self._watch_reauth)
                async with self._serving():
                    task_status.started()
                    await self._stop.wait()
                outer.cancel_scope.cancel()
        finally:
            self.due.shutdown()
            self.expiries.shutdown()
        return self._report_unsaved()

    def stop(self) -> None:
        self._stop.set()

    @asynccontextmanager
    async def _serving(self) -> AsyncIterator[None]:
        """Run the provider pumps and the refreshes they start. On exit: no new refresh
        starts; those in flight finish and commit, bounded by ``serve.drain_timeout``."""
        async with anyio.create_task_group() as refreshes:
            self._refreshes = refreshes
            async with anyio.create_task_group() as pumps:
                self._pumps = pumps
                for provider in self.providers.values():
                    self._start_pump(provider)
                refreshes.start_soon(self._publish_restored)
                try:
                    yield
                finally:
                    # Stop scheduling: the accounts still queued stay queued (and due at
                    # the next start); nothing new is sent.
                    self._stopping = True
                    self.due.shutdown()
                    pumps.cancel_scope.cancel()
            self._pumps = None
            refreshes.cancel_scope.deadline = anyio.current_time() + self.config.serve.drain_timeout
        self._refreshes = None
        # A rotated token whose commit failed during the drain gets one more try.
        with anyio.move_on_after(self.config.serve.drain_timeout):
            for account in [a for a in self.accounts.values() if a.unsaved is not None]:
                async with account.lock:
                    await self._refresh.commit_unsaved(account)

    def _report_unsaved(self) -> int:
        unsaved = sorted(a.name for a in self.accounts.values() if a.unsaved is not None)
        if not unsaved:
            return 0
        _log.critical(
            "rotated_tokens_not_saved",
            accounts=unsaved,
            detail="these accounts' rotated refresh tokens could not be committed before "
            "shutdown; they will need re-authorization unless the IdP still accepts the "
            "previous token",
        )
        return EXIT_UNSAVED

    async def run_once(self) -> bool:
        """Refresh what needs it, publish, and report whether every account holds a
        valid token (for init containers and cron)."""
        await self.load()
        now = self.clock.time()
        async with self._serving():
            for account in self.accounts.values():
                if account.state is AccountState.NEEDS_REAUTH:
                    continue
                if not account.token_valid(now) or now >= self._next_refresh_time(account):
                    self.wake(account.name, forced=True)
            if self._active:
                self._idle = anyio.Event()
                await self._idle.wait()
            # A rotated token that could not be saved is retried, bounded, before exit.
            with anyio.move_on_after(self.config.serve.drain_timeout):
                while unsaved := [a for a in self.accounts.values() if a.unsaved is not None]:
                    await anyio.sleep(0.5)
                    for account in unsaved:
                        async with self._holding(account):
                            await self._refresh.commit_unsaved(account)
        now = self.clock.time()
        return all(a.token_valid(now) for a in self.accounts.values())

    async def _publish_restored(self) -> None:
        """Hand restored tokens to the publishers (their files may be missing or stale),
        a few accounts at a time: the socket serves them from memory at once, and a
        start with 100,000 accounts must not create 100,000 tasks."""
        # A publisher that only tells of changes (the socket's feed) has nothing to
        # do with a restored token; 100,000 of them would only cost a pass.
        if not any(getattr(p, "republishes", True) for p in self.publishers):
            return
        pending = iter([name for name, a in self.accounts.items() if a.published is not None])

        async def worker() -> None:
            for name in pending:
                account = self.accounts.get(name)
                if account is None:
                    continue
                # Under the lock: a refresh that got there first has published a newer
                # token, which must not be overwritten by the restored one.
                async with self._holding(account):
                    if account.published is not None:
                        await publish(self, account, account.published)

        async with anyio.create_task_group() as workers:
            for _ in range(_RESTORE_WORKERS):
                workers.start_soon(worker)

    # -- waking accounts, provider queues ----------------------------------------------------

    def _on_due(self, names: list[str]) -> None:
        for name in names:
            self.wake(name)

    def wake(self, name: str, *, forced: bool = False) -> None:
        """``name`` is due (or asked for): queue it at its provider. If the account is
        busy (refreshing, or its files being written), it is looked at again as soon as
        it is free: a wake-up is coalesced, never dropped."""
        account = self.accounts.get(name)
        if account is None:
            return
        if forced:
            account.forced = True
        if self._stopping:
            return
        if account.busy:
            if not account.recheck:
                account.recheck = True
                self._activity(+1)
            return
        provider = self.providers.get(account.provider)
        if provider is None:
            return
        if name in provider.queue and not forced:
            return
        if account.queued_from is None:
            account.queued_from = account.state
            account.state = AccountState.QUEUED
            self._activity(+1)
        provider.queue.push(account)

    def _leave_queue(self, account: Account) -> None:
        if account.queued_from is not None:
            if account.state is AccountState.QUEUED:
                account.state = account.queued_from
            account.queued_from = None
            self._activity(-1)

    def _activity(self, delta: int) -> None:
        self._active += delta
        if self._active == 0:
            self._idle.set()

    @asynccontextmanager
    async def _holding(self, account: Account) -> AsyncIterator[None]:
        """Hold ``account``'s lock; a wake-up that came meanwhile runs once it is free."""
        async with account.lock:
            yield
        account.drop_idle_lock()
        if account.recheck:
            account.recheck = False
            self.wake(account.name)
            self._activity(-1)

    def _start_pump(self, provider: ProviderRuntime) -> None:
        pumps = self._pumps
        if pumps is None:
            return
        old = self._pump_scopes.pop(provider.name, None)
        if old is not None:
            old.cancel()
        scope = anyio.CancelScope()
        self._pump_scopes[provider.name] = scope
        pumps.start_soon(self._pump, provider, scope)

    async def _pump(self, provider: ProviderRuntime, scope: anyio.CancelScope) -> None:
        """Start the refreshes of ``provider``'s queued accounts, most urgent first, as
        its concurrency, rate limit and breaker allow. One provider's backlog waits
        here and takes nothing another provider needs."""
        with scope:
            queue = provider.queue
            while True:
                await queue.wait_nonempty()
                # While the breaker is shut, nobody queues for the rate limit.
                admission, _ = breaker_admit(
                    provider.breaker, self.clock.time(), provider.breaker_policy
                )
                if not admission.allowed:
                    self._hold_queue(provider, admission.retry_at)
                    continue
                await provider.slots.acquire()
                release = _Release(provider.slots)
                try:
                    start_at, provider.bucket = bucket_reserve(
                        provider.bucket, provider.rate_limit, self.clock.time()
                    )
                    await anyio.sleep(max(0.0, start_at - self.clock.time()))
                    admission, provider.breaker = breaker_admit(
                        provider.breaker, self.clock.time(), provider.breaker_policy
                    )
                    if not admission.allowed:
                        release()
                        self._hold_queue(provider, admission.retry_at)
                        continue
                    # Popped only now: an account that came due during the wait and
                    # expires sooner goes ahead of those that were already waiting.
                    account = self._pop(provider)
                    if account is None:
                        release()
                        if admission.probe:
                            provider.breaker = breaker_abandon_probe(
                                provider.breaker, self.clock.time()
                            )
                        continue
                    await self._slots.acquire()
                    release.also(self._slots)
                except BaseException:
                    release()
                    raise
                refreshes = self._refreshes
                assert refreshes is not None
                refreshes.start_soon(
                    self._run_refresh, account, provider, Admission(admission.probe, release)
                )

    def _pop(self, provider: ProviderRuntime) -> Account | None:
        while (name := provider.queue.pop()) is not None:
            account = self.accounts.get(name)
            if account is not None and account.provider == provider.name:
                return account
        return None

    def _hold_queue(self, provider: ProviderRuntime, retry_at: float | None) -> None:
        for name in provider.queue.names():
            provider.queue.discard(name)
            account = self.accounts.get(name)
            if account is None:
                continue
            self._leave_queue(account)
            account.forced = False
            hold_for_breaker(self, account, provider, retry_at)
            account.mark_settled()

    async def _run_refresh(
        self, account: Account, provider: ProviderRuntime, admission: Admission
    ) -> None:
        try:
            async with self._holding(account):
                self._leave_queue(account)
                forced, account.forced = account.forced, False
                await self._refresh.run(account, provider, admission, forced=forced)
        except Exception:
            # One account's bug must not take the others down.
            _log.exception("refresh_crashed", account=account.name)
            self.schedule(account, self.clock.time() + _CRASH_RETRY)
        finally:
            self._leave_queue(account)
            admission.done_with_provider()
            account.mark_settled()

    # -- scheduling ---------------------------------------------------------------------

    def _next_refresh_time(self, account: Account) -> float:
        token = account.published
        if token is None:
            return self.clock.time()
        return planned_refresh_at(account, token, self.rng.uniform(-1, 1))

    # -- re-authorization deadlines ------------------------------------------------------

    def _note_reauth(self, account: Account) -> None:
        """Log ``reauth_due_soon`` for an account whose chain dies within its provider's
        warning lead: once at start, then at most once a day."""
        name = account.name
        deadline = account.reauth_deadline
        if deadline is None:
            # Most accounts: nothing known, nothing to read the clock for.
            if self._reauth_logged:
                self._reauth_logged.pop(name, None)
            return
        now = self.clock.time()
        if not reauth_warning(account.lifetime, deadline, now):
            self._reauth_logged.pop(name, None)
            return
        logged = self._reauth_logged.get(name)
        if logged is not None and 0 <= now - logged < _REAUTH_LOG_INTERVAL:
            return
        self._reauth_logged[name] = now
        _log.warning(
            "reauth_due_soon",
            account=name,
            provider=account.provider,
            state=account.state.value,
            reauth_deadline=iso(deadline),
            days_left=round((deadline - now) / 86400, 2),
            detail=f"this account's refresh token stops working by then however often it "
            f"is refreshed: run `tokend login {name}` before it does",
        )

    async def _watch_reauth(self) -> None:
        """Look at every account now and then: an idle one's deadline comes closer
        without anything happening to it."""
        while True:
            await anyio.sleep(_REAUTH_SWEEP_INTERVAL)
            names = list(self.accounts)
            for start in range(0, len(names), _REAUTH_SWEEP_STEP):
                for name in names[start : start + _REAUTH_SWEEP_STEP]:
                    account = self.accounts.get(name)
                    if account is not None:
                        self._note_reauth(account)
                await anyio.lowlevel.checkpoint()

    def _schedule_start(self) -> None:
        now = self.clock.time()
        due = []
        for account in self.accounts.values():
            if account.state is AccountState.NEEDS_REAUTH or self._unusable(account):
                continue
            if account.record.in_flight_since is not None:
                # The last run stopped mid-refresh: retry at once, ahead of everything,
                # so the retry lands inside the IdP's reuse grace.
                self.schedule(account, now)
                continue
            at = self._next_refresh_time(account)
            if at <= now:
                due.append(account)
            else:
                self.schedule(account, at)
        spread = min(_START_SPREAD_MAX, 0.002 * len(due))
        for account in due:
            self.schedule(account, now + self.rng.uniform(0, spread))

    def _unusable(self, account: Account) -> bool:
        return unusable(account, self.providers[account.provider])

    # -- watching the clock and the store ------------------------------------------------------

    async def _watch_clock(self) -> None:
        wall0, mono0 = self.clock.time(), self.clock.monotonic()
        while True:
            await anyio.sleep(_CLOCK_CHECK_INTERVAL)
            wall, mono = self.clock.time(), self.clock.monotonic()
            drift = (wall - wall0) - (mono - mono0)
            if abs(drift) > _CLOCK_JUMP_TOLERANCE:
                _log.warning("wall_clock_jumped", seconds=round(drift, 3))
                await self.clock_jumped(drift)
            wall0, mono0 = wall, mono

    async def clock_jumped(self, delta: float) -> None:
        """The wall clock stepped by ``delta`` seconds while real time did not (an NTP
        step, an operator's ``date -s``). Every wait keeps its real length: a token
        lives as long as the IdP said (its expiry moves with the step), and each due
        refresh, retry and breaker cooldown moves by the step too. (A suspend moves the
        wall clock and the boot-time clock alike: nothing jumps, due times have simply
        arrived, and expired tokens are withdrawn.)"""
        self.due.shift(delta)
        self.expiries.shift(delta)
        for account in self.accounts.values():
            account.next_attempt_at = self.due.due_at(account.name)
            token = account.published
            if token is not None:
                account.published = token.shifted(delta)
            if account.record.token is not None:
                account.record = account.record.evolve(token=account.record.token.shifted(delta))
        for provider in self.providers.values():
            provider.breaker = provider.breaker.shifted(delta)
            provider.bucket = provider.bucket.shifted(delta)
        for account in self.accounts.values():
            if account.published is not None:
                for publisher in self.publishers:
                    await publisher.publish(account.name, account.published)

    async def _watch_store(self) -> None:
        """Notice a state file deleted or replaced under the running process: write every
        record held here into a fresh one, and show the store as degraded until then."""
        interval = _STORE_CHECK_INTERVAL
        while True:
            await anyio.sleep(interval)
            try:
                problem = await self.store.verify()
            except StoreError as exc:
                problem = str(exc)
            if isinstance(self.store, SharedStore):
                # The cluster keeps the records: there is nothing to rewrite, only a
                # problem to show until the store reports it gone.
                if problem != self.store_problem:
                    log = _log.error if problem else _log.warning
                    log("store_degraded" if problem else "store_recovered", error=problem)
                self.store_problem = problem
                continue
            if problem is None:
                interval = _STORE_CHECK_INTERVAL
                continue
            if self.store_problem is None:
                _log.error(
                    "store_degraded",
                    error=problem,
                    detail="writing every account's record into a new state file",
                )
            self.store_problem = problem
            if await self._rebuild_store():
                _log.warning("store_recovered", accounts=len(self.accounts))
                self.store_problem = None
                interval = _STORE_CHECK_INTERVAL
            else:
                interval = min(_STORE_RECOVERY_MAX_INTERVAL, interval * 2)

    async def _rebuild_store(self) -> bool:
        try:
            await self.store.recreate()
            stored = await self.store.load_all()
        except StoreError as exc:
            self.store_problem = str(exc)
            return False
        for account in list(self.accounts.values()):
            async with self._holding(account):
                current = stored.get(account.name)
                record = account.unsaved or account.record
                try:
                    account.record = await put(
                        self, record.evolve(version=current.version if current else 0)
                    )
                except StoreError as exc:
                    self.store_problem = str(exc)
                    return False
                account.unsaved = None
        return True

    # -- expiry ------------------------------------------------------------------------

    def _on_expired(self, names: list[str]) -> None:
        for name in names:
            self._expired_send.send_nowait(name)

    async def _expire_loop(self) -> None:
        async for name in self._expired_recv:
            account = self.accounts.get(name)
            if account is None or account.published is None:
                continue
            async with self._holding(account):
                now = self.clock.time()
                if account.published.is_valid(now):
                    continue  # replaced meanwhile
                _log.warning(
                    "token_expired",
                    account=name,
                    provider=account.provider,
                    state=account.state.value,
                    error=account.last_error,
                    detail="no valid token for this account until a refresh succeeds",
                )
                for publisher in self.publishers:
                    if isinstance(publisher, ExpiringPublisher):
                        await publisher.expire(name, now)

    # -- records written elsewhere (replicas) ----------------------------------------------

    async def follow(self, changes: AsyncIterator[StoreChange]) -> None:
        """Follow a shared store's ``changes()``: publish what the owning replicas
        write, and take up the accounts this replica becomes the owner of."""
        async for change in changes:
            if isinstance(change, RecordWritten):
                await self.adopt(change.record)
            else:
                self.took_over(change.accounts)

    def took_over(self, names: Iterable[str]) -> None:
        """This replica now owns ``names``: schedule each from its record. One found in
        flight (its owner died mid-refresh) goes at once, ahead of everything, as a
        restart would: the retry lands inside the IdP's reuse grace."""
        now = self.clock.time()
        for name in names:
            account = self.accounts.get(name)
            if account is None:
                continue
            # A write-back the previous owner still owed is this replica's now (the
            # record says so: its token differs from the one its seed names).
            self._note_write_back(account)
            if account.busy:
                continue
            if account.state is AccountState.NEEDS_REAUTH or self._unusable(account):
                continue
            record = account.record
            if record.in_flight_since is not None:
                if account.policy.lost_response_at is None:
                    account.policy = AccountPolicyState(lost_response_at=record.in_flight_since)
                self.schedule(account, now)
            elif not account.token_valid(now):
                self.schedule(account, now)
            else:
                self.schedule(account, max(now, self._next_refresh_time(account)))

    async def adopt(self, record: StoredAccount) -> None:
        """Take ``record``, written by another replica, if it is newer than ours."""
        account = self.accounts.get(record.account)
        if account is None or record.version <= account.record.version:
            return
        async with self._holding(account):
            if record.version > account.record.version:
                await adopt_record(self, account, record, followed=True)

    async def _revoke_removed(self, account: Account, previous: Config) -> None:
        """Revoke the refresh token of an account just removed from the config (its
        ``revoke_on_remove``), and keep a record saying so: re-added with the same
        seed, it waits for a new sign-in instead of presenting a revoked chain."""
        token = account.record.refresh_token
        if token is None:
            return
        pconf = previous.providers[account.provider]
        try:
            await revoke_refresh_token(account.provider, pconf, token)
            record = account.record.evolve(
                refresh_token=None,
                token=None,
                in_flight_since=None,
                last_outcome=FailureKind.ACCOUNT_PERMANENT.value,
                last_error="refresh token revoked when the account was removed from the config",
                updated_at=self.clock.time(),
            )
            await put(self, record)
        except (RevokeError, StoreError) as exc:
            _log.error("revoke_failed", account=account.name, error=str(exc))
            return
        _log.info("account_revoked", account=account.name, provider=account.provider)

    async def revoke(self, name: str) -> str:
        """``tokend revoke`` while the daemon runs: revoke the account's refresh token at
        the IdP (RFC 7009), then its access token, under the account's lock so no refresh
        presents the token meanwhile; the record then holds neither (``needs_reauth``)
        and nothing valid-looking is left published. Returns what happened, for the user.
        Raises KeyError for an unknown account, RevokeError when the IdP did not revoke
        (nothing changed), StoreError when it did but the record could not be updated."""
        account = self.accounts[name]
        provider = self.providers[account.provider]
        store = self.store
        if isinstance(store, SharedStore) and store.owned_elsewhere(name):
            # Only the owner may write the record: revoked here, the owner would go on
            # presenting the dead token.
            raise RevokeError(
                "another replica owns this account: run tokend revoke against its socket"
            )
        async with self._holding(account):
            if account.unsaved is not None:
                # The unsaved record holds the live token: saved first, it is revoked.
                await self._refresh.commit_unsaved(account)
                if account.unsaved is not None:
                    raise RevokeError(
                        "a rotated refresh token is still waiting to be saved; try again "
                        "once the store answers"
                    )
            client = provider.client
            if client is None:
                raise RevokeError(provider.setup_error or "the provider is not set up")
            refresh_token = account.record.refresh_token
            access = account.published
            now = self.clock.time()
            valid_access = access is not None and access.is_valid(now)
            if refresh_token is None and not valid_access:
                return "tokend holds no token for this account; nothing to revoke"
            if refresh_token is not None:
                await revoke_token(client, refresh_token, "refresh_token")
            access_note = ""
            if access is not None and valid_access:
                try:
                    await revoke_token(client, access.access_token, "access_token")
                except RevokeError as exc:
                    # The grant is gone; the access token dies with its expiry.
                    access_note = f" (the access token was not revoked: {exc})"
            account.record = await put(
                self,
                account.record.evolve(
                    refresh_token=None,
                    token=None,
                    in_flight_since=None,
                    last_outcome=FailureKind.ACCOUNT_PERMANENT.value,
                    last_error=REVOKED_NOTE,
                    updated_at=now,
                ),
            )
            account.state = AccountState.NEEDS_REAUTH
            account.last_error = REVOKED_NOTE
            account.next_attempt_at = None
            self._unschedule(name)
            if access is not None:
                # No reader may be handed the revoked token: the socket stops serving it
                # and the files show the expired version at once.
                account.published = None
                self.expiries.remove(name)
                for publisher in self.publishers:
                    if isinstance(publisher, ExpiringPublisher):
                        await publisher.expire(name, max(now, access.expires_at))
            _log.warning(
                "account_revoked", account=name, provider=account.provider, source="revoke"
            )
        return "revoked at the provider; the account needs a new sign-in (tokend login)" + (
            access_note
        )

    async def replace_seed(self, name: str, seed: str) -> Account:
        """A new seed from a sign-in (``tokend login``): written to the account's seed
        file when it has one (first, so a crash in between leaves the file's token to
        win at the next start), then committed as the start of a new chain; needs_reauth
        clears. The caller refreshes it. Raises KeyError for an unknown account,
        SeedFileError or StoreError when it could not be kept (the store is unchanged)."""
        account = self.accounts[name]
        register_secret(seed)
        async with self._holding(account):
            if account.config.refresh_token_file is not None:
                await anyio.to_thread.run_sync(
                    write_seed_file, account.config.refresh_token_file, seed
                )
            now = self.clock.time()
            record = new_seed_record(name, account.config, account.record, seed, now)
            account.record = await put(self, record)
            account.unsaved = None
            account.policy = AccountPolicyState()
            account.last_error = None
            if account.state is not AccountState.QUEUED:
                valid = account.token_valid(now)
                account.state = AccountState.VALID if valid else AccountState.PENDING
            _log.info("seed_replaced", account=name, source="login")
        return account

    # -- reload -----------------------------------------------------------------------------

    async def reload(
        self,
        config: Config,
        clients: Mapping[str, ProviderClient],
        client_errors: Mapping[str, str],
        changed_providers: set[str],
        publishers: Sequence[Publisher] | None = None,
    ) -> list[ProviderClient]:
        """Apply a new config: removed accounts stop (their files go), added ones start,
        a changed seed replaces the stored chain (and clears ``needs_reauth``); the
        tokens of unchanged accounts are untouched. ``changed_providers`` got new
        ``clients`` (their config or credential files changed): their breakers reset.
        ``publishers`` (when given) replace the current ones first, so an added
        account's files and notifications start with it.
        Returns the replaced clients, for the caller to close once idle."""
        now = self.clock.time()
        previous = self.config
        if publishers is not None:
            self.publishers = publishers
        requeue: list[str] = []
        retired: list[ProviderClient] = []
        for name, pconf in config.providers.items():
            old = self.providers.get(name)
            if old is not None and name not in changed_providers:
                old.config = pconf
                continue
            if old is not None:
                requeue += old.queue.names()
                if old.client is not None:
                    retired.append(old.client)
            runtime = self.providers[name] = ProviderRuntime.build(
                name, pconf, clients.get(name), client_errors.get(name), now
            )
            self._start_pump(runtime)
            _log.info("provider_updated", provider=name)
        for name in set(self.providers) - set(config.providers):
            gone = self.providers.pop(name)
            scope = self._pump_scopes.pop(name, None)
            if scope is not None:
                scope.cancel()
            if gone.client is not None:
                retired.append(gone.client)
        self.config = config
        for name in requeue:
            account = self.accounts.get(name)
            if account is not None:
                self._leave_queue(account)
                self.wake(name)

        for name in set(self.accounts) - set(config.accounts):
            removed = self.accounts[name]
            async with removed.lock:
                self._leave_queue(removed)
                del self.accounts[name]
                self._reauth_logged.pop(name, None)
                self._unschedule(name)
                self.expiries.remove(name)
                for publisher in self.publishers:
                    await publisher.withdraw(name)
            _log.info("account_removed", account=name)
            if revokes_on_remove(removed.config, previous.providers.get(removed.provider)):
                await self._revoke_removed(removed, previous)
        for name, aconf in config.accounts.items():
            account = self.accounts.get(name)
            if account is None:
                account = await self._reconcile(name, aconf, await self.store.load(name), now)
                self.accounts[name] = account
                _log.info("account_added", account=name)
                if account.published is not None:
                    await publish(self, account, account.published)
                self._schedule_after_reload(account, now)
                continue
            async with self._holding(account):
                await self._reload_account(account, aconf, aconf.provider in changed_providers)
        return retired

    async def _reload_account(
        self, account: Account, aconf: AccountConfig, provider_changed: bool
    ) -> None:
        now = self.clock.time()
        try:
            seed = await self._read_seed(account.name, aconf)
        except (OSError, ValueError) as exc:
            _log.error("seed_unreadable", account=account.name, error=str(exc))
            account.last_error = f"cannot read the seed refresh token: {exc}"
            return
        account.config = aconf
        account.timing = self._timing_for(aconf)
        account.lifetime = self._lifetime_for(aconf)
        seed_fp = seed.fingerprint if seed is not None else None
        if (
            seed is not None
            and seed_fp != account.record.seed_fingerprint
            and (continues_chain(seed, account.record))
        ):
            # Not a new seed: the same token at a new version of its vault secret.
            await self._keep_chain(account, seed_fp)
        elif seed_fp != account.record.seed_fingerprint:
            # A new seed replaces the stored chain and clears needs_reauth; the old
            # chain's access token stays served while it is valid.
            fresh = await self._reconcile(
                account.name, aconf, await self.store.load(account.name), now
            )
            account.record = fresh.record
            account.policy = AccountPolicyState()
            account.unsaved = None
            account.last_error = fresh.last_error
            account.state = AccountState.VALID if account.token_valid(now) else AccountState.PENDING
            _log.info("seed_replaced", account=account.name)
            self.schedule(account, now)
            return
        if provider_changed or (
            account.next_attempt_at is None and account.state is AccountState.BLOCKED
        ):
            self._schedule_after_reload(account, now)

    async def _keep_chain(self, account: Account, seed_fp: str | None) -> None:
        if not self._owned_here(account.name):
            # Only the owner writes the record: it stores the new version with its next
            # write (a follower's would be refused, once per write-back).
            account.record = account.record.evolve(seed_fingerprint=seed_fp)
            return
        try:
            account.record = await put(self, account.record.evolve(seed_fingerprint=seed_fp))
        except StoreError as exc:
            # Harmless if it waits: the next look at the seed finds the same token again.
            _log.warning("store_write_failed", account=account.name, error=str(exc))

    async def reseed(self, names: Iterable[str]) -> None:
        """The seeds of ``names`` may have changed (a watched file, a vault secret): what
        a reload does for a changed seed, for those accounts only. A new seed revives an
        account in ``needs_reauth``."""
        for name in sorted(names):
            account = self.accounts.get(name)
            if account is None:
                continue
            async with self._holding(account):
                await self._reload_account(account, account.config, False)
            self._note_write_back(account)

    def _note_write_back(self, account: Account) -> None:
        sink = self.write_back
        if sink is None or not sink.applies_to(account.name):
            return
        if self._owned_here(account.name):
            sink.note(account.name, account.record)
        else:
            # The owner writes back the tokens it rotates; a follower retrying them
            # would only race it at the vault. A takeover notes the account again.
            sink.forget(account.name)
        account.writeback_pending = account.name in sink.pending

    def _owned_here(self, name: str) -> bool:
        """Whether this process may write ``name``'s record (always, unless replicas
        share the store and another one, or none yet, owns it)."""
        store = self.store
        return not isinstance(store, SharedStore) or store.owns(name)

    def writeback_pending(self) -> list[str]:
        """Accounts whose rotated refresh token is not in the vault yet."""
        return sorted(self.write_back.pending) if self.write_back is not None else []

    async def write_back_account(self, name: str) -> None:
        """Retry the write-back of ``name``'s rotated refresh token (under its lock, so
        never beside a refresh of the same account)."""
        account = self.accounts.get(name)
        if account is None:
            return
        async with self._holding(account):
            if self._owned_here(name):
                await self._refresh.write_back(account)
            else:
                self._note_write_back(account)

    def _schedule_after_reload(self, account: Account, now: float) -> None:
        if account.state is AccountState.NEEDS_REAUTH or self._unusable(account):
            return
        at = self._next_refresh_time(account)
        self.schedule(account, max(now, at) if account.token_valid(now) else now)

    def _unschedule(self, name: str) -> None:
        self.due.remove(name)

    # -- requests from applications ---------------------------------------------------------

    def not_ready(self) -> list[str]:
        """Required accounts that hold no valid token now (empty: tokend is ready, as far
        as accounts go: ``store_problem`` says whether the store is sound)."""
        now = self.clock.time()
        return sorted(
            name
            for name, account in self.accounts.items()
            if account.config.required and not account.token_valid(now)
        )

    async def wait_fresh(self, name: str, min_valid: float, max_wait: float) -> Account:
        """Wait (bounded) until ``name`` holds a token valid ``min_valid`` more seconds,
        triggering the account's single-flight refresh if it does not.

        One refresh at most per call: if the IdP issues tokens shorter than
        ``min_valid``, asking again would only hammer it.
        """
        account = self.accounts[name]
        if account.token_valid(self.clock.time(), min_valid):
            return account
        if account.state is not AccountState.NEEDS_REAUTH:
            await self.force_refresh(name, max_wait)
        return account

    async def force_refresh(self, name: str, max_wait: float) -> Account:
        """Refresh ``name`` now (an application got a 401 before expiry) and wait,
        bounded. A refresh that completes after this call began satisfies it, so many
        callers at once cause one refresh."""
        account = self.accounts[name]
        requested_at = self.clock.time()
        if account.force_requested_at is None or account.force_requested_at < requested_at:
            account.force_requested_at = requested_at
        settled = account.settled
        self.wake(name, forced=True)
        with anyio.move_on_after(max_wait):
            await settled.wait()
        return account


class _Release:
    """Gives back the slots a refresh holds, once, however often it is called."""

    def __init__(self, *semaphores: anyio.Semaphore) -> None:
        self._held = list(semaphores)

    def also(self, semaphore: anyio.Semaphore) -> None:
        self._held.append(semaphore)

    def __call__(self) -> None:
        held, self._held = self._held, []
        for semaphore in held:
            semaphore.release()


@functools.lru_cache(maxsize=1024)
def _resolve_timing(*layers: RefreshPolicyConfig) -> RefreshTiming:
    # Most accounts share their layers: resolve each distinct combination once.
    return RefreshTiming.resolve(*layers)


@functools.lru_cache(maxsize=1024)
def _resolve_lifetime(
    max_idle: float | None, max_age: float | None, warning: float
) -> RefreshLifetime:
    # One object per provider setting, shared by its accounts; with nothing known, the
    # one every account starts with (which its checks recognize at once).
    lifetime = RefreshLifetime(max_idle=max_idle, max_age=max_age, warning=warning)
    return UNKNOWN_LIFETIME if lifetime == UNKNOWN_LIFETIME else lifetime
