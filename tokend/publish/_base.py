from __future__ import annotations

from typing import Protocol, runtime_checkable

from tokend.model import TokenSet


class Publisher(Protocol):
    """Told about every token the engine has committed and now hands out."""

    async def publish(self, account: str, token: TokenSet) -> None:
        """``token`` is now ``account``'s current token. Must not raise for I/O
        problems of one account (log and carry on); must be idempotent."""
        ...

    async def withdraw(self, account: str) -> None:
        """``account`` is gone (removed from config): stop handing out its token."""
        ...


@runtime_checkable
class ReportingPublisher(Publisher, Protocol):
    """A publisher that knows which accounts it could not publish for (a token file
    that cannot be written): the API, readiness and metrics show them."""

    publisher_name: str
    # Failed attempts so far (a counter).
    errors_total: int

    def failures(self) -> dict[str, str]:
        """Accounts whose published form is not their current token, and why."""
        ...


@runtime_checkable
class ExpiringPublisher(Publisher, Protocol):
    """A publisher that must act when a token expires with no replacement, so an
    expired token is never left looking valid (a file an application keeps reading)."""

    async def expire(self, account: str, now: float | None = None) -> bool:
        """``account``'s published token has expired; True if anything changed."""
        ...
