"""Time as a dependency: the engine asks a clock, so tests can hand it another."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def time(self) -> float:
        """Wall-clock unix seconds (token expiry is wall-clock time at the IdP)."""
        ...

    def monotonic(self) -> float:
        """Seconds that never jump (durations, and noticing wall-clock jumps)."""
        ...


class SystemClock:
    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()
