"""A circuit breaker per provider: when the IdP itself is failing, stop every account
of that provider from asking, and let a single probe find out when it is back.

States:

- ``closed``: requests flow; consecutive transient failures are counted.
- ``open``: nothing is sent until ``opened_until``; ``permanent`` means until the
  provider's configuration changes (the IdP refused this client's credentials).
- ``half_open``: the cooldown has elapsed and exactly one probe request is in flight;
  every other caller waits for its outcome. ``half_open`` holds only while that probe
  is in flight, so ``probe_in_flight`` is true exactly when the status is half-open.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, replace
from typing import Literal

from tokend.oauth import FailureKind, TokenFailure

# However short a Retry-After, the breaker stays open at least this long, so an IdP
# answering 429 with "Retry-After: 0" cannot turn the probe into a tight loop.
_MIN_OPEN = 1.0


class BreakerStatus(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """When a provider's breaker opens and for how long."""

    # Consecutive transient failures, across all of the provider's accounts.
    failure_threshold: int = 5
    cooldown_initial: float = 30.0
    cooldown_max: float = 1800.0
    cooldown_multiplier: float = 2.0
    # While the probe is in flight, other callers ask again after
    # min(cooldown, probe_recheck) seconds.
    probe_recheck: float = 5.0
    # A probe whose outcome is never recorded (its task was cancelled and nobody
    # called breaker_abandon_probe) is presumed lost after this long, so a provider
    # cannot stay half-open forever. Keep it above the provider's request timeout.
    probe_timeout: float = 300.0
    # The longest Retry-After honoured, as in BackoffPolicy: past it, a probe asks.
    retry_after_cap: float = 3600.0

    def __post_init__(self) -> None:
        if self.failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if not (math.isfinite(self.cooldown_initial) and self.cooldown_initial > 0):
            raise ValueError("cooldown_initial must be a positive number of seconds")
        if not (math.isfinite(self.cooldown_max) and self.cooldown_max >= self.cooldown_initial):
            raise ValueError("cooldown_max must be at least cooldown_initial")
        if not (math.isfinite(self.cooldown_multiplier) and self.cooldown_multiplier >= 1):
            raise ValueError("cooldown_multiplier must be at least 1")
        if not (math.isfinite(self.probe_recheck) and self.probe_recheck > 0):
            raise ValueError("probe_recheck must be a positive number of seconds")
        if not (math.isfinite(self.probe_timeout) and self.probe_timeout > 0):
            raise ValueError("probe_timeout must be a positive number of seconds")
        if not (math.isfinite(self.retry_after_cap) and self.retry_after_cap >= _MIN_OPEN):
            raise ValueError("retry_after_cap must be at least one second")


@dataclass(frozen=True, slots=True)
class BreakerState:
    """One provider's breaker. Start from ``breaker_reset(policy)``."""

    status: BreakerStatus = BreakerStatus.CLOSED
    # While open: when the next probe may go. None when closed, half-open or permanent.
    opened_until: float | None = None
    # The cooldown of the current (or the next) opening.
    cooldown: float = 30.0
    # Transient failures in a row while closed.
    consecutive_failures: int = 0
    # Open until the configuration changes (invalid_client and the like).
    permanent: bool = False
    probe_in_flight: bool = False
    # While a probe is in flight: when it is presumed lost.
    probe_deadline: float | None = None
    # The failure that last opened (or kept open) the breaker, for logs and status.
    last_reason: str | None = None

    def shifted(self, delta: float) -> BreakerState:
        """After a wall-clock step of ``delta``: a cooldown keeps its real length."""
        return replace(
            self,
            opened_until=None if self.opened_until is None else self.opened_until + delta,
            probe_deadline=None if self.probe_deadline is None else self.probe_deadline + delta,
        )


@dataclass(frozen=True, slots=True)
class Admission:
    """The breaker's answer to "may this provider be asked now?"."""

    allowed: bool
    # When denied: when to ask again. None: not before the configuration changes.
    retry_at: float | None = None
    # The request allowed is the half-open probe: its outcome must be recorded (or the
    # probe abandoned), since every other caller is held until then.
    probe: bool = False


BreakerOutcome = Literal["success"] | FailureKind | TokenFailure

_DEFAULT_POLICY = BreakerPolicy()


def breaker_reset(policy: BreakerPolicy) -> BreakerState:
    """A closed breaker: the starting state, and the state after a configuration change."""
    return BreakerState(cooldown=policy.cooldown_initial)


def breaker_admit(
    state: BreakerState, now: float, policy: BreakerPolicy = _DEFAULT_POLICY
) -> tuple[Admission, BreakerState]:
    """Whether a request to the provider may go now, and the breaker after deciding.

    The returned state must replace the old one: letting the probe through is itself a
    transition. Ask at the moment of sending (after the rate limit and a concurrency
    slot were obtained), so an admitted probe goes out at once and others do not wait
    on a probe that is itself still queued.
    """
    if state.permanent:
        return Admission(allowed=False, retry_at=None), state
    if state.status is BreakerStatus.CLOSED:
        return Admission(allowed=True), state
    if state.status is BreakerStatus.OPEN:
        opened_until = state.opened_until if state.opened_until is not None else now
        if now < opened_until:
            return Admission(allowed=False, retry_at=opened_until), state
        return _start_probe(state, now, policy)
    # Half-open: one probe is in flight.
    deadline = state.probe_deadline if state.probe_deadline is not None else now
    if now >= deadline:
        # The probe never reported back; presume it lost and send another, still one.
        return _start_probe(state, now, policy)
    recheck = now + min(state.cooldown, policy.probe_recheck)
    return Admission(allowed=False, retry_at=min(recheck, deadline)), state


def _start_probe(
    state: BreakerState, now: float, policy: BreakerPolicy
) -> tuple[Admission, BreakerState]:
    probing = replace(
        state,
        status=BreakerStatus.HALF_OPEN,
        opened_until=None,
        probe_in_flight=True,
        probe_deadline=now + policy.probe_timeout,
    )
    return Admission(allowed=True, probe=True), probing


def breaker_abandon_probe(state: BreakerState, now: float) -> BreakerState:
    """The probe will never be answered (its task was cancelled before a response):
    let the next caller probe instead, at once, without lengthening the cooldown."""
    if state.status is not BreakerStatus.HALF_OPEN or state.permanent:
        return state
    return _open(state, until=now, cooldown=state.cooldown, reason=state.last_reason)


def breaker_record(
    state: BreakerState,
    policy: BreakerPolicy,
    outcome: BreakerOutcome,
    now: float,
    *,
    retry_after: float | None = None,
    reason: str | None = None,
) -> BreakerState:
    """The breaker after a request to the provider came to ``outcome``.

    ``outcome`` is ``"success"``, a ``FailureKind``, or the ``TokenFailure`` itself (its
    ``retry_after`` and ``reason`` are then used unless given here).

    - success: closes the breaker and resets the cooldown.
    - TRANSIENT: counts; the ``failure_threshold``-th in a row opens the breaker.
    - RATE_LIMITED: opens it until Retry-After (or for the cooldown without one), so
      no account of the provider asks before then. It is not counted as transient.
    - BLOCKED (403): opens it at once, for the cooldown.
    - PROVIDER_PERMANENT: opens it until the configuration changes.
    - ACCOUNT_PERMANENT: only that account's grant is dead, and the answer shows the
      IdP is up, so it resets the transient count (and closes a half-open breaker).

    In half-open, the outcome is the probe's: a failed probe reopens the breaker with
    the cooldown multiplied (up to ``cooldown_max``). While open, outcomes of requests
    let through before it opened are stale: they do not close it or lengthen the
    cooldown, though a 429 or 403 may extend the opening and an invalid_client still
    makes it permanent.
    """
    kind, retry_after, reason = _unpack(outcome, retry_after, reason)
    if state.permanent:
        return state
    if kind is FailureKind.PROVIDER_PERMANENT:
        return replace(
            state,
            status=BreakerStatus.OPEN,
            opened_until=None,
            consecutive_failures=0,
            permanent=True,
            probe_in_flight=False,
            probe_deadline=None,
            last_reason=reason,
        )
    if state.status is BreakerStatus.CLOSED:
        return _record_closed(state, policy, kind, now, retry_after, reason)
    if state.status is BreakerStatus.HALF_OPEN:
        return _record_probe(state, policy, kind, now, retry_after, reason)
    return _record_while_open(state, policy, kind, now, retry_after, reason)


def _record_closed(
    state: BreakerState,
    policy: BreakerPolicy,
    kind: FailureKind | None,
    now: float,
    retry_after: float | None,
    reason: str | None,
) -> BreakerState:
    if kind is None or kind is FailureKind.ACCOUNT_PERMANENT:
        if state.consecutive_failures == 0 and state.last_reason is None:
            return state
        return replace(state, consecutive_failures=0, last_reason=None)
    if kind is FailureKind.TRANSIENT:
        failures = state.consecutive_failures + 1
        if failures < policy.failure_threshold:
            return replace(state, consecutive_failures=failures, last_reason=reason)
        return _open(state, until=now + state.cooldown, cooldown=state.cooldown, reason=reason)
    if kind is FailureKind.RATE_LIMITED:
        until = now + _rate_limited_for(policy, retry_after, state.cooldown)
        return _open(state, until=until, cooldown=state.cooldown, reason=reason)
    # BLOCKED
    return _open(state, until=now + state.cooldown, cooldown=state.cooldown, reason=reason)


def _record_probe(
    state: BreakerState,
    policy: BreakerPolicy,
    kind: FailureKind | None,
    now: float,
    retry_after: float | None,
    reason: str | None,
) -> BreakerState:
    if kind is None or kind is FailureKind.ACCOUNT_PERMANENT:
        return breaker_reset(policy)
    longer = min(policy.cooldown_max, state.cooldown * policy.cooldown_multiplier)
    if kind is FailureKind.RATE_LIMITED and retry_after is not None:
        # The IdP said when to come back; the escalation is for guessing, not for this.
        until = now + _rate_limited_for(policy, retry_after, state.cooldown)
        return _open(state, until=until, cooldown=state.cooldown, reason=reason)
    return _open(state, until=now + longer, cooldown=longer, reason=reason)


def _record_while_open(
    state: BreakerState,
    policy: BreakerPolicy,
    kind: FailureKind | None,
    now: float,
    retry_after: float | None,
    reason: str | None,
) -> BreakerState:
    if kind is FailureKind.RATE_LIMITED:
        until = now + _rate_limited_for(policy, retry_after, state.cooldown)
    elif kind is FailureKind.BLOCKED:
        until = now + state.cooldown
    else:
        return state
    current = state.opened_until if state.opened_until is not None else now
    if until <= current:
        return state
    return replace(state, opened_until=until, last_reason=reason)


def _open(
    state: BreakerState, *, until: float, cooldown: float, reason: str | None
) -> BreakerState:
    return replace(
        state,
        status=BreakerStatus.OPEN,
        opened_until=until,
        cooldown=cooldown,
        consecutive_failures=0,
        probe_in_flight=False,
        probe_deadline=None,
        last_reason=reason,
    )


def _rate_limited_for(policy: BreakerPolicy, retry_after: float | None, cooldown: float) -> float:
    if retry_after is None or math.isnan(retry_after):
        return cooldown
    return min(policy.retry_after_cap, max(_MIN_OPEN, retry_after))


def _unpack(
    outcome: BreakerOutcome, retry_after: float | None, reason: str | None
) -> tuple[FailureKind | None, float | None, str | None]:
    if isinstance(outcome, TokenFailure):
        return (
            outcome.kind,
            retry_after if retry_after is not None else outcome.retry_after,
            reason if reason is not None else outcome.reason,
        )
    if outcome == "success":
        return None, None, None
    return FailureKind(outcome), retry_after, reason if reason is not None else outcome.value
