"""Time as a dependency: the engine asks a clock, so tests can hand it another."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def time(self) -> float:
        """Wall-clock unix seconds (token expiry is wall-clock time at the IdP)."""
        ...

    def monotonic(self) -> float:
        """Seconds that never jump but do count a suspend (durations, and noticing
        wall-clock jumps: after a resume, wall time and this moved alike)."""
        ...


# CLOCK_BOOTTIME (Linux) keeps counting while the machine sleeps, where CLOCK_MONOTONIC
# stops: with the latter, a resume would look like a wall-clock jump and push every
# refresh later by the time slept, though the tokens really aged meanwhile.
_REAL_TIME = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)


class SystemClock:
    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.clock_gettime(_REAL_TIME)
