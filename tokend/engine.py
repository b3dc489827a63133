"""The refresh engine: each account's state machine, scheduling and single flight.

One refresh, end to end (the order in the success branch is tokend's core promise)::

    timer fires -> single flight (the account's lock; the store's claim across replicas)
      -> policy: breaker open? rate limit? -> wait
      -> store: mark the refresh in flight (durable, before the token leaves)
      -> IdP: token request -> classified outcome
      -> success: store.put(new refresh + access token)  [durable]
                  then publish: in-memory view, files, notifications
      -> failure: policy -> state and next attempt
      -> one log event; schedule the next refresh

APScheduler decides *when*; the refresh itself runs in this engine's task group
behind a concurrency cap. Nothing is fire-and-forget.
"""

from __future__ import annotations

import asyncio
import functools
import math
import random
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

import anyio
from anyio.abc import TaskGroup, TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from tokend._gc import paused_gc
from tokend.clock import Clock, SystemClock
from tokend.config import (
    AccountConfig,
    Config,
    ProviderConfig,
    RefreshPolicyConfig,
    read_secret_file,
)
from tokend.logs import forget_secret, get_logger, register_secret
from tokend.model import AccountState, StoredAccount, TokenSet, fingerprint
from tokend.oauth import FailureKind, Outcome, ProviderClient, TokenFailure, TokenResponse
from tokend.observe import Observer
from tokend.policy import (
    AccountPolicyState,
    BackoffPolicy,
    BreakerPolicy,
    BreakerState,
    BreakerStatus,
    BucketState,
    RateLimit,
    RefreshTiming,
    account_after_failure,
    account_after_success,
    breaker_abandon_probe,
    breaker_admit,
    breaker_record,
    breaker_reset,
    bucket_full,
    bucket_reserve,
    is_lost_response,
    refresh_at,
    retry_delay,
)
from tokend.publish import Publisher
from tokend.publish._base import ExpiringPublisher
from tokend.schedule import RefreshSchedule
from tokend.store import Store, StoreConflict, StoreError

_log = get_logger()

# A wall-clock jump bigger than this (against the monotonic clock) triggers a
# recomputation of every account's schedule.
_CLOCK_JUMP_TOLERANCE = 2.0
_CLOCK_CHECK_INTERVAL = 5.0
# Concurrent workers reconciling stored records with the config at start.
_LOAD_WORKERS = 32
# Concurrent workers republishing restored tokens at start.
_RESTORE_WORKERS = 8
# Accounts due at start are spread over up to this many seconds.
_START_SPREAD_MAX = 5.0


@dataclass(eq=False)
class Account:
    """One account at run time. ``published`` is what publishers hand out; it only
    ever changes after the token behind it is durably committed."""

    name: str
    config: AccountConfig
    timing: RefreshTiming
    record: StoredAccount
    state: AccountState = AccountState.PENDING
    published: TokenSet | None = None
    # A committed-in-memory-only record: its rotated refresh token awaits a durable write.
    unsaved: StoredAccount | None = None
    last_error: str | None = None
    last_refresh_at: float | None = None
    next_attempt_at: float | None = None
    policy: AccountPolicyState = field(default_factory=AccountPolicyState)
    # Failed commits in a row of an unsaved token (the commit retry's backoff attempt).
    commit_failures: int = 0
    # The access token this account replaced last: still redacted from logs until
    # the next refresh (it may not have expired yet).
    retired_access_token: str | None = field(default=None, repr=False)
    # When an application last asked for a refresh ahead of schedule.
    force_requested_at: float | None = None
    # Created on first use: 100,000 accounts need not pay for 200,000 sync primitives
    # at start (each costs an async-library lookup).
    _lock: anyio.Lock | None = field(default=None, repr=False)
    _settled: anyio.Event | None = field(default=None, repr=False)

    @property
    def lock(self) -> anyio.Lock:
        """Held while the account refreshes: at most one refresh in flight, ever."""
        if self._lock is None:
            self._lock = anyio.Lock()
        return self._lock

    @property
    def settled(self) -> anyio.Event:
        """Set (then replaced) whenever a refresh attempt ends: waiters watch it."""
        if self._settled is None:
            self._settled = anyio.Event()
        return self._settled

    def mark_settled(self) -> None:
        if self._settled is not None:
            self._settled.set()
            self._settled = None

    @property
    def provider(self) -> str:
        return self.config.provider

    def token_valid(self, now: float, min_valid: float = 0.0) -> bool:
        return self.published is not None and self.published.is_valid(now, min_valid)


@dataclass
class ProviderRuntime:
    """One provider at run time: its client, its limits and its circuit breaker."""

    name: str
    config: ProviderConfig
    client: ProviderClient | None
    setup_error: str | None
    limiter: anyio.CapacityLimiter
    rate_limit: RateLimit
    bucket: BucketState
    backoff: BackoffPolicy
    breaker_policy: BreakerPolicy
    breaker: BreakerState

    @classmethod
    def build(
        cls,
        name: str,
        config: ProviderConfig,
        client: ProviderClient | None,
        setup_error: str | None,
        now: float,
    ) -> ProviderRuntime:
        rate_limit = RateLimit(rate=config.rate_limit.rate, burst=config.rate_limit.burst)
        breaker_policy = BreakerPolicy(
            failure_threshold=config.breaker.failure_threshold,
            cooldown_initial=config.breaker.cooldown_initial,
            cooldown_max=max(config.breaker.cooldown_max, config.breaker.cooldown_initial),
        )
        return cls(
            name=name,
            config=config,
            client=client,
            setup_error=setup_error,
            limiter=anyio.CapacityLimiter(config.max_concurrency),
            rate_limit=rate_limit,
            bucket=bucket_full(rate_limit, now),
            backoff=BackoffPolicy(
                initial=config.backoff.initial,
                maximum=max(config.backoff.max, config.backoff.initial),
            ),
            breaker_policy=breaker_policy,
            breaker=breaker_reset(breaker_policy),
        )

    @property
    def reuse_grace(self) -> float:
        return self.config.reuse_grace


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
    ) -> None:
        self.config = config
        self.store = store
        self.publishers = list(publishers)
        self.observers = list(observers)
        self.clock = clock or SystemClock()
        self.rng = rng or random.Random()
        # Identifies this process in the store's per-account claims.
        self.owner = owner or f"tokend-{uuid.uuid4().hex[:12]}"
        self.accounts: dict[str, Account] = {}
        now = self.clock.time()
        self.providers: dict[str, ProviderRuntime] = {
            name: ProviderRuntime.build(
                name, pconf, clients.get(name), (client_errors or {}).get(name), now
            )
            for name, pconf in config.providers.items()
        }
        self._slots = anyio.Semaphore(config.max_concurrency)
        self._due_send: MemoryObjectSendStream[str]
        self._due_recv: MemoryObjectReceiveStream[str]
        self._due_send, self._due_recv = anyio.create_memory_object_stream[str](math.inf)
        self._queued: set[str] = set()
        self._forced: set[str] = set()
        self._stop = anyio.Event()
        self.schedule = RefreshSchedule(self._on_due, self.clock)
        # When each published token expires: an expired token must not look valid.
        self.expiries = RefreshSchedule(self._on_expired, self.clock, job_id="tokend-expiry")
        self._expired_send, self._expired_recv = anyio.create_memory_object_stream[str](math.inf)
        self._loaded = False

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
        self._loaded = True

    def _timing_for(self, aconf: AccountConfig) -> RefreshTiming:
        pconf = self.config.providers[aconf.provider]
        return _resolve_timing(self.config.refresh, pconf.refresh, aconf.refresh)

    async def _reconcile(
        self, name: str, aconf: AccountConfig, stored: StoredAccount | None, now: float
    ) -> Account:
        timing = self._timing_for(aconf)
        try:
            seed = self._read_seed(aconf)
        except (OSError, ValueError) as exc:
            record = stored or StoredAccount(account=name)
            account = Account(name, aconf, timing, record)
            account.last_error = f"cannot read the seed refresh token: {exc}"
            _log.error("seed_unreadable", account=name, error=account.last_error)
            self._adopt_stored_token(account, now)
            return account
        seed_fp = fingerprint(seed) if seed is not None else None
        if stored is not None and stored.seed_fingerprint == seed_fp:
            # The store holds the chain rotated from this seed: the store wins.
            record = stored
            register_secret(record.refresh_token)
            if record.in_flight_since is not None:
                _log.warning(
                    "refresh_was_in_flight",
                    account=name,
                    since=_iso(record.in_flight_since),
                    detail="tokend stopped while a refresh was in flight; the IdP may have "
                    "rotated the refresh token. Trying the stored one.",
                )
        else:
            # First start, or the operator supplied a new seed: the new seed wins.
            record = StoredAccount(
                account=name,
                seed_fingerprint=seed_fp,
                refresh_token=seed,
                updated_at=now,
                version=stored.version if stored is not None else 0,
            )
            if stored is not None:
                _log.info(
                    "seed_changed",
                    account=name,
                    detail="a new seed token replaces the stored chain",
                )
            record = await self._put_or_keep(record)
        account = Account(name, aconf, timing, record)
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

    def _read_seed(self, aconf: AccountConfig) -> str | None:
        if aconf.refresh_token is not None:
            seed = aconf.refresh_token.get_secret_value()
        elif aconf.refresh_token_file is not None:
            seed = read_secret_file(aconf.refresh_token_file)
        else:
            return None
        register_secret(seed)
        return seed

    async def _put_or_keep(self, record: StoredAccount) -> StoredAccount:
        try:
            return await self._put(record)
        except StoreError as exc:
            # The seed is in the config; nothing is lost if this write waits.
            _log.error("store_write_failed", account=record.account, error=str(exc))
            return record

    # -- running ----------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve until :meth:`stop`; then drain in-flight refreshes (bounded) and return."""
        await self.load()
        self._schedule_start()
        self.schedule.start(asyncio.get_running_loop())
        self.expiries.start(asyncio.get_running_loop())
        try:
            async with anyio.create_task_group() as outer:
                outer.start_soon(self._watch_clock)
                outer.start_soon(self._expire_loop)
                async with anyio.create_task_group() as refreshes:
                    refreshes.start_soon(self._dispatch, refreshes)
                    refreshes.start_soon(self._publish_restored)
                    task_status.started()
                    await self._stop.wait()
                    # Stop scheduling; let in-flight refreshes finish and commit, bounded.
                    self.schedule.shutdown()
                    self._due_send.close()
                    refreshes.cancel_scope.deadline = (
                        anyio.current_time() + self.config.serve.drain_timeout
                    )
                outer.cancel_scope.cancel()
        finally:
            self.schedule.shutdown()
            self.expiries.shutdown()
        unsaved = [a.name for a in self.accounts.values() if a.unsaved is not None]
        if unsaved:
            _log.critical(
                "rotated_tokens_not_saved",
                accounts=unsaved,
                detail="these accounts' rotated refresh tokens could not be committed before "
                "shutdown; they will need re-authorization",
            )

    def stop(self) -> None:
        self._stop.set()

    async def run_once(self) -> bool:
        """Refresh what needs it, publish, and report whether every account holds a
        valid token (for init containers and cron)."""
        await self.load()
        now = self.clock.time()
        async with anyio.create_task_group() as group:
            group.start_soon(self._publish_restored)
            for account in self.accounts.values():
                if account.state is AccountState.NEEDS_REAUTH:
                    continue
                if not account.token_valid(now) or now >= self._next_refresh_time(account):
                    group.start_soon(self._once, account)
        now = self.clock.time()
        return all(a.token_valid(now) for a in self.accounts.values())

    async def _once(self, account: Account) -> None:
        async with self._slots:
            await self._refresh(account, forced=True)
            # A rotated token that could not be saved is retried, bounded, before exit.
            with anyio.move_on_after(self.config.serve.drain_timeout):
                while account.unsaved is not None:
                    await anyio.sleep(0.5)
                    async with account.lock:
                        await self._commit_unsaved(account)

    async def _publish_restored(self) -> None:
        """Hand restored tokens to the publishers (their files may be missing or stale),
        a few accounts at a time: the socket serves them from memory at once, and a
        start with 100,000 accounts must not create 100,000 tasks."""
        if not self.publishers:
            return
        pending = iter([name for name, a in self.accounts.items() if a.published is not None])

        async def worker() -> None:
            for name in pending:
                account = self.accounts.get(name)
                if account is None:
                    continue
                # Under the lock: a refresh that got there first has published a newer
                # token, which must not be overwritten by the restored one.
                async with account.lock:
                    if account.published is not None:
                        await self._publish(account, account.published)

        async with anyio.create_task_group() as workers:
            for _ in range(_RESTORE_WORKERS):
                workers.start_soon(worker)

    # -- scheduling ---------------------------------------------------------------------

    def _next_refresh_time(self, account: Account) -> float:
        token = account.published
        if token is None:
            return self.clock.time()
        return refresh_at(
            account.timing, token.issued_at, token.expires_at, self.rng.uniform(-1, 1)
        )

    def _schedule_start(self) -> None:
        now = self.clock.time()
        due = []
        for account in self.accounts.values():
            if account.state is AccountState.NEEDS_REAUTH or self._unusable(account):
                continue
            at = self._next_refresh_time(account)
            if at <= now:
                due.append(account)
            else:
                self._schedule(account, at)
        spread = min(_START_SPREAD_MAX, 0.002 * len(due))
        for account in due:
            self._schedule(account, now + self.rng.uniform(0, spread))

    def _unusable(self, account: Account) -> bool:
        provider = self.providers[account.provider]
        if provider.client is None:
            account.last_error = provider.setup_error or "provider is not set up"
            return True
        return account.config.grant == "refresh_token" and account.record.refresh_token is None

    def _schedule(self, account: Account, at: float) -> None:
        account.next_attempt_at = at
        self.schedule.set(account.name, at)

    def _on_due(self, names: list[str]) -> None:
        for name in names:
            self._enqueue(name)

    def _enqueue(self, name: str, *, forced: bool = False) -> None:
        if forced:
            self._forced.add(name)
        if name in self._queued:
            return
        try:
            self._due_send.send_nowait(name)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            return
        self._queued.add(name)

    async def _dispatch(self, group: TaskGroup) -> None:
        async with self._due_recv:
            async for name in self._due_recv:
                self._queued.discard(name)
                account = self.accounts.get(name)
                if account is None:
                    continue
                await self._slots.acquire()
                group.start_soon(self._run_slot, account, name in self._forced)
                self._forced.discard(name)

    async def _run_slot(self, account: Account, forced: bool) -> None:
        try:
            await self._refresh(account, forced=forced)
        except Exception:
            # One account's bug must not take the others down.
            _log.exception("refresh_crashed", account=account.name)
            self._schedule(account, self.clock.time() + 30.0)
        finally:
            self._slots.release()

    async def _watch_clock(self) -> None:
        wall0, mono0 = self.clock.time(), self.clock.monotonic()
        while True:
            await anyio.sleep(_CLOCK_CHECK_INTERVAL)
            wall, mono = self.clock.time(), self.clock.monotonic()
            drift = (wall - wall0) - (mono - mono0)
            if abs(drift) > _CLOCK_JUMP_TOLERANCE:
                _log.warning("wall_clock_jumped", seconds=round(drift, 3))
                self._clock_jumped(drift)
            wall0, mono0 = wall, mono

    def _clock_jumped(self, delta: float) -> None:
        # Due times were computed as "now + wait" on the old clock: keep each wait.
        self.schedule.shift(delta)
        for account in self.accounts.values():
            account.next_attempt_at = self.schedule.due_at(account.name)

    # -- reload -----------------------------------------------------------------------------

    async def reload(
        self,
        config: Config,
        clients: Mapping[str, ProviderClient],
        client_errors: Mapping[str, str],
        changed_providers: set[str],
    ) -> list[ProviderClient]:
        """Apply a new config: removed accounts stop (their files go), added ones start,
        a changed seed replaces the stored chain (and clears ``needs_reauth``); the
        tokens of unchanged accounts are untouched. ``changed_providers`` got new
        ``clients`` (their config or credential files changed): their breakers reset.
        Returns the replaced clients, for the caller to close once idle."""
        now = self.clock.time()
        retired: list[ProviderClient] = []
        for name, pconf in config.providers.items():
            old = self.providers.get(name)
            if old is not None and name not in changed_providers:
                old.config = pconf
                continue
            if old is not None and old.client is not None:
                retired.append(old.client)
            self.providers[name] = ProviderRuntime.build(
                name, pconf, clients.get(name), client_errors.get(name), now
            )
            _log.info("provider_updated", provider=name)
        for name in set(self.providers) - set(config.providers):
            runtime = self.providers.pop(name)
            if runtime.client is not None:
                retired.append(runtime.client)
        self.config = config

        for name in set(self.accounts) - set(config.accounts):
            removed = self.accounts[name]
            async with removed.lock:
                del self.accounts[name]
                self._unschedule(name)
                self.expiries.remove(name)
                for publisher in self.publishers:
                    await publisher.withdraw(name)
            _log.info("account_removed", account=name)
        for name, aconf in config.accounts.items():
            account = self.accounts.get(name)
            if account is None:
                account = await self._reconcile(name, aconf, await self.store.load(name), now)
                self.accounts[name] = account
                _log.info("account_added", account=name)
                if account.published is not None:
                    await self._publish(account, account.published)
                self._schedule_after_reload(account, now)
                continue
            async with account.lock:
                await self._reload_account(account, aconf, aconf.provider in changed_providers)
        return retired

    async def _reload_account(
        self, account: Account, aconf: AccountConfig, provider_changed: bool
    ) -> None:
        now = self.clock.time()
        try:
            seed = self._read_seed(aconf)
        except (OSError, ValueError) as exc:
            _log.error("seed_unreadable", account=account.name, error=str(exc))
            return
        account.config = aconf
        account.timing = self._timing_for(aconf)
        seed_fp = fingerprint(seed) if seed is not None else None
        if seed_fp != account.record.seed_fingerprint:
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
            self._schedule(account, now)
            return
        if provider_changed or (
            account.next_attempt_at is None and account.state is AccountState.BLOCKED
        ):
            self._schedule_after_reload(account, now)

    def _schedule_after_reload(self, account: Account, now: float) -> None:
        if account.state is AccountState.NEEDS_REAUTH or self._unusable(account):
            return
        at = self._next_refresh_time(account)
        self._schedule(account, max(now, at) if account.token_valid(now) else now)

    def _unschedule(self, name: str) -> None:
        self.schedule.remove(name)

    # -- requests from applications ---------------------------------------------------------

    def not_ready(self) -> list[str]:
        """Required accounts that hold no valid token now (empty: tokend is ready)."""
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
        self._enqueue(name, forced=True)
        with anyio.move_on_after(max_wait):
            await settled.wait()
        return account

    # -- one refresh ----------------------------------------------------------------------

    async def _refresh(self, account: Account, *, forced: bool = False) -> None:
        if account.lock.locked():
            return  # single flight: the refresh in progress serves this request too
        async with account.lock:
            try:
                await self._refresh_locked(account, forced=forced)
            finally:
                account.mark_settled()

    async def _refresh_locked(self, account: Account, *, forced: bool) -> None:
        now = self.clock.time()
        if account.unsaved is not None:
            await self._commit_unsaved(account)
            return
        if account.state is AccountState.NEEDS_REAUTH or self._unusable(account):
            return
        if forced and _refreshed_since(account, account.force_requested_at):
            return  # a refresh finished after the request: it already has its new token
        if not forced and account.next_attempt_at is not None and now < account.next_attempt_at - 1:
            # Woken early (a clock jump, a stale job): recompute instead of refreshing.
            self._schedule(account, account.next_attempt_at)
            return
        provider = self.providers[account.provider]
        client = provider.client
        assert client is not None
        # While the breaker is open, don't even queue for the rate limit.
        admission, _ = breaker_admit(provider.breaker, now, provider.breaker_policy)
        if not admission.allowed:
            self._hold_for_breaker(account, provider, admission.retry_at)
            return
        async with provider.limiter:
            # Pace requests to the provider (FIFO): a thousand accounts due at once
            # go out at the configured rate, not in one burst.
            start_at, provider.bucket = bucket_reserve(
                provider.bucket, provider.rate_limit, self.clock.time()
            )
            await anyio.sleep(max(0.0, start_at - self.clock.time()))
            admission, provider.breaker = breaker_admit(
                provider.breaker, self.clock.time(), provider.breaker_policy
            )
            if not admission.allowed:
                self._hold_for_breaker(account, provider, admission.retry_at)
                return
            try:
                await self._claimed_exchange(account, provider, client, admission.probe)
            except BaseException:
                if admission.probe:
                    provider.breaker = breaker_abandon_probe(provider.breaker, self.clock.time())
                raise

    def _hold_for_breaker(
        self, account: Account, provider: ProviderRuntime, retry_at: float | None
    ) -> None:
        """The provider's breaker is open: no request; look again when it may admit."""
        previous = account.state
        account.state = AccountState.BLOCKED
        reason = provider.breaker.last_reason or "failures"
        account.last_error = f"provider {provider.name}: circuit breaker open ({reason})"
        if retry_at is None:
            account.next_attempt_at = None  # until the provider's config changes
        else:
            # Spread the wake-ups so accounts don't all return at the same instant.
            self._schedule(account, retry_at + self.rng.uniform(0, 1.0))
        if previous is not AccountState.BLOCKED:
            _log.warning(
                "account_blocked",
                account=account.name,
                provider=provider.name,
                error=account.last_error,
                next_attempt_at=_iso(account.next_attempt_at) if account.next_attempt_at else None,
            )

    async def _claimed_exchange(
        self, account: Account, provider: ProviderRuntime, client: ProviderClient, probe: bool
    ) -> None:
        claim_ttl = self.config.providers[account.provider].timeout + 30.0
        try:
            claimed = await self.store.claim(account.name, self.owner, claim_ttl)
        except StoreError as exc:
            await self._on_failure(account, provider, _store_unavailable(exc), 0.0)
            return
        if not claimed:
            # Another replica is refreshing this account; look again shortly.
            self._schedule(account, self.clock.time() + 5.0)
            return
        try:
            retry_now = await self._exchange(account, provider, client, probe)
            if retry_now:
                # The response was lost inside the IdP's reuse grace: the same token
                # once more, at once, before anything else.
                await self._exchange(account, provider, client, probe)
        finally:
            try:
                await self.store.release(account.name, self.owner)
            except StoreError as exc:
                # The claim lapses by itself after its TTL.
                _log.warning("store_release_failed", account=account.name, error=str(exc))

    async def _exchange(
        self, account: Account, provider: ProviderRuntime, client: ProviderClient, probe: bool
    ) -> bool:
        """One token request and its consequences. True if the policy asks to resend
        the same refresh token at once (a lost response inside the reuse grace)."""
        previous_state = account.state
        account.state = AccountState.REFRESHING
        refresh_token = account.record.refresh_token
        started = self.clock.monotonic()
        outcome: Outcome
        try:
            if account.config.grant == "refresh_token":
                assert refresh_token is not None
                # Durably note that the token is about to leave: after a crash, a
                # restart knows the IdP may have rotated it.
                try:
                    account.record = await self._put(
                        account.record.evolve(in_flight_since=self.clock.time())
                    )
                except StoreError as exc:
                    account.state = previous_state
                    await self._on_failure(account, provider, _store_unavailable(exc), 0.0)
                    return False
            if not probe and provider.breaker.status is not BreakerStatus.CLOSED:
                # The breaker opened (a 429, a 403) while this request was getting
                # ready (claim, in-flight mark): it is not sent after all.
                account.state = previous_state
                if account.record.in_flight_since is not None:
                    await self._withdraw_in_flight_mark(account)
                self._hold_for_breaker(account, provider, provider.breaker.opened_until)
                return False
            if refresh_token is not None and account.config.grant == "refresh_token":
                outcome = await client.refresh(refresh_token, account.config.scope)
            else:
                outcome = await client.client_credentials(account.config.scope)
        except BaseException:
            account.state = previous_state
            raise
        duration = self.clock.monotonic() - started
        self._record_breaker(provider, outcome)
        if isinstance(outcome, TokenResponse):
            await self._on_success(account, outcome, refresh_token, duration)
            return False
        account.state = previous_state
        return await self._on_failure(account, provider, outcome, duration)

    async def _withdraw_in_flight_mark(self, account: Account) -> None:
        try:
            account.record = await self._put(account.record.evolve(in_flight_since=None))
        except StoreError as exc:
            # Harmless if it stays: it only makes the next invalid_grant's message
            # mention a possibly lost response.
            _log.warning("store_write_failed", account=account.name, error=str(exc))

    def _record_breaker(self, provider: ProviderRuntime, outcome: Outcome) -> None:
        before = provider.breaker
        result: TokenFailure | Literal["success"] = (
            "success" if isinstance(outcome, TokenResponse) else outcome
        )
        after = breaker_record(before, provider.breaker_policy, result, self.clock.time())
        provider.breaker = after
        if after.status is not before.status or after.permanent != before.permanent:
            event = {
                BreakerStatus.OPEN: "circuit_opened",
                BreakerStatus.HALF_OPEN: "circuit_half_open",
                BreakerStatus.CLOSED: "circuit_closed",
            }[after.status]
            _log.warning(
                event,
                provider=provider.name,
                reason=after.last_reason,
                permanent=after.permanent,
                reopens_probe_at=_iso(after.opened_until) if after.opened_until else None,
                cooldown_s=after.cooldown,
            )

    async def _on_success(
        self,
        account: Account,
        response: TokenResponse,
        used_refresh_token: str | None,
        duration: float,
    ) -> None:
        now = self.clock.time()
        lifetime = response.expires_in or account.timing.default_lifetime
        token = TokenSet(
            access_token=response.access_token,
            token_type=response.token_type,
            expires_at=now + lifetime,
            issued_at=now,
            scope=response.scope or account.config.scope,
        )
        new_refresh_token = response.refresh_token or used_refresh_token
        register_secret(token.access_token)
        register_secret(new_refresh_token)
        record = account.record.evolve(
            refresh_token=new_refresh_token,
            token=token,
            in_flight_since=None,
            last_outcome="success",
            last_error=None,
            updated_at=now,
        )
        rotated = (
            response.refresh_token is not None and response.refresh_token != used_refresh_token
        )
        account.policy = account_after_success(account.policy)
        replaced = account.published
        committed = await self._commit(account, record)
        if committed:
            self._retire_secrets(account, replaced, used_refresh_token if rotated else None)
        next_at = account.next_attempt_at
        outcome = "success" if committed else "unsaved"
        for observer in self.observers:
            observer.refresh_finished(account.provider, outcome, duration)
        _log.info(
            "refresh",
            account=account.name,
            provider=account.provider,
            outcome=outcome,
            duration_ms=round(duration * 1000, 1),
            rotated=rotated,
            expires_at=_iso(token.expires_at),
            next_refresh_at=_iso(next_at) if next_at else None,
        )

    def _retire_secrets(
        self, account: Account, replaced: TokenSet | None, spent_refresh_token: str | None
    ) -> None:
        """Keep the log redactor's set bounded (it would otherwise grow by two tokens per
        refresh, forever): drop the spent refresh token and the access token from two
        refreshes ago. The one just replaced may still be valid, so it stays redacted
        until the next refresh."""
        forget_secret(spent_refresh_token)
        forget_secret(account.retired_access_token)
        account.retired_access_token = replaced.access_token if replaced else None

    async def _commit(self, account: Account, record: StoredAccount) -> bool:
        """Durably store ``record``, then publish its token. On a store failure the
        record waits in memory (state ``unsaved``) and nothing is published."""
        try:
            stored = await self._put(record)
        except StoreError as exc:
            account.unsaved = record
            account.state = AccountState.UNSAVED
            account.last_error = f"could not save the new token: {exc}"
            backoff = self.providers[account.provider].backoff
            delay = retry_delay(backoff, account.commit_failures, self.rng.random(), None)
            account.commit_failures += 1
            _log.error(
                "commit_failed",
                account=account.name,
                error=str(exc),
                retry_in_s=round(delay, 2),
                detail="the rotated refresh token is held in memory and nothing new is "
                "published until it is saved",
            )
            self._schedule(account, self.clock.time() + delay)
            return False
        account.record = stored
        account.unsaved = None
        account.commit_failures = 0
        account.last_error = None
        account.last_refresh_at = self.clock.time()
        account.state = AccountState.VALID
        if stored.token is not None:
            # The next refresh is set before the token is handed out, so nobody who
            # sees the new token sees the old schedule beside it.
            token = stored.token
            jitter = self.rng.uniform(-1, 1)
            self._schedule(
                account, refresh_at(account.timing, token.issued_at, token.expires_at, jitter)
            )
            await self._publish(account, token)
        return True

    async def _commit_unsaved(self, account: Account) -> None:
        record = account.unsaved
        if record is None:
            return
        if await self._commit(account, record.evolve(version=account.record.version)):
            _log.info("commit_recovered", account=account.name)

    async def _put(self, record: StoredAccount) -> StoredAccount:
        started = self.clock.monotonic()
        try:
            stored = await self.store.put(record)
        except StoreConflict:
            # Someone else wrote this account since we read it. Our write carries the
            # newest token (we hold the claim and just received it): write it on top.
            current = await self.store.load(record.account)
            _log.warning("store_conflict", account=record.account)
            stored = await self.store.put(record.evolve(version=current.version if current else 0))
        duration = self.clock.monotonic() - started
        for observer in self.observers:
            observer.store_committed(duration)
        return stored

    async def _publish(self, account: Account, token: TokenSet) -> None:
        account.published = token
        self.expiries.set(account.name, token.expires_at)
        for publisher in self.publishers:
            await publisher.publish(account.name, token)

    def _on_expired(self, names: list[str]) -> None:
        for name in names:
            self._expired_send.send_nowait(name)

    async def _expire_loop(self) -> None:
        async for name in self._expired_recv:
            account = self.accounts.get(name)
            if account is None or account.published is None:
                continue
            async with account.lock:
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

    async def _on_failure(
        self,
        account: Account,
        provider: ProviderRuntime,
        failure: TokenFailure,
        duration: float,
    ) -> bool:
        """Record a failed refresh and decide what next. True: resend the same refresh
        token at once (a lost response inside the provider's reuse grace)."""
        now = self.clock.time()
        token = account.published
        decision = account_after_failure(
            account.policy,
            failure,
            now=now,
            token_expires_at=token.expires_at if token else None,
            backoff=provider.backoff,
            u=self.rng.random(),
            reuse_grace=provider.reuse_grace,
        )
        account.policy = decision.policy_state
        previous_error = account.last_error
        account.last_error = failure.summary()
        # A response lost after the request was sent: the IdP may have rotated the
        # refresh token, so the in-flight mark stays until a later outcome settles it.
        keep_mark = is_lost_response(failure)
        record = account.record.evolve(
            in_flight_since=account.record.in_flight_since if keep_mark else None,
            last_outcome=failure.kind.value,
            last_error=account.last_error,
            updated_at=now,
        )
        try:
            account.record = await self._put(record)
        except StoreError as exc:
            _log.warning("store_write_failed", account=account.name, error=str(exc))
        previous = account.state
        account.state = decision.state
        if decision.next_attempt_at is not None and not decision.retry_same_token_now:
            self._schedule(account, decision.next_attempt_at)
        else:
            account.next_attempt_at = decision.next_attempt_at
        for observer in self.observers:
            observer.refresh_finished(account.provider, failure.kind.value, duration)
        # One line per change of state or cause; retries that change nothing log at debug.
        changed = previous is not decision.state or previous_error != account.last_error
        log = _log.warning if changed else _log.debug
        if decision.state is AccountState.NEEDS_REAUTH:
            log = _log.error
        log(
            "refresh",
            account=account.name,
            provider=account.provider,
            outcome=failure.kind.value,
            reason=failure.reason,
            status=failure.status,
            error=account.last_error,
            message=decision.message,
            duration_ms=round(duration * 1000, 1),
            state=account.state.value,
            previous_state=previous.value,
            attempt=account.policy.consecutive_failures,
            token_valid=account.token_valid(now),
            retry_same_token_now=decision.retry_same_token_now,
            next_attempt_at=_iso(decision.next_attempt_at) if decision.next_attempt_at else None,
        )
        return bool(decision.retry_same_token_now)


@functools.lru_cache(maxsize=1024)
def _resolve_timing(*layers: RefreshPolicyConfig) -> RefreshTiming:
    # Most accounts share their layers: resolve each distinct combination once.
    return RefreshTiming.resolve(*layers)


def _refreshed_since(account: Account, since: float | None) -> bool:
    return (
        since is not None
        and account.last_refresh_at is not None
        and (account.last_refresh_at >= since)
    )


def _store_unavailable(exc: StoreError) -> TokenFailure:
    # The refresh token never left: the store could not record that it was about to.
    return TokenFailure(
        FailureKind.TRANSIENT, "store_unavailable", description=str(exc), request_sent=False
    )


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="seconds")
