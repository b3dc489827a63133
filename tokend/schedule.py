"""When each account is next due, and the one timer that wakes the engine for them.

APScheduler decides *when*: one date job, armed for the earliest due time, with
``misfire_grace_time=None`` (its 1 s default silently drops a late job) and
``coalesce=True`` (a late wake-up runs once). Per-account due times live in a heap.

Why not one APScheduler job per account: ``add_job`` costs 60-140 µs (signature
inspection, job modification, event dispatch) and a job object about 1.5 KB, so
100,000 accounts took 6-13 s and ~100 MB just to schedule; a heap push is ~1 µs.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from datetime import UTC, datetime

from apscheduler.schedulers.asyncio import AsyncIOScheduler

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
        # (due time, tie-breaker, name); an entry is live while _due[name] == due time.
        self._heap: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        self._scheduler: AsyncIOScheduler | None = None
        self._armed_for: float | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._scheduler = AsyncIOScheduler(
            event_loop=loop,
            # A wake-up never waits on another: _fire has no await, so instances
            # cannot interleave, and with max_instances=1 a wake-up due while the
            # previous one's task is being reaped would be skipped, and a skipped date
            # job is gone.
            job_defaults={"misfire_grace_time": None, "coalesce": True, "max_instances": 64},
        )
        self._scheduler.start()
        self._armed_for = None
        self._arm()

    def shutdown(self) -> None:
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None

    def __len__(self) -> int:
        return len(self._due)

    def due_at(self, name: str) -> float | None:
        return self._due.get(name)

    def set(self, name: str, at: float) -> None:
        """``name`` is next due at unix time ``at`` (replacing any earlier setting)."""
        self._due[name] = at
        heapq.heappush(self._heap, (at, next(self._seq), name))
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
        self._heap = [(at, next(self._seq), name) for name, at in self._due.items()]
        heapq.heapify(self._heap)

    def _earliest(self) -> float | None:
        heap = self._heap
        while heap:
            at, _, name = heap[0]
            if self._due.get(name) == at:
                return at
            heapq.heappop(heap)  # superseded or removed
        return None

    def _arm(self) -> None:
        scheduler = self._scheduler
        if scheduler is None:
            return
        at = self._earliest()
        if at is None:
            if scheduler.get_job(self._job_id) is not None:
                scheduler.remove_job(self._job_id)
            self._armed_for = None
            return
        if at == self._armed_for:
            return
        self._armed_for = at
        scheduler.add_job(
            self._fire,
            trigger="date",
            run_date=datetime.fromtimestamp(at, tz=UTC),
            id=self._job_id,
            replace_existing=True,
        )

    async def _fire(self) -> None:
        # Runs on the event loop (a coroutine job): collect everything due by now, so
        # the timer is only ever re-armed for a time still to come.
        self._armed_for = None
        now = self._clock.time()
        due: list[str] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            at, _, name = heapq.heappop(heap)
            if self._due.get(name) == at:
                del self._due[name]
                due.append(name)
        self._arm()
        if due:
            self._on_due(due)
