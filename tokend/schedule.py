"""When each account is next due, and the one timer that wakes the engine for them.

Per-account due times (unix seconds) live in a heap; one event-loop timer is armed
for the earliest. When it fires, everything due by the clock's time is handed over at
once, and the timer is armed again for a time still to come; a wake-up that comes a
little early (the loop's timer runs on the monotonic clock, due times on the wall
clock) finds nothing due and re-arms. A step of the wall clock is the engine's to
handle (:meth:`RefreshSchedule.shift`, :meth:`RefreshSchedule.wake`).

Why not a scheduler library's job per account: with APScheduler, ``add_job`` cost
60-140 µs and a job object about 1.5 KB, so 100,000 accounts took 6-13 s and ~100 MB
just to schedule; a heap push is ~1 µs. Its one date job for the earliest time was
kept for a while, but the library cost 2 MB of every tokend's memory for what one
``call_at`` does.
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Callable

from tokend.clock import Clock

_WAKE_JOB = "tokend-wake"
# Rebuild the heap when stale entries (superseded due times) outnumber live ones.
_COMPACT_SLACK = 1024


class RefreshSchedule:
    """Due times by account name; calls ``on_due(names)`` when some come due."""

    def __init__(
        self, on_due: Callable[[list[str]], None], clock: Clock, job_id: str = _WAKE_JOB
    ) -> None:
        self._on_due = on_due
        self._job_id = job_id
        self._clock = clock
        self._due: dict[str, float] = {}
        # (due time, name); an entry is live while _due[name] == due time. Names are
        # unique, so they break ties: no sequence number (36 bytes an entry, 7 MB for
        # the two schedules of 100,000 accounts).
        self._heap: list[tuple[float, str]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._armed_for: float | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._armed_for = None
        self._arm()

    def shutdown(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._loop = None

    def __len__(self) -> int:
        return len(self._due)

    def due_at(self, name: str) -> float | None:
        return self._due.get(name)

    def set(self, name: str, at: float) -> None:
        """``name`` is next due at unix time ``at`` (replacing any earlier setting)."""
        self._due[name] = at
        heapq.heappush(self._heap, (at, name))
        if len(self._heap) > 2 * len(self._due) + _COMPACT_SLACK:
            self._compact()
        if self._armed_for is None or at < self._armed_for:
            self._arm()

    def remove(self, name: str) -> None:
        self._due.pop(name, None)

    def shift(self, delta: float) -> None:
        """Move every due time by ``delta`` seconds: after the wall clock jumped by
        ``delta``, each account still waits as long as it was meant to."""
        self._due = {name: at + delta for name, at in self._due.items()}
        self._compact()
        self.wake()

    def wake(self) -> None:
        """Check for due accounts now (after the wall clock jumped, say)."""
        self._armed_for = None
        self._arm()

    def _compact(self) -> None:
        self._heap = [(at, name) for name, at in self._due.items()]
        heapq.heapify(self._heap)

    def _earliest(self) -> float | None:
        heap = self._heap
        while heap:
            at, name = heap[0]
            if self._due.get(name) == at:
                return at
            heapq.heappop(heap)  # superseded or removed
        return None

    def _arm(self) -> None:
        loop = self._loop
        if loop is None:
            return
        at = self._earliest()
        if at is None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._armed_for = None
            return
        if at == self._armed_for:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._armed_for = at
        self._timer = loop.call_later(max(0.0, at - self._clock.time()), self._fire)

    def _fire(self) -> None:
        # On the event loop: collect everything due by now, so the timer is only ever
        # re-armed for a time still to come.
        self._timer = None
        self._armed_for = None
        now = self._clock.time()
        due: list[str] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            at, name = heapq.heappop(heap)
            if self._due.get(name) == at:
                del self._due[name]
                due.append(name)
        self._arm()
        if due:
            self._on_due(due)
