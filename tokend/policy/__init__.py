"""Pure decisions: when to refresh, how long to back off, whether a breaker lets a
request through. No I/O and no clock reads: time and randomness are passed in.

Defaults, and why
=================

Retry backoff, per account (``BackoffPolicy``)
    initial 1 s, multiplier 2, maximum 300 s, full jitter, floor 0.1 s.
    A single blip (a reset connection, one 502) is retried within a second, while the
    token still has most of its refresh margin left. Doubling reaches the 5-minute
    maximum at the tenth failure in a row; from then on an account asks about 24 times an hour
    on average, little load for an IdP that is down, and its return is noticed within
    5 minutes. Full jitter (a uniform delay between 0 and the ceiling) spreads
    accounts that failed together, so they do not come back together; the floor keeps
    a draw near 0 from retrying in a tight loop.
Retry-After cap, 3600 s (``BackoffPolicy.retry_after_cap``, ``BreakerPolicy.retry_after_cap``)
    Retry-After is always honoured, up to an hour: longer than any rate-limit window
    seen in practice, short enough that a misread or hostile header cannot park
    accounts for days.
Circuit breaker, per provider (``BreakerPolicy``)
    Opens after 5 consecutive transient failures across the provider's accounts.
    With 4 requests in flight per provider, 5 in a row is more than one round of
    concurrent failures, so a single unlucky account or request does not stop the
    others, yet an IdP that is down receives a handful of requests, not one per
    account. Consecutive, not a failure rate: any success resets the count, so a
    flaky IdP is left to per-account backoff and the breaker is kept for outages.
    A 403 (a web firewall's block) and a 429 open it at once, and a 429 keeps it open
    until Retry-After, so no account of the provider asks before the IdP said to.
    An invalid_client keeps it open until the configuration changes.
Breaker cooldown, 30 s doubling to 30 min
    30 s outlasts the default 10 s request timeout and a typical load-balancer
    failover, and is short next to the 60 s minimum refresh margin, so a brief outage
    costs no token its validity. Each failed probe doubles it (30 s, 1 min, 2 min ...
    16 min, 30 min): a firewall block often lasts tens of minutes and probing it
    often can prolong it, while one probe per 30 minutes costs the IdP nothing. Only
    one probe is ever in flight; other callers re-check every 5 s.
Rate limit, per provider (``RateLimit``): 10 requests/s, burst 20
    10/s is 36,000 refreshes an hour: enough for about 27,000 accounts whose tokens
    live an hour, yet a modest load for a token endpoint, leaving most of an IdP
    tenant's request quota to the applications' own sign-ins.
    A burst of 20 lets a small deployment start (or reload) with no pacing at all;
    beyond it, callers reserve their slot in arrival order, so 10,000 accounts due at
    once reach the IdP as a steady 10/s rather than a spike.
Concurrency, 4 per provider (``ProviderConfig.max_concurrency``), 64 in all
    At a token endpoint's usual 100-300 ms, 4 requests in flight sustain 13-40
    requests/s, so the rate limit, not the concurrency, paces a healthy IdP. When the IdP
    slows down, requests take longer and 4 caps how many pile onto it, and how many
    answers are still on their way when the breaker opens.
Reuse grace, 0 (off) unless configured for a provider
    Only an IdP that documents a reuse interval for rotated refresh tokens accepts a
    resent old token; elsewhere a resend after a lost response would meet
    invalid_grant or, worse, revoke the grant. With a grace configured, the same token
    is retried once, at once, after a lost response.
Refresh-token lifetimes (``RefreshLifetime``): unknown unless configured or reported
    An idle account (its access tokens outlive the idle window, or tokend was down) is
    refreshed before ``last use + refresh_token_max_idle`` (or the IdP's sliding
    ``refresh_expires_in``) by a margin of 10% of that window, at least 5 s and at
    most a day (never more than half the window, and never sooner than 5 s after the
    last use). 10% of Google's six months is 18 days, capped to one: the window is
    used to its last day, and a day rides out an outage with retries. The
    re-authorization deadline is consent + ``refresh_token_max_age``, or an IdP
    expiry that stopped moving on rotation; the warning starts 14 days ahead
    (``reauth_warning``): two weeks to reach whoever has to sign in again.
"""

from tokend.policy._account import (
    AccountDecision,
    AccountPolicyState,
    account_after_failure,
    account_after_lost_response,
    account_after_success,
    is_lost_response,
    should_request,
)
from tokend.policy._backoff import BackoffPolicy, backoff_ceiling, retry_delay
from tokend.policy._breaker import (
    Admission,
    BreakerOutcome,
    BreakerPolicy,
    BreakerState,
    BreakerStatus,
    breaker_abandon_probe,
    breaker_admit,
    breaker_record,
    breaker_reset,
)
from tokend.policy._lifetime import (
    ChainTimes,
    RefreshLifetime,
    idp_expiry_after_use,
    keepalive_at,
    keepalive_margin,
    next_refresh_at,
    reauth_deadline,
    reauth_warning,
)
from tokend.policy._order import queue_priority
from tokend.policy._ratelimit import (
    BucketState,
    RateLimit,
    bucket_full,
    bucket_reserve,
    bucket_take,
)
from tokend.policy._timing import RefreshTiming, refresh_at

__all__ = [
    "AccountDecision",
    "AccountPolicyState",
    "Admission",
    "BackoffPolicy",
    "BreakerOutcome",
    "BreakerPolicy",
    "BreakerState",
    "BreakerStatus",
    "BucketState",
    "ChainTimes",
    "RateLimit",
    "RefreshLifetime",
    "RefreshTiming",
    "account_after_failure",
    "account_after_lost_response",
    "account_after_success",
    "backoff_ceiling",
    "breaker_abandon_probe",
    "breaker_admit",
    "breaker_record",
    "breaker_reset",
    "bucket_full",
    "bucket_reserve",
    "bucket_take",
    "idp_expiry_after_use",
    "is_lost_response",
    "keepalive_at",
    "keepalive_margin",
    "next_refresh_at",
    "queue_priority",
    "reauth_deadline",
    "reauth_warning",
    "refresh_at",
    "retry_delay",
    "should_request",
]
