"""The refresh schedule: every due time fires exactly once, including times already
past, times re-set from inside a wake-up, and times set before the timer starts."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter

import anyio
import pytest

from tokend.clock import SystemClock
from tokend.schedule import RefreshSchedule


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_every_due_time_fires_once() -> None:
    fired: Counter[str] = Counter()
    all_fired = anyio.Event()

    def on_due(names: list[str]) -> None:
        fired.update(names)
        if sum(fired.values()) >= 1001:
            all_fired.set()

    rng = random.Random(7)
    schedule = RefreshSchedule(on_due, SystemClock())
    now = time.time()
    # Set before start, some already past.
    for i in range(500):
        schedule.set(f"early{i}", now + rng.uniform(-1.0, 0.3))
    schedule.start(asyncio.get_running_loop())
    try:
        for i in range(500):
            schedule.set(f"late{i}", time.time() + rng.uniform(-0.1, 0.4))
        # A later setting replaces an earlier one: fires once, at the later time.
        schedule.set("moved", time.time() + 0.05)
        schedule.set("moved", time.time() + 0.2)
        schedule.set("removed", time.time() + 0.1)
        schedule.remove("removed")
        with anyio.fail_after(5):
            await all_fired.wait()
        await anyio.sleep(0.3)  # nothing more arrives
    finally:
        schedule.shutdown()
    assert fired["moved"] == 1 and "removed" not in fired
    assert all(n == 1 for n in fired.values())
    assert sum(fired.values()) == 1001 and len(schedule) == 0


@pytest.mark.anyio
async def test_a_time_set_from_inside_a_wake_up_still_fires() -> None:
    fired: list[str] = []
    three = anyio.Event()
    schedule: RefreshSchedule

    def on_due(names: list[str]) -> None:
        fired.extend(names)
        if len(fired) >= 3:
            three.set()
        if "first" in names:
            # Already due by the time the timer is re-armed: must not be skipped.
            schedule.set("second", time.time())
            schedule.set("third", time.time() + 0.001)

    schedule = RefreshSchedule(on_due, SystemClock())
    schedule.start(asyncio.get_running_loop())
    try:
        schedule.set("first", time.time())
        with anyio.fail_after(5):
            await three.wait()
    finally:
        schedule.shutdown()
    assert sorted(fired) == ["first", "second", "third"]


def test_shift_keeps_each_wait_after_a_clock_jump() -> None:
    schedule = RefreshSchedule(lambda names: None, SystemClock())
    schedule.set("a", 1000.0)
    schedule.set("b", 2000.0)
    # The wall clock jumped forward an hour: each account still waits as long.
    schedule.shift(3600.0)
    assert schedule.due_at("a") == 4600.0 and schedule.due_at("b") == 5600.0
