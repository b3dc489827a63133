"""How long a refresh token itself lives: when an idle account must be refreshed to
keep it alive, and when its chain dies whatever tokend does (a new sign-in is due).

What is known of a chain (all unix seconds, None when unknown): when it was consented
(the seed signed in or adopted), when its refresh token was last used successfully,
and the refresh-token expiry the IdP reported with the last token response. What the
provider is known to do: an idle limit (``max_idle``: an unused refresh token dies
this long after its last use) and an age limit (``max_age``: every refresh token of a
sign-in dies this long after it, however often it is used).
"""

from __future__ import annotations

from dataclasses import dataclass

# The keepalive refresh comes this share of the idle window before it ends...
KEEPALIVE_MARGIN_FRACTION = 0.10
# ...but at least this early (a refresh takes a request, which may be retried)...
KEEPALIVE_MARGIN_MIN = 5.0
# ...and at most a day early: a day is long enough to ride out an IdP outage with
# retries, and a window of months is then used to its last day rather than its last
# three weeks.
KEEPALIVE_MARGIN_MAX = 86400.0
# Never sooner than this after the last use, whatever an IdP reports: a tiny
# refresh_expires_in must not turn into a refresh loop.
KEEPALIVE_MIN_INTERVAL = 5.0
# Default warning lead before a re-authorization deadline: two weeks leaves time to
# reach whoever has to sign in again.
REAUTH_WARNING_DEFAULT = 14 * 86400.0


@dataclass(frozen=True, slots=True)
class RefreshLifetime:
    """What is known of a provider's refresh-token lifetimes (None: not known)."""

    max_idle: float | None = None
    max_age: float | None = None
    warning: float = REAUTH_WARNING_DEFAULT


@dataclass(frozen=True, slots=True)
class ChainTimes:
    """What is known of one account's chain of refresh tokens."""

    consented_at: float | None = None
    last_used_at: float | None = None
    idp_expires_at: float | None = None
    # The IdP's reported expiry did not move forward on the last rotation: it is an
    # absolute limit, not an idle one.
    idp_expiry_fixed: bool = False


def keepalive_margin(window: float) -> float:
    """How long before an idle window of ``window`` seconds ends the keepalive refresh
    comes: 10% of it, at least 5 s and at most a day, and never more than half of it."""
    margin = max(KEEPALIVE_MARGIN_FRACTION * window, KEEPALIVE_MARGIN_MIN)
    return min(margin, KEEPALIVE_MARGIN_MAX, window / 2)


def keepalive_at(lifetime: RefreshLifetime, chain: ChainTimes) -> float | None:
    """The time by which an idle account must be refreshed so that its refresh token
    does not die of idleness: the earlier of ``last use + max_idle`` and the IdP's
    reported expiry (while that still moves with each use), less a margin
    (:func:`keepalive_margin`). None when neither is known. The last use of a chain
    never used yet is its consent."""
    last_used = chain.last_used_at if chain.last_used_at is not None else chain.consented_at
    if last_used is None:
        return None
    candidates: list[float] = []
    if lifetime.max_idle is not None:
        window = lifetime.max_idle
        candidates.append(last_used + window - keepalive_margin(window))
    if chain.idp_expires_at is not None and not chain.idp_expiry_fixed:
        window = max(0.0, chain.idp_expires_at - last_used)
        candidates.append(chain.idp_expires_at - keepalive_margin(window))
    if not candidates:
        return None
    return max(min(candidates), last_used + KEEPALIVE_MIN_INTERVAL)


def next_refresh_at(due: float, keepalive: float | None) -> float:
    """When to refresh: the usual time before the access token expires (``due``), or
    the keepalive, whichever comes first."""
    return due if keepalive is None else min(due, keepalive)


def reauth_deadline(
    lifetime: RefreshLifetime, chain: ChainTimes, *, refreshable: bool = True
) -> float | None:
    """The earliest time the chain dies however often tokend refreshes it: consent +
    ``max_age``, and an IdP-reported expiry that stayed put on the last rotation.
    While the account cannot be refreshed (``refreshable`` False: it needs
    re-authorization, or its provider's breaker is open), the idle limits are
    deadlines too. None when nothing is known."""
    candidates: list[float] = []
    if lifetime.max_age is not None and chain.consented_at is not None:
        candidates.append(chain.consented_at + lifetime.max_age)
    if chain.idp_expires_at is not None and (chain.idp_expiry_fixed or not refreshable):
        candidates.append(chain.idp_expires_at)
    if not refreshable and lifetime.max_idle is not None:
        last_used = chain.last_used_at if chain.last_used_at is not None else chain.consented_at
        if last_used is not None:
            candidates.append(last_used + lifetime.max_idle)
    return min(candidates) if candidates else None


def reauth_warning(lifetime: RefreshLifetime, deadline: float | None, now: float) -> bool:
    """Whether a re-authorization deadline is close enough to warn about (within the
    provider's warning lead, or already past)."""
    return deadline is not None and deadline - now <= lifetime.warning


def idp_expiry_after_use(
    previous: ChainTimes, reported: float | None, now: float, *, tolerance: float = 2.0
) -> tuple[float | None, bool]:
    """The IdP-reported refresh-token expiry to keep after a successful refresh at
    ``now`` (None: the IdP reported none), and whether it is absolute.

    A sliding (idle) expiry moves forward by about the time since the previous use;
    an absolute one stays put. So it counts as absolute when it moved forward by less
    than half the time since the previous report. Refreshes closer together than
    ``tolerance`` (rounding, latency) cannot tell: the previous verdict stands.
    """
    if reported is None:
        return None, False
    before, used = previous.idp_expires_at, previous.last_used_at
    if before is None or used is None:
        return reported, False
    elapsed = now - used
    if elapsed <= tolerance:
        return reported, previous.idp_expiry_fixed
    return reported, reported - before < elapsed / 2
