"""Prometheus metrics: names, types and labels of every series, the observer counters,
opt-in per-account series, no token in any label, gzip, and the cost of a scrape at
100,000 accounts."""

from __future__ import annotations

import gzip
import math
import platform
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import anyio
import anyio.lowlevel
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from pydantic import SecretStr

from tokend._version import __version__
from tokend.config import AccountConfig, ServeConfig
from tokend.engine import Account
from tokend.model import AccountState, StoredAccount, TokenSet
from tokend.policy import BreakerState, BreakerStatus, RefreshLifetime, RefreshTiming
from tokend.publish.metrics import (
    CIRCUIT_STATE_VALUES,
    REFRESH_OUTCOMES,
    Metrics,
    gzip_accepted,
)

pytestmark = pytest.mark.anyio

NOW = 1_750_000_000.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# -- an engine-shaped stand-in ----------------------------------------------------------


@dataclass
class FixedClock:
    now: float = NOW

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now


@dataclass
class FakeAccount:
    provider_name: str
    state: AccountState = AccountState.PENDING
    published: TokenSet | None = None
    reauth_deadline: float | None = None
    lifetime: RefreshLifetime = field(default_factory=RefreshLifetime)

    @property
    def provider(self) -> str:
        # A property, as on the engine's Account (the scrape's cost includes the call).
        return self.provider_name


@dataclass
class FakeProvider:
    breaker: BreakerState = field(default_factory=BreakerState)


@dataclass
class FakeEngine:
    accounts: dict[str, FakeAccount | Account] = field(default_factory=dict)
    providers: dict[str, FakeProvider] = field(default_factory=dict)
    clock: FixedClock = field(default_factory=FixedClock)
    store_problem: str | None = None


def token(remaining: float, secret: str = "access-token") -> TokenSet:
    return TokenSet(secret, "Bearer", expires_at=NOW + remaining, issued_at=NOW - 600)


def small_engine() -> FakeEngine:
    """Two providers: ``idp`` (closed breaker) with a few accounts, ``corp`` (open
    for good) with one account whose token expired."""
    engine = FakeEngine(
        providers={
            "idp": FakeProvider(),
            "corp": FakeProvider(BreakerState(status=BreakerStatus.OPEN, permanent=True)),
        }
    )
    engine.accounts = {
        "alice": FakeAccount("idp", AccountState.VALID, token(3000), NOW + 20 * 86400),
        # Within the default 14-day warning.
        "bob": FakeAccount("idp", AccountState.RETRYING, token(45), NOW + 3 * 86400),
        "carol": FakeAccount("idp", AccountState.PENDING),
        "dave": FakeAccount("corp", AccountState.BLOCKED, token(-30)),
    }
    return engine


Families = dict[str, tuple[str, list[Sample]]]


def parse(body: bytes) -> Families:
    families: Families = {}
    for family in text_string_to_metric_families(body.decode()):
        assert family.name not in families, f"{family.name} exposed twice"
        families[family.name] = (family.type, family.samples)
    return families


def samples(families: Families, name: str, sample_name: str | None = None) -> list[Sample]:
    return [s for s in families[name][1] if sample_name is None or s.name == sample_name]


def value(families: Families, sample_name: str, **labels: str) -> float:
    family = sample_name
    for suffix in ("_total", "_bucket", "_count", "_sum"):
        if sample_name.endswith(suffix) and sample_name.removesuffix(suffix) in families:
            family = sample_name.removesuffix(suffix)
    hits = [s.value for s in samples(families, family, sample_name) if s.labels == labels]
    assert len(hits) == 1, f"{sample_name}{labels}: {len(hits)} samples"
    return hits[0]


def label_sets(families: Families, name: str) -> set[frozenset[str]]:
    return {frozenset(s.labels) for s in families[name][1]}


async def render_plain(metrics: Metrics) -> Families:
    body, headers = await metrics.render()
    assert headers == {"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
    return parse(body)


# -- names, types, labels ---------------------------------------------------------------


async def test_every_series_with_its_type_and_labels() -> None:
    metrics = Metrics(small_engine(), ServeConfig())
    metrics.refresh_finished("idp", "success", 0.2)
    metrics.store_committed(0.004)
    metrics.socket_request("token", 200)
    families = await render_plain(metrics)

    # The parser names a counter's family without its _total suffix.
    expected = {
        "tokend_refresh": ("counter", {"provider", "outcome"}),
        "tokend_refresh_duration_seconds": ("histogram", {"provider"}),
        "tokend_store_commit_duration_seconds": ("histogram", set()),
        "tokend_socket_requests": ("counter", {"endpoint", "code"}),
        "tokend_build_info": ("gauge", {"version", "python"}),
        "tokend_accounts": ("gauge", {"provider", "state"}),
        "tokend_token_min_remaining_seconds": ("gauge", {"provider"}),
        "tokend_token_remaining_seconds": ("histogram", {"provider"}),
        "tokend_circuit_state": ("gauge", {"provider"}),
        "tokend_circuit_open_permanent": ("gauge", {"provider"}),
        "tokend_reauth_warning_accounts": ("gauge", {"provider"}),
        "tokend_store_degraded": ("gauge", set()),
        "process_start_time_seconds": ("gauge", set()),
    }
    assert set(families) == set(expected)
    for name, (mtype, labels) in expected.items():
        assert families[name][0] == mtype, name
        bucket_label = {"le"} if mtype == "histogram" else set()
        for sample in families[name][1]:
            if sample.name.endswith("_bucket"):
                assert set(sample.labels) == labels | bucket_label, sample
            else:
                assert set(sample.labels) == labels, sample
    assert samples(families, "tokend_refresh", "tokend_refresh_total")
    assert (
        value(families, "tokend_build_info", version=__version__, python=platform.python_version())
        == 1
    )


async def test_no_created_series() -> None:
    body, _ = await Metrics(small_engine(), ServeConfig()).render()
    assert b"_created" not in body


async def test_an_isolated_registry_per_instance() -> None:
    first = Metrics(small_engine(), ServeConfig())
    second = Metrics(small_engine(), ServeConfig())
    first.refresh_finished("idp", "success", 0.1)
    families = await render_plain(second)
    assert value(families, "tokend_refresh_total", provider="idp", outcome="success") == 0


# -- observer counters ------------------------------------------------------------------


async def test_observer_calls_move_the_counters() -> None:
    metrics = Metrics(small_engine(), ServeConfig())
    before = await render_plain(metrics)
    for outcome in REFRESH_OUTCOMES:
        for provider in ("idp", "corp"):
            assert value(before, "tokend_refresh_total", provider=provider, outcome=outcome) == 0
    assert value(before, "tokend_refresh_duration_seconds_count", provider="idp") == 0
    assert not samples(before, "tokend_socket_requests")

    metrics.refresh_finished("idp", "success", 0.02)
    metrics.refresh_finished("idp", "success", 0.3)
    metrics.refresh_finished("idp", "transient", 12.0)
    metrics.refresh_finished("new-idp", "rate_limited", 0.004)
    metrics.store_committed(0.0004)
    metrics.store_committed(0.2)
    metrics.socket_request("token", 200)
    metrics.socket_request("token", 200)
    metrics.socket_request("accounts", 403)
    after = await render_plain(metrics)

    assert value(after, "tokend_refresh_total", provider="idp", outcome="success") == 2
    assert value(after, "tokend_refresh_total", provider="idp", outcome="transient") == 1
    assert value(after, "tokend_refresh_total", provider="idp", outcome="blocked") == 0
    assert value(after, "tokend_refresh_total", provider="new-idp", outcome="rate_limited") == 1
    assert value(after, "tokend_refresh_duration_seconds_count", provider="idp") == 3
    assert value(after, "tokend_refresh_duration_seconds_sum", provider="idp") == pytest.approx(
        12.32
    )
    assert value(after, "tokend_refresh_duration_seconds_bucket", provider="idp", le="0.025") == 1
    assert value(after, "tokend_refresh_duration_seconds_bucket", provider="idp", le="10.0") == 2
    assert value(after, "tokend_refresh_duration_seconds_bucket", provider="idp", le="30.0") == 3
    assert value(after, "tokend_store_commit_duration_seconds_count") == 2
    assert value(after, "tokend_store_commit_duration_seconds_bucket", le="0.0005") == 1
    assert value(after, "tokend_store_commit_duration_seconds_bucket", le="5.0") == 2
    assert value(after, "tokend_socket_requests_total", endpoint="token", code="200") == 2
    assert value(after, "tokend_socket_requests_total", endpoint="accounts", code="403") == 1


async def test_histogram_ranges() -> None:
    def bounds(families: Families, name: str) -> list[float]:
        les = {s.labels["le"] for s in samples(families, name, name + "_bucket")}
        return sorted(float(le) for le in les)

    metrics = Metrics(small_engine(), ServeConfig())
    families = parse((await metrics.render())[0])
    refresh = bounds(families, "tokend_refresh_duration_seconds")
    assert refresh[0] == 0.005 and refresh[-2] == 30 and math.isinf(refresh[-1])
    commit = bounds(families, "tokend_store_commit_duration_seconds")
    assert commit[0] == 0.0001 and commit[-2] == 5 and math.isinf(commit[-1])
    remaining = bounds(families, "tokend_token_remaining_seconds")
    assert remaining == [0, 60, 300, 900, 1800, 3600, 7200, 86400, math.inf]


# -- the engine's view --------------------------------------------------------------------


async def test_the_engine_view() -> None:
    metrics = Metrics(small_engine(), ServeConfig())
    families = await render_plain(metrics)

    # Every state of every provider, zeros included.
    assert len(samples(families, "tokend_accounts")) == 2 * len(AccountState)
    counts = {
        ("idp", "valid"): 1,
        ("idp", "retrying"): 1,
        ("idp", "pending"): 1,
        ("corp", "blocked"): 1,
    }
    for provider in ("idp", "corp"):
        for state in AccountState:
            expected = counts.get((provider, state.value), 0)
            assert value(families, "tokend_accounts", provider=provider, state=state.value) == (
                expected
            )

    assert value(families, "tokend_token_min_remaining_seconds", provider="idp") == 45
    assert value(families, "tokend_token_min_remaining_seconds", provider="corp") == -30

    remaining = "tokend_token_remaining_seconds"
    assert value(families, remaining + "_count", provider="idp") == 2  # carol has none
    assert value(families, remaining + "_sum", provider="idp") == 3045
    assert value(families, remaining + "_bucket", provider="idp", le="0.0") == 0
    assert value(families, remaining + "_bucket", provider="idp", le="60.0") == 1
    assert value(families, remaining + "_bucket", provider="idp", le="1800.0") == 1
    assert value(families, remaining + "_bucket", provider="idp", le="3600.0") == 2
    assert value(families, remaining + "_bucket", provider="idp", le="+Inf") == 2
    assert value(families, remaining + "_bucket", provider="corp", le="0.0") == 1

    assert value(families, "tokend_circuit_state", provider="idp") == 0
    assert value(families, "tokend_circuit_state", provider="corp") == 2
    assert value(families, "tokend_circuit_open_permanent", provider="idp") == 0
    assert value(families, "tokend_circuit_open_permanent", provider="corp") == 1


def test_every_breaker_status_has_a_value() -> None:
    assert {CIRCUIT_STATE_VALUES[status] for status in BreakerStatus} == {0, 1, 2}


async def test_the_view_follows_the_engine() -> None:
    engine = small_engine()
    metrics = Metrics(engine, ServeConfig())
    engine.providers["idp"].breaker = BreakerState(status=BreakerStatus.HALF_OPEN)
    engine.accounts["carol"].state = AccountState.NEEDS_REAUTH
    del engine.accounts["bob"]
    engine.providers["empty"] = FakeProvider()
    families = await render_plain(metrics)
    assert value(families, "tokend_circuit_state", provider="idp") == 1
    assert value(families, "tokend_accounts", provider="idp", state="needs_reauth") == 1
    assert value(families, "tokend_accounts", provider="idp", state="retrying") == 0
    assert value(families, "tokend_token_min_remaining_seconds", provider="idp") == 3000
    # A provider without accounts: zeros, an empty histogram, no minimum.
    assert value(families, "tokend_accounts", provider="empty", state="valid") == 0
    assert value(families, "tokend_token_remaining_seconds_count", provider="empty") == 0
    assert not [
        s
        for s in samples(families, "tokend_token_min_remaining_seconds")
        if s.labels["provider"] == "empty"
    ]
    assert value(families, "tokend_refresh_total", provider="empty", outcome="success") == 0


# -- per-account series ---------------------------------------------------------------------

PER_ACCOUNT = (
    "tokend_token_expiry_timestamp_seconds",
    "tokend_reauth_deadline_seconds",
    "tokend_account_state",
)


async def test_accounts_nearing_reauthorization_are_counted_per_provider() -> None:
    families = await render_plain(Metrics(small_engine(), ServeConfig()))
    assert value(families, "tokend_reauth_warning_accounts", provider="idp") == 1
    assert value(families, "tokend_reauth_warning_accounts", provider="corp") == 0


async def test_per_account_series_are_opt_in() -> None:
    families = await render_plain(Metrics(small_engine(), ServeConfig()))
    for name in PER_ACCOUNT:
        assert name not in families
    assert all(
        "account" not in labels for name in families for labels in label_sets(families, name)
    )

    families = await render_plain(Metrics(small_engine(), ServeConfig(per_account_metrics=True)))
    assert families["tokend_token_expiry_timestamp_seconds"][0] == "gauge"
    assert families["tokend_account_state"][0] == "gauge"
    expiry = "tokend_token_expiry_timestamp_seconds"
    assert value(families, expiry, account="alice") == NOW + 3000
    assert value(families, expiry, account="dave") == NOW - 30
    assert not [s for s in samples(families, expiry) if s.labels["account"] == "carol"]
    deadlines = {
        s.labels["account"]: s.value for s in samples(families, "tokend_reauth_deadline_seconds")
    }
    assert deadlines == {"alice": NOW + 20 * 86400, "bob": NOW + 3 * 86400}
    # One series per account: its current state, 1.
    states = {
        s.labels["account"]: (s.labels["state"], s.value)
        for s in samples(families, "tokend_account_state")
    }
    assert states == {
        "alice": ("valid", 1),
        "bob": ("retrying", 1),
        "carol": ("pending", 1),
        "dave": ("blocked", 1),
    }


# -- secrets --------------------------------------------------------------------------------


def canary_account(name: str, provider: str, canary: str) -> Account:
    """A real engine account whose every secret carries ``canary``."""
    published = token(1200, secret=f"{canary}-access-{name}")
    record = StoredAccount(
        account=name,
        seed_fingerprint="0123456789abcdef",
        refresh_token=f"{canary}-refresh-{name}",
        token=published,
    )
    config = AccountConfig(provider=provider, refresh_token=SecretStr(f"{canary}-seed-{name}"))
    account = Account(name, config, RefreshTiming(), record, AccountState.VALID, published)
    account.unsaved = record.evolve(refresh_token=f"{canary}-unsaved-{name}")
    return account


@pytest.mark.parametrize("per_account", [False, True])
async def test_no_token_ever_appears(per_account: bool) -> None:
    canary = "CANARY7f3a"
    engine = small_engine()
    for i in range(5):
        engine.accounts[f"acct-{i}"] = canary_account(f"acct-{i}", "idp", canary)
    engine.accounts["alice"].published = token(100, secret=f"{canary}-fake")
    metrics = Metrics(engine, ServeConfig(per_account_metrics=per_account))
    metrics.refresh_finished("idp", "success", 0.1)
    body, _ = await metrics.render()
    assert canary.encode() not in body
    assert canary.lower().encode() not in body.lower()
    families = parse(body)
    assert value(families, "tokend_accounts", provider="idp", state="valid") == 6
    for _, family_samples in families.values():
        for sample in family_samples:
            for label in sample.labels.values():
                assert canary not in label
    if per_account:
        assert value(families, "tokend_account_state", account="acct-3", state="valid") == 1


# -- gzip -----------------------------------------------------------------------------------


async def test_gzip_round_trip() -> None:
    metrics = Metrics(small_engine(), ServeConfig(per_account_metrics=True))
    metrics.refresh_finished("idp", "success", 0.1)
    plain, plain_headers = await metrics.render(None)
    packed, headers = await metrics.render("br;q=1.0, gzip;q=0.8, *;q=0.1")
    assert "Content-Encoding" not in plain_headers
    assert headers["Content-Encoding"] == "gzip"
    assert headers["Content-Type"] == plain_headers["Content-Type"]
    assert packed[:2] == b"\x1f\x8b"
    assert gzip.decompress(packed) == plain
    refused, refused_headers = await metrics.render("gzip;q=0, identity")
    assert "Content-Encoding" not in refused_headers
    assert refused == plain


@pytest.mark.parametrize(
    ("header", "accepted"),
    [
        (None, False),
        ("", False),
        ("gzip", True),
        ("GZip", True),
        ("gzip, deflate, br", True),
        ("br;q=1.0, gzip;q=0.5", True),
        ("gzip;q=0.001", True),
        ("gzip;q=0", False),
        ("gzip; q=0.0", False),
        ("gzip;q=0, *", False),
        ("x-gzip", True),
        ("*", True),
        ("deflate, *;q=0.1", True),
        ("*;q=0", False),
        ("identity", False),
        ("deflate, br", False),
        ("gzip;q=nonsense", False),
        ("gzip;q=nan", False),
        ("gzipped", False),
        (" , ;q=1", False),
    ],
)
def test_gzip_negotiation(header: str | None, accepted: bool) -> None:
    assert gzip_accepted(header) is accepted


# -- concurrency and cost ---------------------------------------------------------------------


async def test_concurrent_scrapes() -> None:
    engine = big_engine(5_000)
    metrics = Metrics(engine, ServeConfig())
    results: list[bytes] = []

    async def scrape() -> None:
        results.append((await metrics.render())[0])

    async with anyio.create_task_group() as group:
        for _ in range(4):
            group.start_soon(scrape)
    assert len(results) == 4
    assert len(set(results)) == 1
    families = parse(results[0])
    assert sum(s.value for s in samples(families, "tokend_accounts")) == 5_000


async def scrape_while_adding(accounts: int, additions: int) -> tuple[Families, int]:
    """Render while another task adds an account at every turn of the loop, up to
    ``additions`` of them; the parsed scrape and how many were added."""
    engine = big_engine(accounts)
    metrics = Metrics(engine, ServeConfig(per_account_metrics=True))
    done = anyio.Event()
    added = 0

    async def reload() -> None:
        nonlocal added
        while not done.is_set() and added < additions:
            await anyio.lowlevel.checkpoint()
            engine.accounts[f"late-{added}"] = FakeAccount("idp-0", AccountState.PENDING)
            added += 1

    async with anyio.create_task_group() as group:
        group.start_soon(reload)
        body, _ = await metrics.render()
        done.set()
    return parse(body), added


async def test_accounts_added_during_a_scrape() -> None:
    # A reload adding accounts while a scrape reads them: the tally starts over.
    families, added = await scrape_while_adding(50_000, 2)
    assert added == 2
    assert sum(s.value for s in samples(families, "tokend_accounts")) == 50_002
    assert len(samples(families, "tokend_account_state")) == 50_002


async def test_accounts_that_never_stop_changing() -> None:
    # After a few restarts, the tally reads a copy and finishes.
    families, added = await scrape_while_adding(50_000, 1_000_000)
    total = sum(s.value for s in samples(families, "tokend_accounts"))
    assert 50_000 < total <= 50_000 + added
    assert len(samples(families, "tokend_account_state")) == total


def big_engine(n: int, providers: int = 5) -> FakeEngine:
    names = [f"idp-{p}" for p in range(providers)]
    engine = FakeEngine(providers={name: FakeProvider() for name in names})
    states = list(AccountState)
    for i in range(n):
        state = states[i % len(states)]
        published = None if state is AccountState.PENDING else token(i % 7200 - 60, f"tok-{i}")
        engine.accounts[f"account-{i:06d}"] = FakeAccount(names[i % providers], state, published)
    return engine


@dataclass
class Timing:
    total: float
    max_gap: float
    ticks: int
    size: int


async def timed_render(metrics: Metrics, accept_encoding: str | None = None) -> Timing:
    """Render while a task ticks every 1 ms; the longest gap between ticks is the
    longest the event loop was kept from other work."""
    gaps: list[float] = []
    done = anyio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await anyio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    async with anyio.create_task_group() as group:
        group.start_soon(ticker)
        await anyio.sleep(0.01)
        gaps.clear()
        started = time.perf_counter()
        body, _ = await metrics.render(accept_encoding)
        total = time.perf_counter() - started
        done.set()
    return Timing(total, max(gaps, default=0.0), len(gaps), len(body))


async def idle_gap(duration: float) -> float:
    """The longest gap between 1 ms ticks over ``duration`` with nothing else running."""
    longest = 0.0
    last = started = time.perf_counter()
    while last - started < duration:
        await anyio.sleep(0.001)
        now = time.perf_counter()
        longest = max(longest, now - last)
        last = now
    return longest


def report(label: str, timings: Iterable[Timing]) -> Timing:
    runs = list(timings)
    for run in runs:
        print(
            f"{label}: render {run.total * 1000:.1f} ms, loop max gap {run.max_gap * 1000:.2f} ms"
            f" ({run.ticks} ticks), body {run.size} bytes"
        )
    return min(runs, key=lambda r: r.total)


async def test_render_at_100k_accounts() -> None:
    engine = big_engine(100_000)
    metrics = Metrics(engine, ServeConfig())
    for provider in engine.providers:
        metrics.refresh_finished(provider, "success", 0.05)
    runs = [await timed_render(metrics) for _ in range(3)]
    best = report("100k accounts", runs)
    report("100k accounts, gzip", [await timed_render(metrics, "gzip")])
    # The render shares the loop: its longest stall is compared with the stalls the
    # same ticker sees with nothing rendering, for as long, on this machine now (a
    # loaded machine stalls both). Its speed is a benchmark's business, not a test's.
    idle = await idle_gap(best.total)
    assert min(run.max_gap for run in runs) < max(0.05, 3 * idle + 0.02), idle
    families = parse((await metrics.render())[0])
    assert sum(s.value for s in samples(families, "tokend_accounts")) == 100_000


async def test_render_at_100k_accounts_per_account() -> None:
    metrics = Metrics(big_engine(100_000), ServeConfig(per_account_metrics=True))
    best = report("100k accounts, per-account series", [await timed_render(metrics)])
    idle = await idle_gap(best.total)
    assert best.max_gap < max(0.1, 3 * idle + 0.02), idle
