"""A token bucket per provider: the most requests tokend sends an IdP, healthy or not.

The bucket may go into debt: ``bucket_reserve`` hands out the time at which each
caller's token will have been refilled and takes the token at once, so callers
queue in arrival order, each sleeping until its own time, instead of all waking and
retrying together. ``bucket_take`` never takes from the future, so it waits behind
every earlier reservation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Refill arithmetic in floats can leave a bucket a hair short of a whole token at the
# very moment a caller was told one would be there; that caller must not be sent back
# to wait a few nanoseconds more.
_EPSILON = 1e-9


@dataclass(frozen=True, slots=True)
class RateLimit:
    """``rate`` requests per second on average, up to ``burst`` at once."""

    rate: float = 10.0
    burst: int = 20

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rate) and self.rate > 0):
            raise ValueError("rate must be a positive number of requests per second")
        if self.burst < 1:
            raise ValueError("burst must be at least 1")


@dataclass(frozen=True, slots=True)
class BucketState:
    # Negative while reservations are outstanding (the debt they are waiting out).
    tokens: float
    # The time ``tokens`` was computed at.
    updated_at: float

    def shifted(self, delta: float) -> BucketState:
        """After a wall-clock step of ``delta``: the refill keeps its real pace."""
        return BucketState(self.tokens, self.updated_at + delta)


def bucket_full(limit: RateLimit, now: float) -> BucketState:
    """A bucket holding a whole burst: the starting state."""
    return BucketState(tokens=float(limit.burst), updated_at=now)


def _refilled(state: BucketState, limit: RateLimit, now: float) -> BucketState:
    elapsed = now - state.updated_at
    if elapsed <= 0:
        # The clock went back (or did not move): grant nothing for it, but count
        # later refills from ``now`` so a backward step cannot stall the bucket.
        return state if elapsed == 0 else BucketState(state.tokens, now)
    return BucketState(min(float(limit.burst), state.tokens + elapsed * limit.rate), now)


def bucket_take(state: BucketState, limit: RateLimit, now: float) -> tuple[float, BucketState]:
    """Take a token now if one is there.

    Returns ``(0.0, state with the token taken)``, or ``(seconds until a token will be
    there, refilled state)`` without taking anything.
    """
    refilled = _refilled(state, limit, now)
    if refilled.tokens >= 1.0 - _EPSILON:
        return 0.0, BucketState(refilled.tokens - 1.0, now)
    return (1.0 - refilled.tokens) / limit.rate, refilled


def bucket_reserve(state: BucketState, limit: RateLimit, now: float) -> tuple[float, BucketState]:
    """Take a token now or in the future: returns ``(start_at, state)`` with
    ``start_at >= now`` the time the caller may send its request.

    Start times of successive reservations never decrease (first come, first served),
    and however many callers reserve at once, they start at most ``burst`` plus
    ``rate`` per second.
    """
    refilled = _refilled(state, limit, now)
    wait = max(0.0, (1.0 - refilled.tokens) / limit.rate)
    if refilled.tokens >= 1.0 - _EPSILON:
        wait = 0.0
    return now + wait, BucketState(refilled.tokens - 1.0, now)
