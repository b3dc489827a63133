"""How long one account waits before retrying a failed refresh."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    """Exponential backoff with full jitter, bounded below and above."""

    initial: float = 1.0
    maximum: float = 300.0
    multiplier: float = 2.0
    # A Retry-After longer than this is taken as this: a misread or hostile header must
    # not park an account for days.
    retry_after_cap: float = 3600.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.initial) and self.initial > 0):
            raise ValueError("backoff initial must be a positive number of seconds")
        if not (math.isfinite(self.maximum) and self.maximum >= self.initial):
            raise ValueError("backoff maximum must be at least initial")
        if not (math.isfinite(self.multiplier) and self.multiplier >= 1):
            raise ValueError("backoff multiplier must be at least 1")
        if not (math.isfinite(self.retry_after_cap) and self.retry_after_cap >= 0):
            raise ValueError("retry_after_cap must be a non-negative number of seconds")

    @property
    def floor(self) -> float:
        """The shortest delay ever returned: full jitter can draw ``u`` close to 0, and
        a retry at once after a failure would spin."""
        return 0.1 * self.initial


def backoff_ceiling(policy: BackoffPolicy, attempt: int) -> float:
    """The jitter range's upper end for the ``attempt``-th consecutive failure (from 0):
    ``min(maximum, initial * multiplier ** attempt)``, without overflow for any attempt."""
    attempt = max(0, attempt)
    if policy.multiplier == 1.0:
        return policy.initial
    # multiplier ** attempt overflows a float for attempts an int holds easily, so find
    # the attempt at which the ceiling reaches the maximum first (an int compares with
    # a float exactly, whatever its size) and never raise to a larger power.
    attempts_to_maximum = math.log(policy.maximum / policy.initial) / math.log(policy.multiplier)
    if attempt >= attempts_to_maximum:
        return policy.maximum
    return min(policy.maximum, policy.initial * policy.multiplier**attempt)


def retry_delay(policy: BackoffPolicy, attempt: int, u: float, retry_after: float | None) -> float:
    """Seconds to wait before the next try after ``attempt`` earlier consecutive failures.

    ``u`` is a uniform random number in [0, 1) drawn by the caller. The delay is
    ``u * backoff_ceiling`` (full jitter, so accounts that failed together retry apart),
    at least ``policy.floor``, and at least the IdP's Retry-After (capped at
    ``retry_after_cap``) when it sent one.
    """
    u = min(1.0, max(0.0, u)) if math.isfinite(u) else 0.0
    delay = max(policy.floor, u * backoff_ceiling(policy, attempt))
    if retry_after is not None and math.isfinite(retry_after) and retry_after > 0:
        delay = max(delay, min(retry_after, policy.retry_after_cap))
    elif retry_after == math.inf:
        delay = max(delay, policy.retry_after_cap)
    return delay
