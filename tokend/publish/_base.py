from __future__ import annotations

from typing import Protocol

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
