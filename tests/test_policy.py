"""The failure-handling policy: backoff, provider breaker, rate limit, account decisions."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokend.model import AccountState
from tokend.oauth import FailureKind, TokenFailure
from tokend.policy import (
    AccountPolicyState,
    BackoffPolicy,
    BreakerOutcome,
    BreakerPolicy,
    BreakerState,
    BreakerStatus,
    BucketState,
    ChainTimes,
    RateLimit,
    RefreshLifetime,
    RefreshTiming,
    account_after_failure,
    account_after_lost_response,
    account_after_success,
    backoff_ceiling,
    breaker_abandon_probe,
    breaker_admit,
    breaker_record,
    breaker_reset,
    bucket_full,
    bucket_reserve,
    bucket_take,
    idp_expiry_after_use,
    is_lost_response,
    keepalive_at,
    keepalive_margin,
    next_refresh_at,
    reauth_deadline,
    reauth_warning,
    refresh_at,
    retry_delay,
    should_request,
)
from tokend.policy._lifetime import KEEPALIVE_MIN_INTERVAL

BACKOFF = BackoffPolicy()
BREAKER = BreakerPolicy()
UNIT = st.floats(min_value=0.0, max_value=1.0, exclude_max=True)


def failure(
    kind: FailureKind,
    reason: str = "x",
    *,
    status: int | None = 500,
    retry_after: float | None = None,
    request_sent: bool = True,
) -> TokenFailure:
    return TokenFailure(
        kind, reason, status=status, retry_after=retry_after, request_sent=request_sent
    )


TIMEOUT = failure(FailureKind.TRANSIENT, "timeout", status=None)
HTTP_503 = failure(FailureKind.TRANSIENT, "http_503", status=503)
INVALID_GRANT = failure(FailureKind.ACCOUNT_PERMANENT, "invalid_grant", status=400)


# --- backoff ---------------------------------------------------------------------------


def test_ceiling_doubles_from_initial_up_to_maximum() -> None:
    ceilings = [backoff_ceiling(BACKOFF, attempt) for attempt in range(12)]
    assert ceilings == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]


@pytest.mark.parametrize("attempt", [1_100, 10**6, 2**63, 10**400])
def test_ceiling_does_not_overflow_for_huge_attempts(attempt: int) -> None:
    assert backoff_ceiling(BACKOFF, attempt) == 300.0
    assert retry_delay(BACKOFF, attempt, 0.5, None) == 150.0


def test_slow_growth_still_reaches_the_maximum() -> None:
    slow = BackoffPolicy(multiplier=1.000001)
    assert backoff_ceiling(slow, 10**6) == pytest.approx(math.e, rel=1e-5)
    assert backoff_ceiling(slow, 10**7) == 300.0
    assert backoff_ceiling(slow, 10**400) == 300.0


def test_negative_attempt_counts_as_first() -> None:
    assert backoff_ceiling(BACKOFF, -3) == 1.0


def test_delay_never_below_floor_so_a_zero_draw_does_not_spin() -> None:
    assert retry_delay(BACKOFF, 0, 0.0, None) == pytest.approx(0.1)
    assert retry_delay(BACKOFF, 20, 0.0, None) == pytest.approx(0.1)


def test_full_jitter_scales_the_ceiling() -> None:
    assert retry_delay(BACKOFF, 3, 0.5, None) == 4.0
    assert retry_delay(BACKOFF, 3, 0.999, None) == pytest.approx(7.992)


def test_retry_after_is_a_lower_bound() -> None:
    assert retry_delay(BACKOFF, 0, 0.5, 42.0) == 42.0
    # A longer backoff is not shortened by a short Retry-After.
    assert retry_delay(BACKOFF, 10, 0.5, 2.0) == 150.0


@pytest.mark.parametrize("retry_after", [10_000.0, 86_400.0 * 30, math.inf])
def test_retry_after_is_capped(retry_after: float) -> None:
    assert retry_delay(BACKOFF, 0, 0.5, retry_after) == 3600.0


@pytest.mark.parametrize("retry_after", [math.nan, -5.0, 0.0])
def test_meaningless_retry_after_is_ignored(retry_after: float) -> None:
    assert retry_delay(BACKOFF, 2, 0.5, retry_after) == 2.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"initial": 0.0},
        {"initial": 10.0, "maximum": 5.0},
        {"multiplier": 0.5},
        {"retry_after_cap": -1.0},
        {"maximum": math.inf},
    ],
)
def test_backoff_policy_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        BackoffPolicy(**kwargs)


backoff_policies = st.builds(
    BackoffPolicy,
    initial=st.floats(0.01, 100.0),
    maximum=st.floats(100.0, 10_000.0),
    multiplier=st.floats(1.0, 10.0),
    retry_after_cap=st.floats(0.0, 10_000.0),
)


@given(
    backoff_policies,
    st.integers(min_value=-5, max_value=10**6),
    UNIT,
    st.none() | st.floats(allow_nan=True, allow_infinity=True),
)
def test_delay_stays_within_floor_and_the_larger_of_maximum_and_capped_retry_after(
    policy: BackoffPolicy, attempt: int, u: float, retry_after: float | None
) -> None:
    delay = retry_delay(policy, attempt, u, retry_after)
    capped = 0.0
    if retry_after is not None and not math.isnan(retry_after) and retry_after > 0:
        capped = min(retry_after, policy.retry_after_cap)
        assert delay >= capped
    assert math.isfinite(delay)
    assert policy.floor <= delay <= max(policy.maximum, capped)


@given(backoff_policies, st.integers(min_value=0, max_value=5_000))
def test_ceiling_grows_monotonically_to_the_maximum(policy: BackoffPolicy, attempt: int) -> None:
    low, high = backoff_ceiling(policy, attempt), backoff_ceiling(policy, attempt + 1)
    assert policy.initial <= low <= high <= policy.maximum


# --- breaker ---------------------------------------------------------------------------


def opened_by_transients(now: float = 0.0) -> BreakerState:
    state = breaker_reset(BREAKER)
    for _ in range(BREAKER.failure_threshold):
        state = breaker_record(state, BREAKER, FailureKind.TRANSIENT, now)
    return state


def test_closed_breaker_admits_everyone() -> None:
    state = breaker_reset(BREAKER)
    for now in range(10):
        admission, state = breaker_admit(state, float(now), BREAKER)
        assert admission.allowed and not admission.probe
    assert state == breaker_reset(BREAKER)


def test_opens_on_the_threshold_th_consecutive_transient_failure() -> None:
    state = breaker_reset(BREAKER)
    for _ in range(BREAKER.failure_threshold - 1):
        state = breaker_record(state, BREAKER, FailureKind.TRANSIENT, 100.0, reason="timeout")
        assert state.status is BreakerStatus.CLOSED
    state = breaker_record(state, BREAKER, FailureKind.TRANSIENT, 100.0, reason="timeout")
    assert state.status is BreakerStatus.OPEN
    assert state.opened_until == 130.0
    assert state.last_reason == "timeout"
    admission, state = breaker_admit(state, 129.9, BREAKER)
    assert not admission.allowed and admission.retry_at == 130.0


@pytest.mark.parametrize("answer", ["success", FailureKind.ACCOUNT_PERMANENT])
def test_an_answer_from_the_idp_resets_the_transient_count(answer: BreakerOutcome) -> None:
    state = breaker_reset(BREAKER)
    for _ in range(4):
        state = breaker_record(state, BREAKER, FailureKind.TRANSIENT, 0.0)
    state = breaker_record(state, BREAKER, answer, 0.0)
    assert state.consecutive_failures == 0
    for _ in range(4):
        state = breaker_record(state, BREAKER, FailureKind.TRANSIENT, 0.0)
    assert state.status is BreakerStatus.CLOSED


def test_rate_limited_opens_until_retry_after_without_counting_as_transient() -> None:
    state = breaker_reset(BREAKER)
    state = breaker_record(state, BREAKER, FailureKind.RATE_LIMITED, 10.0, retry_after=120.0)
    assert state.status is BreakerStatus.OPEN and state.opened_until == 130.0
    assert state.consecutive_failures == 0
    assert state.cooldown == BREAKER.cooldown_initial


def test_rate_limited_takes_retry_after_and_reason_from_the_failure() -> None:
    limited = failure(FailureKind.RATE_LIMITED, "http_429", status=429, retry_after=45.0)
    state = breaker_record(breaker_reset(BREAKER), BREAKER, limited, 0.0)
    assert state.opened_until == 45.0 and state.last_reason == "http_429"


def test_rate_limited_without_retry_after_opens_for_the_cooldown() -> None:
    state = breaker_record(breaker_reset(BREAKER), BREAKER, FailureKind.RATE_LIMITED, 0.0)
    assert state.opened_until == 30.0


def test_retry_after_zero_still_opens_briefly_and_a_huge_one_is_capped() -> None:
    state = breaker_record(
        breaker_reset(BREAKER), BREAKER, FailureKind.RATE_LIMITED, 0.0, retry_after=0.0
    )
    assert state.opened_until == 1.0
    state = breaker_record(
        breaker_reset(BREAKER), BREAKER, FailureKind.RATE_LIMITED, 0.0, retry_after=math.inf
    )
    assert state.opened_until == 3600.0


def test_blocked_opens_at_once() -> None:
    state = breaker_record(breaker_reset(BREAKER), BREAKER, FailureKind.BLOCKED, 5.0)
    assert state.status is BreakerStatus.OPEN and state.opened_until == 35.0
    assert state.last_reason == "blocked"


def test_half_open_lets_exactly_one_probe_through() -> None:
    state = opened_by_transients()
    probe, state = breaker_admit(state, 30.0, BREAKER)
    assert probe.allowed and probe.probe
    assert state.status is BreakerStatus.HALF_OPEN and state.probe_in_flight
    for now in (30.0, 31.0, 40.0, 200.0):
        other, state = breaker_admit(state, now, BREAKER)
        assert not other.allowed
        assert other.retry_at == now + 5.0


def test_successful_probe_closes_and_resets_the_cooldown() -> None:
    state = opened_by_transients()
    for now in (30.0, 120.0):  # two failed probes: cooldown 60, then 120
        _, state = breaker_admit(state, now, BREAKER)
        state = breaker_record(state, BREAKER, FailureKind.TRANSIENT, now)
    assert state.cooldown == 120.0
    _, state = breaker_admit(state, 240.0, BREAKER)
    state = breaker_record(state, BREAKER, "success", 240.5)
    assert state == breaker_reset(BREAKER)


def test_probe_answered_with_invalid_grant_shows_the_idp_is_up() -> None:
    state = opened_by_transients()
    _, state = breaker_admit(state, 30.0, BREAKER)
    state = breaker_record(state, BREAKER, FailureKind.ACCOUNT_PERMANENT, 30.5)
    assert state.status is BreakerStatus.CLOSED


def test_failed_probes_double_the_cooldown_up_to_the_cap() -> None:
    state = opened_by_transients()
    cooldowns = []
    now = 0.0
    for _ in range(9):
        assert state.opened_until is not None
        now = state.opened_until
        admission, state = breaker_admit(state, now, BREAKER)
        assert admission.probe
        state = breaker_record(state, BREAKER, FailureKind.BLOCKED, now)
        cooldowns.append(state.cooldown)
        assert state.opened_until == now + state.cooldown
    assert cooldowns == [60, 120, 240, 480, 960, 1800, 1800, 1800, 1800]


def test_probe_rate_limited_waits_for_retry_after_without_escalating() -> None:
    state = opened_by_transients()
    _, state = breaker_admit(state, 30.0, BREAKER)
    state = breaker_record(state, BREAKER, FailureKind.RATE_LIMITED, 30.0, retry_after=7.0)
    assert state.status is BreakerStatus.OPEN and state.opened_until == 37.0
    assert state.cooldown == 30.0


def test_provider_permanent_never_admits_until_reset() -> None:
    state = breaker_record(
        breaker_reset(BREAKER),
        BREAKER,
        FailureKind.PROVIDER_PERMANENT,
        0.0,
        reason="invalid_client",
    )
    assert state.permanent and state.last_reason == "invalid_client"
    state = breaker_record(state, BREAKER, "success", 1.0)
    for now in (0.0, 1e6, 1e12):
        admission, state = breaker_admit(state, now, BREAKER)
        assert not admission.allowed and admission.retry_at is None
    assert breaker_reset(BREAKER).status is BreakerStatus.CLOSED


def test_stale_outcomes_do_not_close_or_lengthen_an_open_breaker() -> None:
    state = opened_by_transients()
    for outcome in ("success", FailureKind.TRANSIENT, FailureKind.ACCOUNT_PERMANENT):
        assert breaker_record(state, BREAKER, outcome, 1.0) == state
    extended = breaker_record(state, BREAKER, FailureKind.RATE_LIMITED, 1.0, retry_after=100.0)
    assert extended.opened_until == 101.0 and extended.cooldown == state.cooldown
    # A shorter Retry-After never shortens an opening.
    assert breaker_record(extended, BREAKER, FailureKind.RATE_LIMITED, 2.0, retry_after=1) == (
        extended
    )


def test_abandoned_probe_lets_the_next_caller_probe_at_once() -> None:
    state = opened_by_transients()
    _, state = breaker_admit(state, 30.0, BREAKER)
    state = breaker_abandon_probe(state, 31.0)
    assert state.status is BreakerStatus.OPEN and state.cooldown == 30.0
    admission, state = breaker_admit(state, 31.0, BREAKER)
    assert admission.allowed and admission.probe


def test_probe_never_reported_is_presumed_lost_after_the_probe_timeout() -> None:
    policy = BreakerPolicy(probe_timeout=60.0)
    state = opened_by_transients()
    _, state = breaker_admit(state, 30.0, policy)
    denied, state = breaker_admit(state, 88.0, policy)
    assert not denied.allowed and denied.retry_at == 90.0
    again, state = breaker_admit(state, 90.0, policy)
    assert again.allowed and again.probe


@pytest.mark.parametrize(
    "kwargs",
    [
        {"failure_threshold": 0},
        {"cooldown_initial": 0.0},
        {"cooldown_initial": 60.0, "cooldown_max": 30.0},
        {"cooldown_multiplier": 0.5},
        {"probe_recheck": 0.0},
        {"probe_timeout": math.nan},
    ],
)
def test_breaker_policy_rejects_nonsense(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        BreakerPolicy(**kwargs)


ALL_OUTCOMES: list[BreakerOutcome] = ["success", *FailureKind]
outcomes = st.sampled_from(ALL_OUTCOMES)
breaker_events = st.lists(
    st.tuples(
        st.sampled_from(["admit", "admit", "admit", "complete", "complete", "abandon"]),
        st.floats(0.0, 200.0),
        outcomes,
        st.none() | st.floats(0.0, 5_000.0),
        st.integers(0, 1_000),
    ),
    max_size=120,
)


@settings(max_examples=300)
@given(breaker_events, st.sampled_from([60.0, 1e9]), st.integers(1, 6))
def test_breaker_admits_nothing_early_and_one_probe_at_a_time(
    events: list[tuple[str, float, BreakerOutcome, float | None, int]],
    probe_timeout: float,
    threshold: int,
) -> None:
    policy = BreakerPolicy(failure_threshold=threshold, probe_timeout=probe_timeout)
    state = breaker_reset(policy)
    now = 0.0
    in_flight: list[bool] = []  # one entry per admitted request: is it the probe?
    for op, dt, outcome, retry_after, pick in events:
        now += dt
        before = state
        if op == "admit":
            admission, state = breaker_admit(state, now, policy)
            if before.permanent:
                assert not admission.allowed and admission.retry_at is None
            elif before.status is BreakerStatus.OPEN:
                assert before.opened_until is not None
                # Nothing before the cooldown; the first caller after it probes.
                assert admission.allowed == (now >= before.opened_until)
                assert admission.probe == admission.allowed
            elif before.status is BreakerStatus.HALF_OPEN:
                assert before.probe_deadline is not None
                # A second probe only once the first is presumed lost.
                assert admission.allowed == (now >= before.probe_deadline)
            else:
                assert admission.allowed and not admission.probe
            if admission.allowed:
                in_flight.append(admission.probe)
            else:
                assert admission.retry_at is None or admission.retry_at > now
        elif op == "complete" and in_flight:
            in_flight.pop(pick % len(in_flight))
            state = breaker_record(state, policy, outcome, now, retry_after=retry_after)
        elif op == "abandon" and True in in_flight:
            in_flight.remove(True)
            state = breaker_abandon_probe(state, now)
        assert (state.status is BreakerStatus.HALF_OPEN) == state.probe_in_flight
        assert policy.cooldown_initial <= state.cooldown <= policy.cooldown_max
        if state.status is BreakerStatus.OPEN and not state.permanent:
            assert state.opened_until is not None
        if before.permanent:
            assert state.permanent


# --- rate limit ------------------------------------------------------------------------


def test_bucket_starts_full_then_paces_at_the_rate() -> None:
    limit = RateLimit()
    state = bucket_full(limit, 0.0)
    for _ in range(limit.burst):
        wait, state = bucket_take(state, limit, 0.0)
        assert wait == 0.0
    wait, state = bucket_take(state, limit, 0.0)
    assert wait == pytest.approx(0.1)
    refused_state = state
    wait, state = bucket_take(state, limit, 0.05)
    assert wait == pytest.approx(0.05)
    assert state.tokens == pytest.approx(0.5)  # refilled, not taken
    assert refused_state.tokens == 0.0
    wait, state = bucket_take(state, limit, 0.1)
    assert wait == 0.0


def test_reservations_spread_a_crowd_at_the_rate() -> None:
    limit = RateLimit()
    state = bucket_full(limit, 1000.0)
    starts = []
    for _ in range(10_000):
        start, state = bucket_reserve(state, limit, 1000.0)
        starts.append(start)
    assert starts[: limit.burst] == [1000.0] * limit.burst
    assert starts[limit.burst] == pytest.approx(1000.1)
    assert starts[-1] == pytest.approx(1000.0 + (10_000 - limit.burst) / limit.rate)
    assert starts == sorted(starts)
    # A take waits behind every reservation.
    wait, _ = bucket_take(state, limit, 1500.0)
    assert wait == pytest.approx(starts[-1] + 0.1 - 1500.0)


def test_a_backward_clock_step_neither_grants_nor_stalls() -> None:
    limit = RateLimit(rate=1.0, burst=1)
    _, state = bucket_take(bucket_full(limit, 100.0), limit, 100.0)
    wait, state = bucket_take(state, limit, 40.0)
    assert wait == pytest.approx(1.0)
    wait, state = bucket_take(state, limit, 41.0)
    assert wait == 0.0


@pytest.mark.parametrize("kwargs", [{"rate": 0.0}, {"rate": math.inf}, {"burst": 0}])
def test_rate_limit_rejects_nonsense(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        RateLimit(**kwargs)


bucket_ops = st.lists(st.tuples(st.floats(0.0, 3.0), st.booleans()), max_size=150)


@settings(max_examples=200)
@given(st.floats(0.5, 50.0), st.integers(1, 30), bucket_ops)
def test_bucket_never_grants_more_than_burst_plus_rate_times_window(
    rate: float, burst: int, ops: list[tuple[float, bool]]
) -> None:
    limit = RateLimit(rate=rate, burst=burst)
    now = 0.0
    state: BucketState = bucket_full(limit, now)
    granted: list[float] = []
    last_start = -math.inf
    for dt, reserve in ops:
        now += dt
        if reserve:
            start, state = bucket_reserve(state, limit, now)
            assert start >= now
            # First come, first served.
            assert start >= last_start - 1e-9
            last_start = start
            granted.append(start)
        else:
            wait, state = bucket_take(state, limit, now)
            if wait == 0.0:
                granted.append(now)
            else:
                assert wait > 0
                # Waiting as told is enough.
                assert bucket_take(state, limit, now + wait)[0] == 0.0
    granted.sort()
    for i, first in enumerate(granted):
        for j in range(i, len(granted)):
            assert j - i + 1 <= burst + rate * (granted[j] - first) + 1e-6


# --- account ---------------------------------------------------------------------------


def decide(
    state: AccountPolicyState,
    fail: TokenFailure,
    *,
    now: float = 1000.0,
    expires_at: float | None = 2000.0,
    u: float = 0.5,
    reuse_grace: float = 0.0,
) -> tuple[AccountState, float | None, AccountPolicyState, bool, str]:
    decision = account_after_failure(
        state,
        fail,
        now=now,
        token_expires_at=expires_at,
        backoff=BACKOFF,
        u=u,
        reuse_grace=reuse_grace,
    )
    return (
        decision.state,
        decision.next_attempt_at,
        decision.policy_state,
        decision.retry_same_token_now,
        decision.message,
    )


def test_transient_failures_retry_with_growing_backoff() -> None:
    state = AccountPolicyState()
    delays = []
    for _ in range(4):
        kind, next_at, state, same, message = decide(state, HTTP_503, u=0.5)
        assert kind is AccountState.RETRYING and not same
        assert next_at is not None
        delays.append(next_at - 1000.0)
    assert delays == [0.5, 1.0, 2.0, 4.0]
    assert state.consecutive_failures == 4
    assert "http_503, HTTP 503" in message
    assert "stays valid for 17 min" in message


def test_retries_continue_after_the_token_expired() -> None:
    kind, next_at, _, _, message = decide(AccountPolicyState(), HTTP_503, expires_at=900.0)
    assert kind is AccountState.RETRYING and next_at is not None
    assert "expired" in message
    _, _, _, _, message = decide(AccountPolicyState(), HTTP_503, expires_at=None)
    assert "no access token" in message


def test_rate_limited_account_waits_for_retry_after() -> None:
    limited = failure(FailureKind.RATE_LIMITED, "http_429", status=429, retry_after=90.0)
    kind, next_at, _, _, message = decide(AccountPolicyState(), limited)
    assert kind is AccountState.RETRYING and next_at == 1090.0
    assert "retry in 90 s" in message


def test_blocked_names_the_breaker_and_keeps_retrying() -> None:
    blocked = failure(FailureKind.BLOCKED, "html_block_page", status=403)
    kind, next_at, _, _, message = decide(AccountPolicyState(), blocked)
    assert kind is AccountState.BLOCKED and next_at is not None and next_at > 1000.0
    assert "circuit breaker" in message


def test_provider_permanent_blocks_until_the_configuration_changes() -> None:
    refused = failure(FailureKind.PROVIDER_PERMANENT, "invalid_client", status=401)
    kind, next_at, _, same, message = decide(AccountPolicyState(), refused)
    assert kind is AccountState.BLOCKED and next_at is None and not same
    assert "invalid_client" in message and "SIGHUP" in message


@pytest.mark.parametrize("reason", ["invalid_grant", "invalid_scope"])
def test_dead_grant_needs_reauth_and_is_never_retried(reason: str) -> None:
    dead = failure(FailureKind.ACCOUNT_PERMANENT, reason, status=400)
    kind, next_at, _, same, message = decide(AccountPolicyState(), dead, reuse_grace=60.0)
    assert kind is AccountState.NEEDS_REAUTH and next_at is None and not same
    assert message == (
        f"refresh token rejected ({reason}, HTTP 400); account needs re-authorization: "
        "run `tokend login ACCOUNT`, or supply a new seed token and send SIGHUP"
    )


def test_lost_response_within_the_grace_retries_the_same_token_once_at_once() -> None:
    kind, next_at, state, same, message = decide(AccountPolicyState(), TIMEOUT, reuse_grace=30.0)
    assert kind is AccountState.RETRYING and same and next_at == 1000.0
    assert state.grace_retry_used and "reuse grace" in message
    # The grace retry was lost too: back off, no second same-token retry now.
    kind, next_at, state, same, _ = decide(state, TIMEOUT, now=1001.0, reuse_grace=30.0)
    assert not same and next_at is not None and next_at > 1001.0
    # Then the IdP rejects the token: it had rotated it.
    kind, next_at, state, same, message = decide(state, INVALID_GRANT, now=1010.0)
    assert kind is AccountState.NEEDS_REAUTH and next_at is None and not same
    assert "earlier response was lost" in message and "SIGHUP" in message


def test_lost_response_without_a_grace_backs_off() -> None:
    kind, next_at, state, same, _ = decide(AccountPolicyState(), TIMEOUT)
    assert kind is AccountState.RETRYING and not same and next_at == 1000.5
    assert state.lost_response_at == 1000.0


def test_restart_after_a_lost_response_retries_only_within_the_grace() -> None:
    inside = account_after_lost_response(
        AccountPolicyState(), now=100.0, reuse_grace=30.0, lost_at=80.0, backoff=BACKOFF, u=0.5
    )
    assert inside.retry_same_token_now and inside.next_attempt_at == 100.0
    outside = account_after_lost_response(
        AccountPolicyState(), now=100.0, reuse_grace=30.0, lost_at=60.0, backoff=BACKOFF, u=0.5
    )
    assert not outside.retry_same_token_now and outside.next_attempt_at == 100.5
    assert outside.state is AccountState.RETRYING
    off = account_after_lost_response(
        AccountPolicyState(), now=100.0, reuse_grace=0.0, lost_at=99.0, backoff=BACKOFF, u=0.5
    )
    assert not off.retry_same_token_now


def test_success_resets_counts_and_the_grace() -> None:
    _, _, state, _, _ = decide(AccountPolicyState(), TIMEOUT, reuse_grace=30.0)
    _, _, state, _, _ = decide(state, HTTP_503)
    assert account_after_success(state) == AccountPolicyState()


@pytest.mark.parametrize(
    ("fail", "lost"),
    [
        (TIMEOUT, True),
        (failure(FailureKind.TRANSIENT, "connection_lost", status=None), True),
        (failure(FailureKind.TRANSIENT, "invalid_json", status=200), True),
        (failure(FailureKind.TRANSIENT, "http_504", status=504), True),
        (failure(FailureKind.TRANSIENT, "connect_error", status=None, request_sent=False), False),
        (HTTP_503, False),
        (INVALID_GRANT, False),
        (failure(FailureKind.RATE_LIMITED, "http_429", status=429), False),
    ],
)
def test_is_lost_response(fail: TokenFailure, lost: bool) -> None:
    assert is_lost_response(fail) is lost


def test_should_request() -> None:
    closed = breaker_reset(BREAKER)
    assert should_request(AccountState.VALID, closed, 0.0)
    assert should_request(AccountState.RETRYING, closed, 0.0)
    assert not should_request(AccountState.NEEDS_REAUTH, closed, 0.0)
    assert not should_request(AccountState.REFRESHING, closed, 0.0)
    opened = opened_by_transients()
    assert not should_request(AccountState.BLOCKED, opened, 29.0)
    assert should_request(AccountState.BLOCKED, opened, 30.0)
    _, probing = breaker_admit(opened, 30.0, BREAKER)
    assert not should_request(AccountState.BLOCKED, probing, 31.0)
    permanent = breaker_record(closed, BREAKER, FailureKind.PROVIDER_PERMANENT, 0.0)
    assert not should_request(AccountState.VALID, permanent, 1e9)


account_events = st.lists(
    st.tuples(
        st.floats(0.0, 120.0),
        st.sampled_from(
            [
                None,  # success
                TIMEOUT,
                HTTP_503,
                INVALID_GRANT,
                failure(FailureKind.RATE_LIMITED, "http_429", status=429, retry_after=20.0),
                failure(FailureKind.BLOCKED, "http_403", status=403),
                failure(FailureKind.PROVIDER_PERMANENT, "invalid_client", status=401),
            ]
        ),
        UNIT,
    ),
    max_size=60,
)


@settings(max_examples=300)
@given(account_events, st.sampled_from([0.0, 30.0]))
def test_no_request_with_a_dead_token_and_at_most_one_grace_retry_per_run(
    events: list[tuple[float, TokenFailure | None, float]], reuse_grace: float
) -> None:
    state = AccountPolicyState()
    now = 0.0
    grace_retries = 0
    for dt, fail, u in events:
        now += dt
        if fail is None:
            state = account_after_success(state)
            grace_retries = 0
            continue
        decision = account_after_failure(
            state,
            fail,
            now=now,
            token_expires_at=None,
            backoff=BACKOFF,
            u=u,
            reuse_grace=reuse_grace,
        )
        state = decision.policy_state
        assert decision.message
        if decision.retry_same_token_now:
            grace_retries += 1
            assert reuse_grace > 0 and grace_retries == 1
            assert decision.next_attempt_at == now
        elif decision.next_attempt_at is not None:
            assert decision.next_attempt_at >= now + BACKOFF.floor
        if fail.kind is FailureKind.ACCOUNT_PERMANENT:
            assert decision.state is AccountState.NEEDS_REAUTH
        if decision.state is AccountState.NEEDS_REAUTH:
            # The token is dead: the engine stops here until a new seed arrives.
            assert decision.next_attempt_at is None and not decision.retry_same_token_now
            breaker = breaker_reset(BREAKER)
            assert not should_request(decision.state, breaker, now)
            return
        if decision.next_attempt_at is None:
            assert decision.state is AccountState.BLOCKED


# -- when to refresh ---------------------------------------------------------------------


@given(
    lifetime=st.floats(min_value=1.0, max_value=86400.0 * 30),
    jitter=st.floats(min_value=-1.0, max_value=1.0),
)
def test_refresh_time_stays_inside_the_token_and_its_margin(lifetime: float, jitter: float) -> None:
    timing = RefreshTiming()
    at = refresh_at(timing, 1000.0, 1000.0 + lifetime, jitter)
    margin = min(max(60.0, 0.2 * lifetime), lifetime / 2)
    assert 1000.0 <= at <= 1000.0 + lifetime - margin + 1e-6


@pytest.mark.parametrize("lifetime", [60.0, 90.0, 3600.0])
def test_refresh_times_keep_their_jitter_where_the_margin_decides(lifetime: float) -> None:
    # 60 s and 90 s tokens hit the half-life cap; a 1 h token is refreshed at 75% +-10%
    # but never later than its 20% margin (720 s) before expiry.
    timing = RefreshTiming()
    times = [refresh_at(timing, 0.0, lifetime, j / 20) for j in range(-20, 21)]
    assert max(times) - min(times) >= 0.1 * lifetime - 1e-9
    assert len(set(times)) > 10
    latest = lifetime / 2 if lifetime < 120 else 0.8 * lifetime
    assert max(times) == pytest.approx(latest)
    if lifetime > 120:
        assert min(times) == pytest.approx(0.65 * lifetime)


# -- refresh-token lifetimes ---------------------------------------------------------------

DAY = 86400.0


@pytest.mark.parametrize(
    ("window", "margin"),
    [
        (15.0, 5.0),  # at least 5 s
        (8.0, 4.0),  # never more than half the window
        (3600.0, 360.0),  # 10%
        (90 * DAY, DAY),  # at most a day
    ],
)
def test_keepalive_margin(window: float, margin: float) -> None:
    assert keepalive_margin(window) == pytest.approx(margin)


def test_keepalive_counts_from_the_last_use_else_the_consent() -> None:
    idle = RefreshLifetime(max_idle=100.0)
    assert keepalive_at(idle, ChainTimes()) is None
    assert keepalive_at(idle, ChainTimes(consented_at=1000.0)) == 1090.0
    assert keepalive_at(idle, ChainTimes(consented_at=1000.0, last_used_at=2000.0)) == 2090.0
    assert keepalive_at(RefreshLifetime(max_age=100.0), ChainTimes(consented_at=1.0)) is None


def test_keepalive_takes_the_earlier_of_the_idle_limit_and_a_sliding_idp_expiry() -> None:
    chain = ChainTimes(consented_at=0.0, last_used_at=1000.0, idp_expires_at=1050.0)
    # The IdP's 50 s window: refreshed 5 s before it ends, before the 100 s idle limit.
    assert keepalive_at(RefreshLifetime(max_idle=100.0), chain) == 1045.0
    assert keepalive_at(RefreshLifetime(), chain) == 1045.0
    # An absolute expiry is no reason to refresh: refreshing does not move it.
    fixed = ChainTimes(
        consented_at=0.0, last_used_at=1000.0, idp_expires_at=1050.0, idp_expiry_fixed=True
    )
    assert keepalive_at(RefreshLifetime(max_idle=100.0), fixed) == 1090.0
    assert keepalive_at(RefreshLifetime(), fixed) is None


def test_keepalive_never_loops_on_a_tiny_idp_window() -> None:
    chain = ChainTimes(consented_at=0.0, last_used_at=1000.0, idp_expires_at=1000.5)
    assert keepalive_at(RefreshLifetime(), chain) == 1005.0


def test_next_refresh_is_the_earlier_of_due_and_keepalive() -> None:
    assert next_refresh_at(500.0, None) == 500.0
    assert next_refresh_at(500.0, 400.0) == 400.0
    assert next_refresh_at(500.0, 600.0) == 500.0


def test_reauth_deadline() -> None:
    nothing = RefreshLifetime()
    assert reauth_deadline(nothing, ChainTimes(consented_at=0.0, last_used_at=5.0)) is None
    aged = RefreshLifetime(max_age=90 * DAY, max_idle=30 * DAY)
    chain = ChainTimes(consented_at=1000.0, last_used_at=50 * DAY)
    assert reauth_deadline(aged, chain) == 1000.0 + 90 * DAY
    # While it cannot be refreshed, the idle limit is a deadline too.
    assert reauth_deadline(aged, chain, refreshable=False) == 80 * DAY
    # A sliding IdP expiry is no deadline while refreshes keep moving it; a fixed one is.
    sliding = ChainTimes(consented_at=0.0, last_used_at=10.0, idp_expires_at=100.0)
    assert reauth_deadline(nothing, sliding) is None
    assert reauth_deadline(nothing, sliding, refreshable=False) == 100.0
    fixed = ChainTimes(
        consented_at=0.0, last_used_at=10.0, idp_expires_at=100.0, idp_expiry_fixed=True
    )
    assert reauth_deadline(nothing, fixed) == 100.0
    assert reauth_deadline(RefreshLifetime(max_age=50.0), fixed) == 50.0


def test_reauth_warning_starts_the_lead_before_the_deadline() -> None:
    lifetime = RefreshLifetime(warning=14 * DAY)
    assert not reauth_warning(lifetime, None, 0.0)
    assert not reauth_warning(lifetime, 15 * DAY, 0.0)
    assert reauth_warning(lifetime, 14 * DAY, 0.0)
    assert reauth_warning(lifetime, -1.0, 0.0)  # past: still shown


def test_an_idp_expiry_that_stops_moving_is_absolute() -> None:
    first = ChainTimes(consented_at=0.0)
    assert idp_expiry_after_use(first, 1800.0, 0.0) == (1800.0, False)
    assert idp_expiry_after_use(first, None, 0.0) == (None, False)
    used = ChainTimes(consented_at=0.0, last_used_at=0.0, idp_expires_at=1800.0)
    # Sliding: 600 s later it reaches 600 s further.
    assert idp_expiry_after_use(used, 2400.0, 600.0) == (2400.0, False)
    # Stuck at the session's end: absolute.
    assert idp_expiry_after_use(used, 1800.0, 600.0) == (1800.0, True)
    # Too close together to tell: the previous verdict stands.
    stuck = ChainTimes(
        consented_at=0.0, last_used_at=0.0, idp_expires_at=1800.0, idp_expiry_fixed=True
    )
    assert idp_expiry_after_use(stuck, 1801.0, 1.0) == (1801.0, True)


@given(
    last_used=st.floats(0, 1e9),
    max_idle=st.floats(1.0, 400 * DAY),
    window=st.floats(0.0, 400 * DAY),
)
def test_keepalive_lands_inside_every_idle_window(
    last_used: float, max_idle: float, window: float
) -> None:
    chain = ChainTimes(consented_at=0.0, last_used_at=last_used, idp_expires_at=last_used + window)
    at = keepalive_at(RefreshLifetime(max_idle=max_idle), chain)
    assert at is not None
    assert at >= last_used + KEEPALIVE_MIN_INTERVAL - 1e-6
    ends = min(last_used + max_idle, last_used + window)
    if ends - last_used > 2 * KEEPALIVE_MIN_INTERVAL:
        assert at < ends
