"""What one account does after a refresh fails: retry when, wait for whom, or stop.

The one thing never to do is send a refresh token the IdP has declared dead: with
refresh token rotation, reusing a spent token can make the IdP revoke the whole grant,
and it is a wasted request in any case. The single exception is the reuse grace: when
a response was lost after the request was sent, the IdP may have rotated the token
without our learning the new one, and an IdP with a reuse interval still accepts the
old token for that long, so it is tried once more, at once.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from tokend.model import AccountState
from tokend.oauth import FailureKind, TokenFailure
from tokend.policy._backoff import BackoffPolicy, retry_delay
from tokend.policy._breaker import BreakerState, BreakerStatus

_REAUTH_HINT = "run `tokend login ACCOUNT`, or supply a new seed token and send SIGHUP"

# Statuses from a gateway that may have passed the request on before losing the answer.
_GATEWAY_LOST = frozenset({502, 504})


@dataclass(frozen=True, slots=True)
class AccountPolicyState:
    """One account's failure bookkeeping; a success resets it."""

    # Failed refreshes in a row: the backoff attempt number.
    consecutive_failures: int = 0
    # When the latest response lost after sending was lost (the IdP may have rotated
    # the refresh token then); None when none was lost in this run of failures.
    lost_response_at: float | None = None
    # The single same-token retry within the reuse grace was spent in this run of
    # failures.
    grace_retry_used: bool = False


@dataclass(frozen=True, slots=True)
class AccountDecision:
    """What the engine does next with an account."""

    state: AccountState
    # When to try next; None means never with this refresh token (needs_reauth), or not
    # before the provider's configuration changes (blocked by invalid_client).
    next_attempt_at: float | None
    policy_state: AccountPolicyState
    # Resend the same refresh token now, inside the IdP's reuse grace.
    retry_same_token_now: bool
    # One short sentence for the log line of this state change. Free of secrets.
    message: str


def is_lost_response(failure: TokenFailure) -> bool:
    """Whether the IdP may have carried out the refresh (and rotated the refresh token)
    without tokend receiving the result.

    That is a transient failure of a request that was sent and then either got no HTTP
    answer (timeout, connection lost), got a success status with an unusable body, or
    got a gateway's report of losing its upstream (502, 504).
    """
    if failure.kind is not FailureKind.TRANSIENT or not failure.request_sent:
        return False
    if failure.rotated_refresh_token is not None:
        return False  # the answer arrived with the new refresh token: nothing was lost
    status = failure.status
    return status is None or 200 <= status < 300 or status in _GATEWAY_LOST


def account_after_success(state: AccountPolicyState) -> AccountPolicyState:
    """The bookkeeping after a refresh succeeded: nothing outstanding."""
    return AccountPolicyState()


def account_after_failure(
    state: AccountPolicyState,
    failure: TokenFailure,
    *,
    now: float,
    token_expires_at: float | None,
    backoff: BackoffPolicy,
    u: float,
    reuse_grace: float = 0.0,
) -> AccountDecision:
    """The decision after a refresh answered (or failed) with ``failure``.

    ``u`` in [0, 1) is the caller's random draw for the backoff jitter.
    ``token_expires_at`` is when the access token the account holds expires (None
    without one); it only shapes the message. Retries follow the backoff whether the
    token is still valid or not: the engine keeps serving a valid token meanwhile, and
    the backoff maximum (5 minutes by default) is short next to the refresh margin, so
    capping a retry at the expiry would rarely move it. Only a Retry-After can push a
    retry past the expiry, and that is the IdP's request to honour.

    After BLOCKED or RATE_LIMITED the provider's breaker usually holds every account
    for longer than this account's backoff: the engine waits for the later of
    ``next_attempt_at`` and the breaker admission's ``retry_at``.

    ``reuse_grace`` is the provider's reuse interval for rotated refresh tokens (0:
    none). A lost response (see ``is_lost_response``) within it is handed to
    ``account_after_lost_response``, which may retry the same token once at once.
    """
    if reuse_grace > 0 and not state.grace_retry_used and is_lost_response(failure):
        return account_after_lost_response(
            state,
            now=now,
            reuse_grace=reuse_grace,
            lost_at=now,
            backoff=backoff,
            u=u,
            token_expires_at=token_expires_at,
        )
    kind = failure.kind
    what = _describe(failure)
    if kind is FailureKind.ACCOUNT_PERMANENT:
        if state.grace_retry_used or state.lost_response_at is not None:
            message = (
                f"refresh token rejected ({what}) after an earlier response was lost; the "
                f"IdP probably rotated it then; account needs re-authorization: {_REAUTH_HINT}"
            )
        else:
            message = (
                f"refresh token rejected ({what}); account needs re-authorization: " + _REAUTH_HINT
            )
        return AccountDecision(
            state=AccountState.NEEDS_REAUTH,
            next_attempt_at=None,
            policy_state=replace(state, consecutive_failures=state.consecutive_failures + 1),
            retry_same_token_now=False,
            message=message,
        )
    if kind is FailureKind.PROVIDER_PERMANENT:
        return AccountDecision(
            state=AccountState.BLOCKED,
            next_attempt_at=None,
            policy_state=replace(state, consecutive_failures=state.consecutive_failures + 1),
            retry_same_token_now=False,
            message=(
                f"provider refused this client ({what}); its circuit breaker stays open "
                "until the provider's configuration is fixed and reloaded with SIGHUP; "
                + _token_status(now, token_expires_at)
            ),
        )
    delay = retry_delay(backoff, state.consecutive_failures, u, failure.retry_after)
    lost_at = now if is_lost_response(failure) else state.lost_response_at
    policy_state = replace(
        state, consecutive_failures=state.consecutive_failures + 1, lost_response_at=lost_at
    )
    if kind is FailureKind.BLOCKED:
        account_state = AccountState.BLOCKED
        cause = "provider blocked the request; its circuit breaker is open; "
    else:
        account_state = AccountState.RETRYING
        cause = ""
    return AccountDecision(
        state=account_state,
        next_attempt_at=now + delay,
        policy_state=policy_state,
        retry_same_token_now=False,
        message=(
            f"refresh failed ({what}); {cause}retry in {_human(delay)}; "
            + _token_status(now, token_expires_at)
        ),
    )


def account_after_lost_response(
    state: AccountPolicyState,
    *,
    now: float,
    reuse_grace: float,
    lost_at: float,
    backoff: BackoffPolicy,
    u: float,
    token_expires_at: float | None = None,
) -> AccountDecision:
    """The decision after a refresh request was sent and its result lost (a failure for
    which ``is_lost_response`` holds, or a restart finding a refresh in flight since
    ``lost_at``).

    Within ``reuse_grace`` seconds of ``lost_at`` the IdP still accepts the old token
    even if it rotated it, so the same token is retried at once, once per run of
    failures. Otherwise the account backs off as after any transient failure; if the
    IdP did rotate, that retry meets invalid_grant and the account needs
    re-authorization, which no policy can avoid once the new token is lost.

    The same-token retry still goes through the provider's breaker and rate limit:
    held past the grace, it is an ordinary retry.
    """
    if reuse_grace > 0 and not state.grace_retry_used and 0 <= now - lost_at < reuse_grace:
        return AccountDecision(
            state=AccountState.RETRYING,
            next_attempt_at=now,
            policy_state=replace(
                state,
                consecutive_failures=state.consecutive_failures + 1,
                lost_response_at=lost_at,
                grace_retry_used=True,
            ),
            retry_same_token_now=True,
            message=(
                "refresh response lost after sending; the IdP may have rotated the refresh "
                "token; retrying the same token once within the provider's reuse grace"
            ),
        )
    delay = retry_delay(backoff, state.consecutive_failures, u, None)
    return AccountDecision(
        state=AccountState.RETRYING,
        next_attempt_at=now + delay,
        policy_state=replace(
            state, consecutive_failures=state.consecutive_failures + 1, lost_response_at=lost_at
        ),
        retry_same_token_now=False,
        message=(
            f"refresh response lost after sending; retry in {_human(delay)}; "
            + _token_status(now, token_expires_at)
        ),
    )


def should_request(account_state: AccountState, breaker: BreakerState, now: float) -> bool:
    """Whether sending this account's refresh now is allowed at all (a guard, not a
    scheduler: the breaker's own admission decides which caller probes).

    False when the refresh token is dead (needs_reauth), when a refresh for the account
    is already in flight (two requests with one rotating token would spend it twice;
    ask before marking the account refreshing), and while the provider's breaker
    denies requests.
    """
    if account_state in (AccountState.NEEDS_REAUTH, AccountState.REFRESHING):
        return False
    if breaker.permanent:
        return False
    if breaker.status is BreakerStatus.OPEN:
        return breaker.opened_until is None or now >= breaker.opened_until
    if breaker.status is BreakerStatus.HALF_OPEN:
        return breaker.probe_deadline is not None and now >= breaker.probe_deadline
    return True


def _describe(failure: TokenFailure) -> str:
    if failure.status is None:
        return failure.reason
    return f"{failure.reason}, HTTP {failure.status}"


def _token_status(now: float, token_expires_at: float | None) -> str:
    if token_expires_at is None:
        return "no access token to serve yet"
    remaining = token_expires_at - now
    if remaining <= 0:
        return "the access token has expired"
    return f"the current access token stays valid for {_human(remaining)}"


def _human(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
