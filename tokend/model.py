"""The nouns every layer shares: account states, token sets and stored records.

Nothing here does I/O. Secrets live in fields whose ``repr`` is suppressed so a
record that ends up in a log line or a traceback never shows a token.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field, replace


class AccountState(enum.StrEnum):
    """Where an account stands; the socket API, metrics and logs use these names."""

    PENDING = "pending"  # no token yet
    VALID = "valid"  # holds a token that is still valid
    REFRESHING = "refreshing"  # a refresh is in flight
    RETRYING = "retrying"  # the last refresh failed; a retry is scheduled
    BLOCKED = "blocked"  # the provider's circuit breaker is open
    NEEDS_REAUTH = "needs_reauth"  # the refresh token is dead; only a new seed revives it
    UNSAVED = "unsaved"  # a rotated refresh token could not be committed yet
    QUEUED = "queued"  # due, waiting for its provider's concurrency and rate limit


def fingerprint(secret: str) -> str:
    """A short, stable, non-reversible name for a secret (for comparisons and logs)."""
    return hashlib.sha256(secret.encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class TokenSet:
    """An access token as handed out, with what an application needs to use it."""

    access_token: str = field(repr=False)
    token_type: str
    expires_at: float  # unix seconds
    issued_at: float  # unix seconds, when tokend received it
    scope: str | None = None

    @property
    def lifetime(self) -> float:
        return max(0.0, self.expires_at - self.issued_at)

    def remaining(self, now: float) -> float:
        return self.expires_at - now

    def is_valid(self, now: float, min_valid: float = 0.0) -> bool:
        return self.expires_at - now > min_valid

    def shifted(self, delta: float) -> TokenSet:
        """The same token after the wall clock stepped by ``delta`` seconds: it still
        lives as long as the IdP said, so its times move with the step."""
        return replace(self, expires_at=self.expires_at + delta, issued_at=self.issued_at + delta)

    @property
    def version(self) -> int:
        """The token's version: an integer that grows with every new token of an
        account. It is when tokend received the token, in microseconds, so the same
        token keeps its version across restarts (it is stored with the token) and on
        every replica that adopts it (a step of the wall clock shifts it with the
        token's times, see :meth:`shifted`)."""
        return int(self.issued_at * 1_000_000)


@dataclass(frozen=True, slots=True)
class StoredAccount:
    """One account's durable record.

    ``seed_fingerprint`` names the seed refresh token the chain started from: when the
    operator supplies a different seed, the new seed wins over the stored chain.
    ``in_flight_since`` is set (durably) before a refresh token is sent to the IdP and
    cleared by the commit of the result, so a restart knows the IdP may have rotated it.
    ``version`` is the compare-and-swap guard: a write names the version it replaces.

    What is known of the refresh token's own lifetime (all unix seconds, None when
    unknown): ``consented_at``, when the chain began (its seed was signed in or
    adopted); ``refresh_used_at``, when a refresh with it last succeeded;
    ``refresh_expires_at``, the expiry the IdP reported with the last token response
    (``refresh_expires_in``), and ``refresh_expiry_fixed``, whether that expiry stayed
    where it was on the last rotation (then it is absolute: refreshing does not move it).
    """

    account: str
    seed_fingerprint: str | None = None
    refresh_token: str | None = field(default=None, repr=False)
    token: TokenSet | None = None
    in_flight_since: float | None = None
    last_outcome: str | None = None
    last_error: str | None = None
    updated_at: float = 0.0
    version: int = 0
    consented_at: float | None = None
    refresh_used_at: float | None = None
    refresh_expires_at: float | None = None
    refresh_expiry_fixed: bool = False

    def evolve(self, **changes: object) -> StoredAccount:
        return replace(self, **changes)  # type: ignore[arg-type]
