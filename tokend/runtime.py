"""The run-time nouns of the engine: one account, one provider and its queue.

Nothing here does I/O. The engine owns these objects; one refresh (``refresh.py``)
updates an account's fields; publishers and metrics read them through views.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

import anyio

from tokend.config import AccountConfig, ProviderConfig
from tokend.model import AccountState, StoredAccount, TokenSet
from tokend.oauth import ProviderClient
from tokend.policy import (
    AccountPolicyState,
    BackoffPolicy,
    BreakerPolicy,
    BreakerState,
    BucketState,
    ChainTimes,
    RateLimit,
    RefreshLifetime,
    RefreshTiming,
    breaker_reset,
    bucket_full,
    keepalive_at,
    queue_priority,
    reauth_deadline,
)

# Frozen: every account without failures shares this one (56 bytes an account).
_NO_FAILURES = AccountPolicyState()
# Nothing known of a provider's refresh-token lifetimes: one object, recognized by identity
# in the checks every scrape makes for every account.
UNKNOWN_LIFETIME = RefreshLifetime()
# States in which no refresh can keep the chain alive.
_CANNOT_REFRESH = frozenset({AccountState.NEEDS_REAUTH, AccountState.BLOCKED})


@dataclass(eq=False, slots=True)
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
    policy: AccountPolicyState = _NO_FAILURES
    # Failed commits in a row of an unsaved token (the commit retry's backoff attempt).
    commit_failures: int = 0
    # The access token this account replaced last: still redacted from logs until
    # the next refresh (it may not have expired yet).
    retired_access_token: str | None = field(default=None, repr=False)
    # When an application last asked for a refresh ahead of schedule.
    force_requested_at: float | None = None
    # Its rotated refresh token is not in the vault yet (the write-back is retried).
    writeback_pending: bool = False
    # A wake-up arrived while the account was busy: look again when it is free, so a
    # due refresh is never dropped.
    recheck: bool = False
    # The next refresh attempt was asked for by an application (skips the schedule).
    forced: bool = False
    # While queued for the provider: the state to return to once it leaves the queue.
    queued_from: AccountState | None = None
    # The provider's refresh-token lifetimes (shared by its accounts).
    lifetime: RefreshLifetime = UNKNOWN_LIFETIME
    # Created on first use: 100,000 accounts need not pay for 200,000 sync primitives
    # at start (each costs an async-library lookup).
    _lock: anyio.Lock | None = field(default=None, repr=False)
    _settled: anyio.Event | None = field(default=None, repr=False)

    @property
    def lock(self) -> anyio.Lock:
        """Held while the account refreshes (or its files change): at most one refresh
        in flight, ever."""
        if self._lock is None:
            self._lock = anyio.Lock()
        return self._lock

    @property
    def busy(self) -> bool:
        return self._lock is not None and self._lock.locked()

    def drop_idle_lock(self) -> None:
        """Let go of the lock object while nobody holds it or waits for it (every use
        is ``async with account.lock``, so nobody keeps it in between): 100,000 idle
        accounts need not keep 100,000 locks, about 360 bytes each."""
        lock = self._lock
        if lock is not None and not lock.locked() and not lock.statistics().tasks_waiting:
            self._lock = None

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

    @property
    def chain(self) -> ChainTimes:
        record = self.record
        return ChainTimes(
            consented_at=record.consented_at,
            last_used_at=record.refresh_used_at,
            idp_expires_at=record.refresh_expires_at,
            idp_expiry_fixed=record.refresh_expiry_fixed,
        )

    def _lifetime_known(self) -> bool:
        # On every scrape, for every account: the common case (nothing known) first.
        lifetime = self.lifetime
        if lifetime is UNKNOWN_LIFETIME and self.record.refresh_expires_at is None:
            return False
        return self.config.grant == "refresh_token" and (
            lifetime.max_idle is not None
            or lifetime.max_age is not None
            or self.record.refresh_expires_at is not None
        )

    @property
    def keepalive_at(self) -> float | None:
        """When an idle refresh is due to keep the refresh token alive (None: never)."""
        if not self._lifetime_known():
            return None
        return keepalive_at(self.lifetime, self.chain)

    @property
    def reauth_deadline(self) -> float | None:
        """When the chain dies however often it is refreshed (None: not known)."""
        if not self._lifetime_known():
            return None
        state = self.queued_from if self.state is AccountState.QUEUED else self.state
        return reauth_deadline(self.lifetime, self.chain, refreshable=state not in _CANNOT_REFRESH)


@dataclass
class ProviderQueue:
    """Accounts due for a refresh at one provider, most urgent first (see
    :func:`tokend.policy.queue_priority`). A waiting account costs a heap entry, not a
    task: 100,000 accounts due at once wait here, not in 100,000 coroutines."""

    _heap: list[tuple[tuple[int, float], int, str]] = field(default_factory=list)
    # The sequence number of each queued account's live entry (older ones are stale).
    _live: dict[str, int] = field(default_factory=dict)
    _seq: itertools.count[int] = field(default_factory=itertools.count)
    _nonempty: anyio.Event | None = None

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, name: object) -> bool:
        return name in self._live

    def push(self, account: Account) -> None:
        """Queue ``account`` (again, with its current priority, if already queued)."""
        token = account.published
        priority = queue_priority(
            forced=account.forced,
            in_flight=account.record.in_flight_since is not None,
            expires_at=token.expires_at if token is not None else None,
        )
        seq = next(self._seq)
        self._live[account.name] = seq
        heapq.heappush(self._heap, (priority, seq, account.name))
        if self._nonempty is not None:
            self._nonempty.set()

    def pop(self) -> str | None:
        """The most urgent queued account's name, or None when none is queued."""
        heap = self._heap
        while heap:
            _, seq, name = heapq.heappop(heap)
            if self._live.get(name) == seq:
                del self._live[name]
                return name
        return None

    def discard(self, name: str) -> None:
        self._live.pop(name, None)
        if not self._live:
            self._heap.clear()

    def names(self) -> list[str]:
        return list(self._live)

    async def wait_nonempty(self) -> None:
        while not self._live:
            self._nonempty = anyio.Event()
            await self._nonempty.wait()
        self._nonempty = None


@dataclass
class ProviderRuntime:
    """One provider at run time: its client, its limits, its queue and its breaker."""

    name: str
    config: ProviderConfig
    client: ProviderClient | None
    setup_error: str | None
    # Requests in flight to this provider (taken before the rate limit's wait, so at
    # most this many accounts are ever committed to going next).
    slots: anyio.Semaphore
    rate_limit: RateLimit
    bucket: BucketState
    backoff: BackoffPolicy
    breaker_policy: BreakerPolicy
    breaker: BreakerState
    queue: ProviderQueue = field(default_factory=ProviderQueue)

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
            # A probe lost without an outcome is presumed lost once its request
            # would have timed out.
            probe_timeout=config.timeout + 5.0,
        )
        return cls(
            name=name,
            config=config,
            client=client,
            setup_error=setup_error,
            slots=anyio.Semaphore(config.max_concurrency),
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
