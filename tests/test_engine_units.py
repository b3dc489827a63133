"""The engine's pure parts and its reaction to a clock step, with an injected clock."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tokend.clock import SystemClock
from tokend.config import load_config
from tokend.engine import Engine
from tokend.model import AccountState, TokenSet
from tokend.oauth import FailureKind
from tokend.policy import BreakerStatus, breaker_admit, breaker_record, queue_priority
from tokend.refresh import Admission
from tokend.runtime import ProviderQueue
from tokend.store.sqlite import SqliteStore

pytestmark = pytest.mark.anyio

NOW = 1_800_000_000.0


@dataclass
class StepClock:
    wall: float = NOW
    real: float = 1000.0

    def time(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.real


def test_queue_priority_puts_urgent_then_earliest_expiry_first() -> None:
    keys = {
        "late": queue_priority(forced=False, in_flight=False, expires_at=NOW + 600),
        "soon": queue_priority(forced=False, in_flight=False, expires_at=NOW + 60),
        "no_token": queue_priority(forced=False, in_flight=False, expires_at=None),
        "forced_late": queue_priority(forced=True, in_flight=False, expires_at=NOW + 900),
        "in_flight": queue_priority(forced=False, in_flight=True, expires_at=NOW + 1200),
    }
    assert sorted(keys, key=keys.__getitem__) == [
        "forced_late",
        "in_flight",
        "no_token",
        "soon",
        "late",
    ]


async def engine_with(
    tmp_path: Path, clock: StepClock, names: list[str], **provider: Any
) -> Engine:
    config: dict[str, Any] = {
        "state": {"path": str(tmp_path / "state.db")},
        "serve": {"socket": None, "token_dir": None, "metrics_listen": None},
        "providers": {
            "idp": {
                "token_endpoint": "http://127.0.0.1:9/token",
                "client_id": "c",
                "client_secret": "s",
                **provider,
            }
        },
        "accounts": {name: {"provider": "idp", "refresh_token": f"seed-{name}"} for name in names},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    store = SqliteStore(tmp_path / "state.db")
    await store.open()
    engine = Engine(load_config(path), store, {}, clock=clock)
    await engine.load()
    return engine


async def test_provider_queue_pops_most_urgent_and_requeue_raises_priority(
    tmp_path: Path,
) -> None:
    engine = await engine_with(tmp_path, StepClock(), ["a", "b", "c"])
    try:
        accounts = engine.accounts
        for name, expires in (("a", 300.0), ("b", 100.0), ("c", 200.0)):
            accounts[name].published = TokenSet("t", "Bearer", NOW + expires, NOW - 10)
        queue = ProviderQueue()
        for name in ("a", "b", "c"):
            queue.push(accounts[name])
        accounts["a"].forced = True
        queue.push(accounts["a"])  # asked for by an application: goes first now
        assert len(queue) == 3 and "a" in queue
        assert [queue.pop(), queue.pop(), queue.pop(), queue.pop()] == ["a", "b", "c", None]
        queue.push(accounts["b"])
        queue.discard("b")
        assert queue.pop() is None
    finally:
        await engine.store.close()


@pytest.mark.parametrize("step", [+3600.0, -3600.0])
async def test_a_wall_clock_step_keeps_every_wait_its_real_length(
    tmp_path: Path, step: float
) -> None:
    clock = StepClock()
    engine = await engine_with(tmp_path, clock, ["a"])
    try:
        account = engine.accounts["a"]
        token = TokenSet("t", "Bearer", expires_at=NOW + 300, issued_at=NOW - 60)
        account.published = token
        account.record = account.record.evolve(token=token)
        engine.schedule(account, NOW + 200)
        engine.expiries.set("a", token.expires_at)
        provider = engine.providers["idp"]
        provider.breaker = breaker_record(
            provider.breaker,
            provider.breaker_policy,
            FailureKind.BLOCKED,
            NOW,
        )
        assert provider.breaker.status is BreakerStatus.OPEN
        opened_until = provider.breaker.opened_until
        assert opened_until is not None
        # The wall clock steps; real time stands still.
        clock.wall += step
        await engine.clock_jumped(step)
        assert account.next_attempt_at == NOW + 200 + step
        assert engine.due.due_at("a") == NOW + 200 + step
        assert engine.expiries.due_at("a") == NOW + 300 + step
        assert account.published is not None
        assert account.published.expires_at == NOW + 300 + step
        assert account.published.remaining(clock.wall) == 300
        assert (
            account.record.token is not None and account.record.token.expires_at == NOW + 300 + step
        )
        assert provider.breaker.opened_until == opened_until + step
        assert account.state is AccountState.PENDING or account.token_valid(clock.wall)
    finally:
        await engine.store.close()


def test_the_system_clock_counts_a_suspend_as_time() -> None:
    # CLOCK_BOOTTIME advances through a suspend; CLOCK_MONOTONIC would not, and a resume
    # would then look like a wall-clock jump that postpones every refresh.
    clock = SystemClock()
    if hasattr(time, "CLOCK_BOOTTIME"):
        assert abs(clock.monotonic() - time.clock_gettime(time.CLOCK_BOOTTIME)) < 1.0
    before = clock.monotonic()
    assert clock.monotonic() >= before


async def test_a_probe_that_never_goes_out_is_abandoned_at_once(tmp_path: Path) -> None:
    """A half-open breaker's probe that is not sent (its account turned out not to need
    a refresh, the claim was refused, the in-flight mark could not be written) hands the
    probe to the next caller now, instead of holding the provider for the probe timeout."""
    clock = StepClock()
    engine = await engine_with(tmp_path, clock, ["a"])
    try:
        provider = engine.providers["idp"]
        provider.breaker = breaker_record(
            provider.breaker, provider.breaker_policy, FailureKind.BLOCKED, clock.wall
        )
        clock.wall += provider.breaker.cooldown + 1
        admission, provider.breaker = breaker_admit(
            provider.breaker, clock.wall, provider.breaker_policy
        )
        assert admission.probe and provider.breaker.status is BreakerStatus.HALF_OPEN
        account = engine.accounts["a"]
        handed_back: list[bool] = []
        await engine._refresh.run(
            account,
            provider,
            Admission(probe=True, done_with_provider=lambda: handed_back.append(True)),
            forced=False,
        )
        assert handed_back
        assert provider.breaker.status is BreakerStatus.OPEN
        assert provider.breaker.opened_until == clock.wall
        again, _ = breaker_admit(provider.breaker, clock.wall, provider.breaker_policy)
        assert again.allowed and again.probe
    finally:
        await engine.store.close()


async def test_chain_times_are_kept_and_shape_the_schedule_and_the_deadline(
    tmp_path: Path,
) -> None:
    clock = StepClock()
    lifetimes = {"refresh_token_max_idle": "1d", "refresh_token_max_age": "30d"}
    engine = await engine_with(tmp_path, clock, ["a", "old"], **lifetimes)
    try:
        account = engine.accounts["a"]
        # A new seed is consented when adopted.
        assert account.record.consented_at == NOW
        assert account.reauth_deadline == NOW + 30 * 86400
        # A token living a week is refreshed for the idle limit: a day after the last
        # use less 10% of it (2.4 h).
        token = TokenSet("t", "Bearer", expires_at=NOW + 7 * 86400, issued_at=NOW)
        account.published = token
        account.record = account.record.evolve(token=token, refresh_used_at=NOW)
        assert engine._next_refresh_time(account) == pytest.approx(NOW + 86400 - 8640)
        # While it cannot be refreshed, the idle limit is a deadline too.
        account.state = AccountState.BLOCKED
        assert account.reauth_deadline == NOW + 86400
        # A record from before lifetimes were tracked is first seen now, and stays so.
        old = engine.accounts["old"].record.evolve(consented_at=None, refresh_used_at=None)
        await engine.store.put(old)
    finally:
        await engine.store.close()
    clock.wall += 3600
    again = await engine_with(tmp_path, clock, ["a", "old"], **lifetimes)
    try:
        assert again.accounts["a"].record.consented_at == NOW
        assert again.accounts["old"].record.consented_at == NOW + 3600
        assert (await again.store.load("old")).consented_at == NOW + 3600  # type: ignore[union-attr]
        # A new sign-in starts the age limit over.
        await again.replace_seed("a", "seed-from-login")
        assert again.accounts["a"].reauth_deadline == NOW + 3600 + 30 * 86400
    finally:
        await again.store.close()
