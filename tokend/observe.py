"""What the engine reports as it works, for instrumentation kept apart from logic.

The engine calls every registered :class:`Observer`; metrics implement it. Calls are
made on the event loop and must be cheap and never raise.
"""

from __future__ import annotations

from typing import Protocol


class Observer(Protocol):
    def refresh_finished(self, provider: str, outcome: str, duration: float) -> None:
        """A token request ended: ``outcome`` is ``success``, ``unsaved`` or a
        failure kind (``transient``, ``rate_limited``, ...)."""
        ...

    def store_committed(self, duration: float) -> None:
        """A durable store write took ``duration`` seconds."""
        ...
