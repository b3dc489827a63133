"""One refresh of one account, the steps in order::

    claim      only this process (or replica) refreshes the account now
    reload     the record as the store has it now: adopt a newer chain written elsewhere
    mark       durably note that the refresh token is about to leave       [durable]
    exchange   the token request; the provider's slot is handed back at once
    commit     the new refresh and access token                          [durable, shielded]
    write back the rotated refresh token to where its seed lives (a vault), if configured
    publish    in-memory view, token files, notifications
    release    the claim

The order is tokend's core promise: a rotated refresh token is durable before anything
else happens with the answer, and a cancellation (a drain's deadline) can interrupt the
request but never the commit of its answer. Admission (the provider's breaker, pacing
and earliest-expiry-first order) happens before this runs, in the provider's queue
(``engine.py``): a waiting account costs a heap entry, not a task.

Every path ends with the account scheduled, or in a state that says why not
(``needs_reauth``, ``blocked`` until a config change, an unusable provider).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, Protocol

import anyio

from tokend.clock import Clock
from tokend.logs import forget_secret, get_logger, register_secret
from tokend.model import AccountState, StoredAccount, TokenSet
from tokend.oauth import FailureKind, Outcome, ProviderClient, TokenFailure, TokenResponse
from tokend.observe import Observer
from tokend.policy import (
    BackoffPolicy,
    BreakerStatus,
    account_after_failure,
    account_after_success,
    breaker_abandon_probe,
    breaker_record,
    idp_expiry_after_use,
    is_lost_response,
    next_refresh_at,
    refresh_at,
    retry_delay,
)
from tokend.publish import Publisher
from tokend.runtime import Account, ProviderRuntime
from tokend.store import SharedStore, Store, StoreConflict, StoreError

_log = get_logger()

# The longest a commit may take once the answer is in hand. It runs shielded from
# cancellation (a drain waits for it), so it needs a bound of its own: a store that
# hangs longer leaves the token unsaved in memory, said loudly, rather than a process
# that never exits.
COMMIT_TIMEOUT = 10.0
# Retrying an unsaved token's commit: the store, not the IdP, is what failed, so the
# retry is soon and the ceiling short: a freed disk is noticed within 5 s, and a
# retry costs one local write.
_COMMIT_BACKOFF = BackoffPolicy(initial=0.5, maximum=5.0)


class SeedWriteBack(Protocol):
    """Writes a rotated refresh token back to where the account's seed lives (a vault),
    so a fresh start elsewhere begins from the newest token."""

    def applies_to(self, account: str) -> bool:
        """Whether ``account``'s seed is written back at all."""
        ...

    async def write_back(self, account: str, record: StoredAccount) -> str | None:
        """Write ``record.refresh_token`` back. Raise to report a failure: the local
        store already holds the token, so the caller retries later. Returns the seed
        fingerprint the record carries from now on (the seed is the token just
        written), or None when nothing was written."""
        ...

    def note(self, account: str, record: StoredAccount) -> None:
        """``record`` is the account's record now: retry its write-back if one is owed."""
        ...

    def forget(self, account: str) -> None:
        """Another replica owns ``account`` now: its write-back is that replica's."""
        ...

    @property
    def pending(self) -> frozenset[str]:
        """Accounts whose write-back is owed and waits for a retry."""
        ...


class RefreshHost(Protocol):
    """What one refresh needs from the engine around it."""

    store: Store
    clock: Clock
    rng: random.Random
    owner: str
    observers: list[Observer]
    write_back: SeedWriteBack | None

    @property
    def publishers(self) -> Sequence[Publisher]: ...

    def schedule(self, account: Account, at: float) -> None:
        """Set ``account``'s next refresh attempt to unix time ``at``."""
        ...

    def token_published(self, account: Account, token: TokenSet) -> None:
        """``token`` is ``account``'s current token from now on (expiry tracking)."""
        ...


@dataclass(frozen=True, slots=True)
class Admission:
    """What the provider's queue granted this refresh."""

    # This request is the breaker's half-open probe.
    probe: bool
    # Hands the provider's concurrency slot back; idempotent.
    done_with_provider: Callable[[], None]


Sent = Literal["sent", "not_sent"]


class Refresh:
    """The steps of one refresh (module docstring), for one engine."""

    def __init__(self, host: RefreshHost) -> None:
        self.host = host

    async def run(
        self, account: Account, provider: ProviderRuntime, admission: Admission, *, forced: bool
    ) -> None:
        """Refresh ``account`` if it is (still) due. Called with the account's lock held."""
        sent: Sent = "not_sent"
        try:
            sent = await self._run(account, provider, admission, forced=forced)
        finally:
            admission.done_with_provider()
            if admission.probe and sent == "not_sent":
                # The probe never went out: the next caller probes at once, instead of
                # every account waiting out the probe's timeout.
                provider.breaker = breaker_abandon_probe(provider.breaker, self.host.clock.time())

    async def _run(
        self, account: Account, provider: ProviderRuntime, admission: Admission, *, forced: bool
    ) -> Sent:
        host = self.host
        now = host.clock.time()
        if account.unsaved is not None:
            # A rotated token still waits for its commit: that comes before any request.
            await self.commit_unsaved(account)
            return "not_sent"
        if account.state is AccountState.NEEDS_REAUTH or unusable(account, provider):
            return "not_sent"
        if forced and refreshed_since(account, account.force_requested_at):
            return "not_sent"  # a refresh finished after the request: it has its token
        if not forced and account.next_attempt_at is not None and now < account.next_attempt_at - 1:
            # Woken early (a clock jump, a coalesced wake-up): keep the schedule.
            host.schedule(account, account.next_attempt_at)
            return "not_sent"
        client = provider.client
        assert client is not None

        # -- claim ---------------------------------------------------------------------
        if not await self._claim(account, provider):
            return "not_sent"
        try:
            # -- reload ------------------------------------------------------------------
            if await self._reload(account) and not forced:
                return "not_sent"
            # -- mark ----------------------------------------------------------------------
            if account.config.grant == "refresh_token" and not await self._mark_in_flight(
                account, provider
            ):
                return "not_sent"
            if not admission.probe and provider.breaker.status is not BreakerStatus.CLOSED:
                # The breaker opened (a 429, a 403) while this request was getting ready:
                # it is not sent after all.
                await self._withdraw_in_flight_mark(account)
                hold_for_breaker(host, account, provider, provider.breaker.opened_until)
                return "not_sent"
            # -- exchange, commit, write back, publish --------------------------------------
            resend = await self._exchange(account, provider, client, admission)
            if resend:
                # The answer was lost inside the IdP's reuse grace: the same token once
                # more, at once, before anything else.
                await self._exchange(account, provider, client, admission)
            return "sent"
        finally:
            # -- release -------------------------------------------------------------------
            await self._release(account)

    # -- claim and release ---------------------------------------------------------------

    async def _claim(self, account: Account, provider: ProviderRuntime) -> bool:
        host = self.host
        try:
            claimed = await host.store.claim(account.name, host.owner, provider.config.timeout + 30)
        except StoreError as exc:
            await self._on_failure(account, provider, _store_unavailable(exc), 0.0)
            return False
        if not claimed:
            # Another process or replica refreshes this account; look again shortly.
            # A live replica that owns it publishes its tokens here as it writes them:
            # then look again only once the token it holds has expired (a takeover
            # reschedules the account the moment this replica becomes the owner).
            at = host.clock.time() + 5.0
            store = host.store
            token = account.published
            if isinstance(store, SharedStore) and store.owned_elsewhere(account.name) and token:
                at = max(at, token.expires_at)
            host.schedule(account, at)
        return claimed

    async def _release(self, account: Account) -> None:
        try:
            with anyio.CancelScope(shield=True), anyio.move_on_after(COMMIT_TIMEOUT):
                await self.host.store.release(account.name, self.host.owner)
        except StoreError as exc:
            # A shared store's claim lapses by itself after its TTL.
            _log.warning("store_release_failed", account=account.name, error=str(exc))

    # -- reload --------------------------------------------------------------------------

    async def _reload(self, account: Account) -> bool:
        """Adopt the stored record if someone else wrote a newer one. True if the
        adopted token makes this refresh unnecessary."""
        try:
            stored = await self.host.store.load(account.name)
        except StoreError as exc:
            _log.warning("store_read_failed", account=account.name, error=str(exc))
            return False
        if stored is None or stored.version <= account.record.version:
            return False
        return await adopt_record(self.host, account, stored)

    # -- mark ----------------------------------------------------------------------------

    async def _mark_in_flight(self, account: Account, provider: ProviderRuntime) -> bool:
        # Durably note that the token is about to leave: after a crash, a restart knows
        # the IdP may have rotated it.
        try:
            account.record = await put(
                self.host, account.record.evolve(in_flight_since=self.host.clock.time())
            )
        except StoreConflict:
            # Written elsewhere meanwhile: adopt it and look again, never overwrite it.
            await self._reload(account)
            self.host.schedule(account, self.host.clock.time() + 1.0)
            return False
        except StoreError as exc:
            await self._on_failure(account, provider, _store_unavailable(exc), 0.0)
            return False
        return True

    async def _withdraw_in_flight_mark(self, account: Account) -> None:
        if account.record.in_flight_since is None:
            return
        try:
            account.record = await put(self.host, account.record.evolve(in_flight_since=None))
        except StoreError as exc:
            # Harmless if it stays: it only makes the next invalid_grant's message
            # mention a possibly lost response, and a restart retry this one first.
            _log.warning("store_write_failed", account=account.name, error=str(exc))

    # -- exchange ------------------------------------------------------------------------

    async def _exchange(
        self,
        account: Account,
        provider: ProviderRuntime,
        client: ProviderClient,
        admission: Admission,
    ) -> bool:
        """One token request and its consequences. True if the policy asks to resend
        the same refresh token at once (a lost response inside the reuse grace)."""
        host = self.host
        previous_state = account.state
        account.state = AccountState.REFRESHING
        refresh_token = account.record.refresh_token
        started = host.clock.monotonic()
        outcome: Outcome
        try:
            if account.config.grant == "refresh_token":
                assert refresh_token is not None
                outcome = await client.refresh(refresh_token, account.config.scope)
            else:
                outcome = await client.client_credentials(account.config.scope)
        except BaseException:
            # Cancelled mid-request (a drain's deadline): the in-flight mark stays, so a
            # restart retries this account first.
            account.state = previous_state
            raise
        finally:
            admission.done_with_provider()
        duration = host.clock.monotonic() - started
        record_breaker(host, provider, outcome)
        if isinstance(outcome, TokenResponse):
            await self._on_success(account, provider, outcome, refresh_token, duration)
            return False
        account.state = previous_state
        grant = account.config.grant
        rotated = outcome.rotated_refresh_token if grant == "refresh_token" else None
        if rotated is not None and not await self._keep_rotated(account, rotated, refresh_token):
            return False  # held unsaved: its commit comes before any other request
        return await self._on_failure(account, provider, outcome, duration)

    async def _keep_rotated(
        self, account: Account, rotated: str, used_refresh_token: str | None
    ) -> bool:
        """The answer was refused, but the refresh token it rotated to is usable: it is
        the only live one now, so it is committed like any other (durable first)."""
        register_secret(rotated)
        now = self.host.clock.time()
        # A new refresh token: its idle window starts now.
        record = account.record.evolve(
            refresh_token=rotated, in_flight_since=None, updated_at=now, refresh_used_at=now
        )
        published = account.published
        with anyio.CancelScope(shield=True):
            committed = await self.commit(account, record)
        if committed:
            if rotated != used_refresh_token:
                forget_secret(used_refresh_token)
            # The access token still served is the one from before: its refresh is due
            # as the policy's retry says, not as its own expiry would.
            account.last_refresh_at = published.issued_at if published else None
        return committed

    # -- commit, write back, publish -------------------------------------------------------

    async def _on_success(
        self,
        account: Account,
        provider: ProviderRuntime,
        response: TokenResponse,
        used_refresh_token: str | None,
        duration: float,
    ) -> None:
        host = self.host
        now = host.clock.time()
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
        if used_refresh_token is not None:
            # The refresh token was used, and lives on (idle limits count from here).
            reported = response.refresh_expires_in
            expires_at, fixed = idp_expiry_after_use(
                account.chain, None if reported is None else now + reported, now
            )
            record = record.evolve(
                refresh_used_at=now, refresh_expires_at=expires_at, refresh_expiry_fixed=fixed
            )
        rotated = (
            response.refresh_token is not None and response.refresh_token != used_refresh_token
        )
        account.policy = account_after_success(account.policy)
        replaced = account.published
        # From here on the answer exists only in this process: no cancellation may come
        # between it and the store.
        with anyio.CancelScope(shield=True):
            committed = await self.commit(account, record)
        if committed:
            retire_secrets(account, replaced, used_refresh_token if rotated else None)
            if account.record.token is not None:
                # Published before the refresh is logged: whoever reads the log line
                # finds the new token in every output.
                await publish(host, account, account.record.token)
        next_at = account.next_attempt_at
        outcome = "success" if committed else "unsaved"
        for observer in host.observers:
            observer.refresh_finished(account.provider, outcome, duration)
        _log.info(
            "refresh",
            account=account.name,
            provider=account.provider,
            outcome=outcome,
            duration_ms=round(duration * 1000, 1),
            rotated=rotated,
            expires_at=iso(token.expires_at),
            next_refresh_at=iso(next_at) if next_at else None,
        )

    async def commit(self, account: Account, record: StoredAccount) -> bool:
        """Durably store ``record`` (bounded by :data:`COMMIT_TIMEOUT`) and set the next
        refresh from its token. On a store failure the record waits in memory (state
        ``unsaved``), nothing is published, and a retry is scheduled."""
        host = self.host
        error: str | None = None
        stored: StoredAccount | None = None
        with anyio.move_on_after(COMMIT_TIMEOUT):
            try:
                stored = await put(host, record)
            except StoreConflict as exc:
                # Someone else wrote a newer chain: adopt it, never write over it.
                error = str(exc)
                await self._adopt_after_conflict(account, record)
                return False
            except StoreError as exc:
                error = str(exc)
        if stored is None:
            self._hold_unsaved(account, record, error or "the store did not answer in time")
            return False
        account.record = stored
        account.unsaved = None
        account.commit_failures = 0
        account.last_error = None
        account.last_refresh_at = host.clock.time()
        account.state = AccountState.VALID
        if stored.token is not None:
            # The next refresh is set before the token is handed out, so nobody who
            # sees the new token sees the old schedule beside it.
            jitter = host.rng.uniform(-1, 1)
            host.schedule(account, planned_refresh_at(account, stored.token, jitter))
        await self.write_back(account)
        return True

    def _hold_unsaved(self, account: Account, record: StoredAccount, error: str) -> None:
        host = self.host
        account.unsaved = record
        account.state = AccountState.UNSAVED
        account.last_error = f"could not save the new token: {error}"
        delay = retry_delay(_COMMIT_BACKOFF, account.commit_failures, host.rng.random(), None)
        account.commit_failures += 1
        _log.error(
            "commit_failed",
            account=account.name,
            error=error,
            retry_in_s=round(delay, 2),
            detail="the rotated refresh token is held in memory and nothing new is "
            "published until it is saved",
        )
        host.schedule(account, host.clock.time() + delay)

    async def _adopt_after_conflict(self, account: Account, ours: StoredAccount) -> None:
        host = self.host
        try:
            stored = await host.store.load(account.name)
        except StoreError:
            stored = None
        _log.error(
            "store_conflict",
            account=account.name,
            detail="another writer stored a newer record for this account while it "
            "refreshed; tokend adopts the stored chain and does not write over it",
            stored_version=stored.version if stored else None,
            our_version=ours.version,
        )
        if stored is not None:
            await adopt_record(host, account, stored)
        host.schedule(account, host.clock.time() + 1.0)

    async def write_back(self, account: Account) -> None:
        """Write the committed refresh token back to the seed's source (a vault), and
        record that the seed is now that token."""
        sink = self.host.write_back
        if sink is None or not sink.applies_to(account.name):
            return
        stored = account.record
        seed_fp: str | None = None
        error: str | None = None
        # Bounded like a commit: it runs shielded, and a drain waits for it.
        with anyio.move_on_after(COMMIT_TIMEOUT) as deadline:
            try:
                seed_fp = await sink.write_back(account.name, stored)
            except Exception as exc:
                error = str(exc)
        if deadline.cancelled_caught:
            error = f"no answer within {COMMIT_TIMEOUT:g} s"
        if error is not None:
            # The local store holds the token: it is the journal the retry reads.
            sink.note(account.name, stored)
            account.writeback_pending = True
            _log.warning("write_back_failed", account=account.name, error=error)
            return
        account.writeback_pending = False
        if seed_fp is None or seed_fp == stored.seed_fingerprint:
            return
        # Kept in memory and stored with the record's next write (the next refresh's
        # in-flight mark), not with a commit of its own: that would cost a second fsync
        # per refresh. Lost in a crash, it costs nothing either: the next start finds
        # the stored token in the vault and goes on from it.
        if account.record is stored:
            account.record = stored.evolve(seed_fingerprint=seed_fp)

    async def commit_unsaved(self, account: Account) -> None:
        record = account.unsaved
        if record is None:
            return
        with anyio.CancelScope(shield=True):
            committed = await self.commit(account, record.evolve(version=account.record.version))
        if committed:
            _log.info("commit_recovered", account=account.name)
            if account.record.token is not None:
                await publish(self.host, account, account.record.token)

    # -- failure -----------------------------------------------------------------------

    async def _on_failure(
        self,
        account: Account,
        provider: ProviderRuntime,
        failure: TokenFailure,
        duration: float,
    ) -> bool:
        """Record a failed refresh and decide what next. True: resend the same refresh
        token at once (a lost response inside the provider's reuse grace)."""
        host = self.host
        now = host.clock.time()
        token = account.published
        decision = account_after_failure(
            account.policy,
            failure,
            now=now,
            token_expires_at=token.expires_at if token else None,
            backoff=provider.backoff,
            u=host.rng.random(),
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
            with anyio.CancelScope(shield=True), anyio.move_on_after(COMMIT_TIMEOUT):
                account.record = await put(host, record)
        except StoreError as exc:
            _log.warning("store_write_failed", account=account.name, error=str(exc))
        previous = account.state
        account.state = decision.state
        if decision.next_attempt_at is not None and not decision.retry_same_token_now:
            host.schedule(account, decision.next_attempt_at)
        else:
            account.next_attempt_at = decision.next_attempt_at
        for observer in host.observers:
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
            next_attempt_at=iso(decision.next_attempt_at) if decision.next_attempt_at else None,
        )
        return bool(decision.retry_same_token_now)


# -- steps shared with the engine (start, reload, replicas) ----------------------------------


async def put(host: RefreshHost, record: StoredAccount) -> StoredAccount:
    """``store.put`` with its duration reported. A conflict is raised, never answered
    by writing on top: the newer record may hold the only live refresh token."""
    started = host.clock.monotonic()
    stored = await host.store.put(record)
    duration = host.clock.monotonic() - started
    for observer in host.observers:
        observer.store_committed(duration)
    return stored


async def publish(host: RefreshHost, account: Account, token: TokenSet) -> None:
    account.published = token
    host.token_published(account, token)
    for publisher in host.publishers:
        await publisher.publish(account.name, token)


async def adopt_record(
    host: RefreshHost, account: Account, stored: StoredAccount, *, followed: bool = False
) -> bool:
    """Take ``stored``, written elsewhere (another process or replica, an operator's
    tool), as the account's record. True if its token is fresh enough that no refresh is
    due now. ``followed``: a record the owning replica wrote, handed over by a shared
    store's watch; routine (every refresh of every account followed), so logged at
    debug level only."""
    now = host.clock.time()
    account.record = stored
    account.unsaved = None
    register_secret(stored.refresh_token)
    token = stored.token
    current = account.published
    if token is None or not token.is_valid(now):
        return False
    if current is None or token.expires_at > current.expires_at:
        register_secret(token.access_token)
        account.state = AccountState.VALID
        account.last_refresh_at = token.issued_at
        host.schedule(account, planned_refresh_at(account, token, host.rng.uniform(-1, 1)))
        await publish(host, account, token)
        log = _log.debug if followed else _log.info
        log("record_adopted", account=account.name, version=stored.version)
    return planned_refresh_at(account, token, 0.0) > now


def planned_refresh_at(account: Account, token: TokenSet, jitter: float) -> float:
    """When to refresh ``account`` holding ``token``: ahead of its expiry, or sooner
    when its refresh token would otherwise die of idleness (``jitter`` in [-1, 1])."""
    due = refresh_at(account.timing, token.issued_at, token.expires_at, jitter)
    return next_refresh_at(due, account.keepalive_at)


def hold_for_breaker(
    host: RefreshHost, account: Account, provider: ProviderRuntime, retry_at: float | None
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
        host.schedule(account, retry_at + host.rng.uniform(0, 1.0))
    if previous is not AccountState.BLOCKED:
        _log.warning(
            "account_blocked",
            account=account.name,
            provider=provider.name,
            error=account.last_error,
            next_attempt_at=iso(account.next_attempt_at) if account.next_attempt_at else None,
        )


def record_breaker(host: RefreshHost, provider: ProviderRuntime, outcome: Outcome) -> None:
    before = provider.breaker
    result: TokenFailure | Literal["success"] = (
        "success" if isinstance(outcome, TokenResponse) else outcome
    )
    after = breaker_record(before, provider.breaker_policy, result, host.clock.time())
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
            reopens_probe_at=iso(after.opened_until) if after.opened_until else None,
            cooldown_s=after.cooldown,
        )


def retire_secrets(
    account: Account, replaced: TokenSet | None, spent_refresh_token: str | None
) -> None:
    """Keep the log redactor's set bounded (it would otherwise grow by two tokens per
    refresh, forever): drop the spent refresh token and the access token from two
    refreshes ago. The one just replaced may still be valid, so it stays redacted
    until the next refresh."""
    forget_secret(spent_refresh_token)
    forget_secret(account.retired_access_token)
    account.retired_access_token = replaced.access_token if replaced else None


def unusable(account: Account, provider: ProviderRuntime) -> bool:
    if provider.client is None:
        account.last_error = provider.setup_error or "provider is not set up"
        return True
    return account.config.grant == "refresh_token" and account.record.refresh_token is None


def refreshed_since(account: Account, since: float | None) -> bool:
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


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="seconds")
