"""Which due account a provider serves first when more are due than it admits.

An account whose token expires soonest has the least time left to lose, so it goes
first: arrival order would let a burst of accounts that are merely due starve one whose
token is about to expire. Two kinds jump the line: a refresh found in flight at start
(its retry must land inside the IdP's reuse grace, which is seconds long) and a refresh
an application asked for (it is waiting for the answer). An account with no token yet
has nothing to serve meanwhile: it sorts as if its token had already expired.
"""

from __future__ import annotations

_URGENT = 0
_ORDINARY = 1


def queue_priority(*, forced: bool, in_flight: bool, expires_at: float | None) -> tuple[int, float]:
    """The sort key of a due account in its provider's queue (smaller goes first)."""
    tier = _URGENT if forced or in_flight else _ORDINARY
    return tier, float("-inf") if expires_at is None else expires_at
