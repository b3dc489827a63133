"""Prometheus metrics: the engine's observer, and the ``/metrics`` exposition.

Series
======

Events, counted as they happen (the engine and the socket server call the observer
methods below):

``tokend_refresh_total{provider,outcome}`` counter
    Token requests by outcome: ``success``, ``unsaved`` (the IdP answered but the
    rotated token is not committed yet), ``transient``, ``rate_limited``,
    ``account_permanent``, ``provider_permanent``, ``blocked``. Every outcome of every
    configured provider starts at 0, so ``rate()`` sees the first failure.
``tokend_refresh_duration_seconds{provider}`` histogram
    Time of one token request, 5 ms to 30 s.
``tokend_store_commit_duration_seconds`` histogram
    Time of one durable store write, 0.1 ms to 5 s.
``tokend_socket_requests_total{endpoint,code}`` counter
    Socket API requests by route name (never a raw path) and HTTP status code.
``tokend_build_info{version,python}`` gauge, always 1.
``process_start_time_seconds`` gauge
    When this process set up its metrics (moments after it started), unix seconds.
``tokend_socket_waiting_connections`` gauge
    Socket connections waiting for token changes now (long-polls and event streams;
    at most ``serve.max_waiters``).

Replicas sharing accounts (``state.backend: etcd``), read from the store at scrape time:

``tokend_accounts_owned`` gauge
    Accounts this replica owns (refreshes) now; the others it follows. Summed over
    the fleet it is the number of accounts once every account has an owner.
``tokend_replicas`` gauge
    Live replicas this one sees in the membership, itself included.
``tokend_store_accounts_acquired_total`` counter
    Accounts this replica became the owner of (at start, at a rebalance, at a
    takeover from a replica whose lease ran out).
``tokend_store_fenced_writes_total`` counter
    Writes refused because the account's ownership had moved (this replica's lease
    ran out while it was paused or cut off): each one a write that did not land.
``tokend_store_records_followed_total`` counter
    Records written by other replicas and received here (each refresh elsewhere is
    two: the in-flight mark and the commit).

The engine's view, computed at scrape time:

``tokend_accounts{provider,state}`` gauge
    Accounts per provider and state. Every state of every known provider is present
    (zeros included), so a series does not vanish when its count drops to 0.
``tokend_token_min_remaining_seconds{provider}`` gauge
    The shortest remaining lifetime among the provider's accounts holding a token;
    negative when one of them is expired (an account in ``needs_reauth`` keeps it
    negative until it is re-seeded). Absent for a provider with no token at all.
``tokend_token_remaining_seconds{provider}`` histogram
    How the remaining lifetimes of the provider's tokens are spread right now
    (``le`` 0, 60, 300, 900, 1800, 3600, 7200, 86400). It describes the current
    moment, not events: read it directly (``histogram_quantile(0.01, ...)``,
    ``..._bucket{le="0.0"}`` for expired tokens), without ``rate()``. ``_sum`` is the
    sum of remaining seconds and may be negative.
``tokend_circuit_state{provider}`` gauge
    The provider's circuit breaker: 0 closed, 1 half-open, 2 open.
``tokend_circuit_open_permanent{provider}`` gauge
    1 while the breaker is held open until the configuration changes
    (``invalid_client`` and the like), else 0.
``tokend_reauth_warning_accounts{provider}`` gauge
    Accounts whose re-authorization deadline (see ``tokend_reauth_deadline_seconds``)
    is within their provider's ``reauth_warning``, or past: someone has to sign in
    again (``tokend login``) before then. 0 when none is.
``tokend_store_degraded`` gauge
    1 while the durable store is unsound (its file was deleted or replaced and not
    yet rebuilt, say), else 0. Rotated tokens may not be durable meanwhile.
``tokend_publish_failing{publisher}`` gauge
    Accounts whose published form does not show their current token (``publisher``
    ``token_files``: files that cannot be written); 0 when all is well.
``tokend_publish_errors_total{publisher}`` counter
    Failed attempts to publish (each write that failed, retries included).

Opt-in with ``serve.per_account_metrics: true`` (one series per account, so a label
per account; off by default to keep cardinality bounded by providers and states):

``tokend_token_expiry_timestamp_seconds{account}`` gauge
    Unix time at which the account's published token expires (accounts holding one).
``tokend_reauth_deadline_seconds{account}`` gauge
    Unix time by which the account's refresh token stops working however often it is
    refreshed (like ``tokend_token_expiry_timestamp_seconds``, a point in time:
    ``tokend_reauth_deadline_seconds - time()`` is what is left). Only accounts with a
    known deadline: a ``refresh_token_max_age``, an IdP-reported refresh-token expiry
    that refreshes do not move, or, while the account cannot be refreshed, its idle
    limit.
``tokend_account_state{account,state}`` gauge
    1, for the account's current state only. The full enum pattern (every state, 0 or
    1) would cost seven series per account; with one, a state change ends the old
    series (Prometheus marks it stale) and starts the new one, so
    ``tokend_account_state{state="needs_reauth"}`` lists exactly the accounts in it.

No label holds a token or a secret: labels are provider, account and route names,
states, outcomes and status codes.

Scraping without stalling token serving
=======================================

:meth:`Metrics.render` tallies the engine's accounts on the event loop, reading the
live mapping in slices of about half a millisecond and yielding to the loop between
slices, so token requests keep being served during a scrape of 100,000 accounts
(no stretch of the tally holds the loop longer than one slice).
Accounts that change state meanwhile are each counted once, in whichever state they
were in when their slice ran; accounts added or removed meanwhile start the tally
over. Formatting the exposition and compressing it run in a worker thread; the
per-account lines are written without prometheus_client's metric objects, which
are far too slow for 100,000 series.
"""

from __future__ import annotations

import bisect
import collections
import gzip
import math
import platform
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import TYPE_CHECKING, Protocol

import anyio.lowlevel
import anyio.to_thread
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from tokend._version import __version__
from tokend.config import ServeConfig
from tokend.model import AccountState, TokenSet
from tokend.oauth import FailureKind
from tokend.policy import BreakerState, BreakerStatus, RefreshLifetime
from tokend.publish._base import ReportingPublisher

if TYPE_CHECKING:
    from tokend.clock import Clock
    from tokend.store import Ownership

REFRESH_OUTCOMES: tuple[str, ...] = ("success", "unsaved", *(kind.value for kind in FailureKind))

# Token requests: a fast local IdP answers in a few ms; the default timeout is 10 s.
REFRESH_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# sqlite with synchronous=FULL: well under a millisecond on tmpfs, tens of ms on a
# busy disk, seconds when something is wrong.
STORE_COMMIT_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
# Remaining token lifetime: expired, under a minute, 5 and 15 minutes, half an hour,
# an hour (the usual lifetime), two hours, a day.
REMAINING_BUCKETS = (0.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 86400.0)

CIRCUIT_STATE_VALUES: Mapping[BreakerStatus, float] = {
    BreakerStatus.CLOSED: 0.0,
    BreakerStatus.HALF_OPEN: 1.0,
    BreakerStatus.OPEN: 2.0,
}

# The tally yields to the event loop once a slice has run this long...
_SLICE_BUDGET = 0.0005
# ...checking the time every this many accounts.
_SLICE_STEP = 128
# Per-account lines formatted between two releases of the GIL by the worker thread.
_FORMAT_STEP = 1000
# Tallies restarted because accounts were added or removed meanwhile, before one
# runs on a copy.
_TALLY_ATTEMPTS = 3

_GZIP_LEVEL = 6


# -- what metrics read from the engine --------------------------------------------------


class AccountView(Protocol):
    @property
    def provider(self) -> str: ...

    @property
    def state(self) -> AccountState: ...

    @property
    def published(self) -> TokenSet | None: ...

    @property
    def reauth_deadline(self) -> float | None: ...

    @property
    def lifetime(self) -> RefreshLifetime: ...


class ProviderView(Protocol):
    @property
    def breaker(self) -> BreakerState: ...


class EngineView(Protocol):
    """The part of :class:`tokend.engine.Engine` that metrics read."""

    @property
    def accounts(self) -> Mapping[str, AccountView]: ...

    @property
    def providers(self) -> Mapping[str, ProviderView]: ...

    @property
    def clock(self) -> Clock: ...

    @property
    def store_problem(self) -> str | None: ...


# -- a scrape's snapshot of the engine --------------------------------------------------


@dataclass(slots=True)
class _ProviderTally:
    states: dict[AccountState, int] = field(default_factory=lambda: dict.fromkeys(AccountState, 0))
    tokens: int = 0
    min_remaining: float = float("inf")
    # Non-cumulative: index i counts remaining <= REMAINING_BUCKETS[i] (and above the
    # previous bound); the last index is above every bound.
    remaining_counts: list[int] = field(default_factory=lambda: [0] * (len(REMAINING_BUCKETS) + 1))
    remaining_sum: float = 0.0
    circuit: BreakerStatus | None = None
    permanent: bool = False
    # Accounts whose re-authorization deadline is within their warning lead.
    reauth_warning: int = 0


class _AccountsChanged(Exception):
    """The engine's accounts were added or removed while a tally read them."""


@dataclass(slots=True)
class _Snapshot:
    providers: dict[str, _ProviderTally]
    store_degraded: bool = False
    # Per-account series (opt-in): parallel lists.
    account_names: list[str] | None = None
    account_states: list[AccountState] | None = None
    account_expiries: list[float | None] | None = None
    account_deadlines: list[float | None] | None = None
    # (publisher, accounts failing, errors so far) for publishers that report failures.
    publishers: list[tuple[str, int, int]] = field(default_factory=list)


def _tally(
    accounts: Sequence[AccountView],
    providers: dict[str, _ProviderTally],
    now: float,
    states_out: list[AccountState] | None,
    expiries_out: list[float | None] | None,
    deadlines_out: list[float | None] | None = None,
) -> None:
    """Count ``accounts`` into ``providers``, and append each account's state, expiry
    and re-authorization deadline to ``states_out``, ``expiries_out`` and
    ``deadlines_out`` when given (the hot loop: lean)."""
    bounds = REMAINING_BUCKETS
    find = bisect.bisect_left
    add_state = states_out.append if states_out is not None else None
    add_expiry = expiries_out.append if expiries_out is not None else None
    add_deadline = deadlines_out.append if deadlines_out is not None else None
    for account in accounts:
        name = account.provider
        tally = providers.get(name)
        if tally is None:
            tally = providers[name] = _ProviderTally()
        state = account.state
        tally.states[state] += 1
        token = account.published
        expires_at = None if token is None else token.expires_at
        deadline = account.reauth_deadline
        if deadline is not None and deadline - now <= account.lifetime.warning:
            tally.reauth_warning += 1
        if add_state is not None:
            add_state(state)
        if add_expiry is not None:
            add_expiry(expires_at)
        if add_deadline is not None:
            add_deadline(deadline)
        if expires_at is None:
            continue
        remaining = expires_at - now
        tally.tokens += 1
        if remaining < tally.min_remaining:
            tally.min_remaining = remaining
        tally.remaining_counts[find(bounds, remaining)] += 1
        tally.remaining_sum += remaining


class _SnapshotCollector:
    """The scrape-time series, from one snapshot (a collector per scrape, so
    concurrent scrapes never share state)."""

    def __init__(self, snapshot: _Snapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        providers = sorted(self.snapshot.providers.items())
        accounts = GaugeMetricFamily(
            "tokend_accounts", "Accounts per provider and state.", labels=["provider", "state"]
        )
        min_remaining = GaugeMetricFamily(
            "tokend_token_min_remaining_seconds",
            "Shortest remaining lifetime among the provider's tokens (negative: expired).",
            labels=["provider"],
        )
        remaining = HistogramMetricFamily(
            "tokend_token_remaining_seconds",
            "Remaining lifetime of the provider's tokens, now (a snapshot: do not rate()).",
            labels=["provider"],
        )
        circuit = GaugeMetricFamily(
            "tokend_circuit_state",
            "Provider circuit breaker: 0 closed, 1 half-open, 2 open.",
            labels=["provider"],
        )
        permanent = GaugeMetricFamily(
            "tokend_circuit_open_permanent",
            "1 while the provider's breaker is open until the configuration changes.",
            labels=["provider"],
        )
        reauth = GaugeMetricFamily(
            "tokend_reauth_warning_accounts",
            "Accounts whose re-authorization deadline is within the provider's reauth_warning.",
            labels=["provider"],
        )
        les = [repr(float(bound)) for bound in REMAINING_BUCKETS] + ["+Inf"]
        for name, tally in providers:
            for state, count in tally.states.items():
                accounts.add_metric([name, state.value], count)
            reauth.add_metric([name], tally.reauth_warning)
            if tally.tokens:
                min_remaining.add_metric([name], tally.min_remaining)
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for le, count in zip(les, tally.remaining_counts, strict=True):
                cumulative += count
                buckets.append((le, cumulative))
            remaining.add_metric([name], buckets, tally.remaining_sum)
            if tally.circuit is not None:
                circuit.add_metric([name], CIRCUIT_STATE_VALUES[tally.circuit])
                permanent.add_metric([name], 1.0 if tally.permanent else 0.0)
        store = GaugeMetricFamily(
            "tokend_store_degraded",
            "1 while the durable store is unsound (its file deleted or replaced, say).",
        )
        store.add_metric([], 1.0 if self.snapshot.store_degraded else 0.0)
        yield from (accounts, min_remaining, remaining, circuit, permanent, reauth, store)
        if self.snapshot.publishers:
            failing = GaugeMetricFamily(
                "tokend_publish_failing",
                "Accounts whose published form does not show their current token.",
                labels=["publisher"],
            )
            errors = CounterMetricFamily(
                "tokend_publish_errors",
                "Failed attempts to publish a token (retries included).",
                labels=["publisher"],
            )
            for publisher, count, total in self.snapshot.publishers:
                failing.add_metric([publisher], count)
                errors.add_metric([publisher], total)
            yield from (failing, errors)


_EXPIRY_HEADER = (
    "# HELP tokend_token_expiry_timestamp_seconds "
    "Unix time at which the account's published token expires.\n"
    "# TYPE tokend_token_expiry_timestamp_seconds gauge\n"
)
_DEADLINE_HEADER = (
    "# HELP tokend_reauth_deadline_seconds "
    "Unix time by which the account's refresh token stops working, however often refreshed.\n"
    "# TYPE tokend_reauth_deadline_seconds gauge\n"
)
_STATE_HEADER = (
    "# HELP tokend_account_state "
    "1 for the account's current state (other states are not exported).\n"
    "# TYPE tokend_account_state gauge\n"
)


def _label_value(value: str) -> str:
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return value


def _sample_value(value: float) -> str:
    if math.isfinite(value):
        return repr(float(value))
    return "NaN" if math.isnan(value) else ("+Inf" if value > 0 else "-Inf")


def _per_account_exposition(snapshot: _Snapshot) -> list[bytes]:
    """The per-account families in the text format, in pieces; runs in a worker
    thread.

    Written directly: 100,000 accounts through prometheus_client's metric objects
    take over a second and allocate enough tracked objects to set off full garbage
    collections (which hold every thread), while plain strings take a fraction of
    that and none. Between pieces the thread lets go of the GIL, so the event loop
    never waits out a whole switch interval (5 ms) for it.
    """
    names = snapshot.account_names
    states = snapshot.account_states
    expiries = snapshot.account_expiries
    deadlines = snapshot.account_deadlines
    if names is None or states is None or expiries is None or deadlines is None:
        return []
    step = _FORMAT_STEP
    labels: list[str] = []
    for start in range(0, len(names), step):
        labels.extend(map(_label_value, names[start : start + step]))
        time.sleep(0)
    pieces = [_EXPIRY_HEADER.encode()]
    pieces += _timestamp_pieces("tokend_token_expiry_timestamp_seconds", labels, expiries)
    pieces.append(_DEADLINE_HEADER.encode())
    pieces += _timestamp_pieces("tokend_reauth_deadline_seconds", labels, deadlines)
    pieces.append(_STATE_HEADER.encode())
    for start in range(0, len(labels), step):
        lines = [
            f'tokend_account_state{{account="{label}",state="{state.value}"}} 1.0\n'
            for label, state in zip(
                labels[start : start + step], states[start : start + step], strict=True
            )
        ]
        pieces.append("".join(lines).encode())
        time.sleep(0)
    return pieces


def _timestamp_pieces(
    family: str, labels: list[str], values: Sequence[float | None]
) -> list[bytes]:
    """One sample per account that has a value, in pieces (see above)."""
    pieces: list[bytes] = []
    step = _FORMAT_STEP
    for start in range(0, len(labels), step):
        lines = [
            f'{family}{{account="{label}"}} {_sample_value(at)}\n'
            for label, at in zip(
                labels[start : start + step], values[start : start + step], strict=True
            )
            if at is not None
        ]
        pieces.append("".join(lines).encode())
        time.sleep(0)
    return pieces


class _SocketRequests:
    """``tokend_socket_requests_total`` from plain counts kept on the event loop."""

    def __init__(self, counts: collections.Counter[tuple[str, int]]) -> None:
        self.counts = counts

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "tokend_socket_requests",
            "Socket API requests by route name and status code.",
            labels=["endpoint", "code"],
        )
        # Copy first: the loop may add a key while this thread iterates.
        for (endpoint, code), count in list(self.counts.items()):
            family.add_metric([endpoint, str(code)], count)
        yield family


class _Waiting:
    """``tokend_socket_waiting_connections``, read from the feed at scrape time."""

    def __init__(self, count: Callable[[], int]) -> None:
        self.count = count

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "tokend_socket_waiting_connections",
            "Socket connections waiting for token changes (long-polls, event streams).",
            value=self.count(),
        )


class _Replicas:
    """The shared store's series, read from its ownership view at scrape time."""

    def __init__(self, read: Callable[[], Ownership]) -> None:
        self.read = read

    def collect(self) -> Iterator[Metric]:
        view = self.read()
        yield GaugeMetricFamily(
            "tokend_accounts_owned",
            "Accounts this replica owns (refreshes) in the shared store.",
            value=view.owned,
        )
        yield GaugeMetricFamily(
            "tokend_replicas", "Live replicas seen, this one included.", value=view.replicas
        )
        yield CounterMetricFamily(
            "tokend_store_accounts_acquired",
            "Accounts this replica became the owner of (start, rebalance, takeover).",
            value=view.acquired_total,
        )
        yield CounterMetricFamily(
            "tokend_store_fenced_writes",
            "Writes refused because the account's ownership had moved.",
            value=view.fenced_writes_total,
        )
        yield CounterMetricFamily(
            "tokend_store_records_followed",
            "Records written by other replicas and received here.",
            value=view.records_followed_total,
        )


class _Scrape:
    """What one scrape exposes: the registry's series, then the snapshot's.

    prometheus_client adds a ``_created`` series (the creation time) beside every
    counter and histogram; the text format shows it as one more gauge per series, so
    it is left out here rather than switched off process-wide.
    """

    def __init__(self, *collectors: Collector) -> None:
        self.collectors = collectors

    def collect(self) -> Iterator[Metric]:
        for collector in self.collectors:
            for metric in collector.collect():
                if metric.type in ("counter", "histogram"):
                    metric.samples = [s for s in metric.samples if not s.name.endswith("_created")]
                yield metric


# -- content negotiation ----------------------------------------------------------------


def gzip_accepted(accept_encoding: str | None) -> bool:
    """Whether an ``Accept-Encoding`` header accepts gzip with a q-value above 0
    (``gzip`` or ``x-gzip`` by name, else ``*``)."""
    if not accept_encoding:
        return False
    weights: dict[str, float] = {}
    for item in accept_encoding.split(","):
        coding, _, params = item.partition(";")
        coding = coding.strip().lower()
        if not coding:
            continue
        weight = 1.0
        for param in params.split(";"):
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    weight = float(value.strip())
                except ValueError:
                    weight = 0.0
                if not 0.0 <= weight <= 1.0:  # also NaN
                    weight = 0.0
        weights[coding] = max(weight, weights.get(coding, 0.0))
    for coding in ("gzip", "x-gzip"):
        if coding in weights:
            return weights[coding] > 0.0
    return weights.get("*", 0.0) > 0.0


# -- the metrics -------------------------------------------------------------------------


class Metrics:
    """Collects tokend's series; :meth:`render` builds the exposition off the loop.

    The observer methods run on the event loop and are cheap; the registry is this
    instance's own (never prometheus_client's global one).
    """

    def __init__(
        self,
        engine: EngineView,
        serve: ServeConfig,
        *,
        writeback_pending: Callable[[], int] | None = None,
    ) -> None:
        self.engine = engine
        self.serve = serve
        self.registry = CollectorRegistry(auto_describe=False)
        self._refresh_total = Counter(
            "tokend_refresh",
            "Token requests by provider and outcome.",
            ["provider", "outcome"],
            registry=self.registry,
        )
        self._refresh_duration = Histogram(
            "tokend_refresh_duration_seconds",
            "Time of one token request.",
            ["provider"],
            buckets=REFRESH_DURATION_BUCKETS,
            registry=self.registry,
        )
        self._store_commit = Histogram(
            "tokend_store_commit_duration_seconds",
            "Time of one durable store write.",
            buckets=STORE_COMMIT_BUCKETS,
            registry=self.registry,
        )
        # Counted on the token hot path: a plain dict increment (~50 ns) instead of a
        # labelled child lookup and a locked increment (~2-7 us); exported at scrape.
        self._socket_counts: collections.Counter[tuple[str, int]] = collections.Counter()
        self.registry.register(_SocketRequests(self._socket_counts))
        build_info = Gauge(
            "tokend_build_info",
            "tokend's version and the Python running it (always 1).",
            ["version", "python"],
            registry=self.registry,
        )
        build_info.labels(__version__, platform.python_version()).set(1)
        if writeback_pending is not None:
            Gauge(
                "tokend_vault_writeback_pending",
                "Accounts whose rotated refresh token is not written back to the vault yet.",
                registry=self.registry,
            ).set_function(writeback_pending)
        # The conventional name, so alerts and dashboards can tell a fresh start.
        Gauge(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            registry=self.registry,
        ).set(time.time())
        self._known_providers: set[str] = set()
        self._add_providers(engine.providers)

    def _add_providers(self, names: Iterable[str]) -> None:
        """Start every outcome of new providers at 0 (so their series exist before
        their first refresh)."""
        for name in names:
            if name in self._known_providers:
                continue
            self._known_providers.add(name)
            for outcome in REFRESH_OUTCOMES:
                self._refresh_total.labels(name, outcome)
            self._refresh_duration.labels(name)

    # -- observer (called on the event loop) --------------------------------------------

    def refresh_finished(self, provider: str, outcome: str, duration: float) -> None:
        self._refresh_total.labels(provider, outcome).inc()
        self._refresh_duration.labels(provider).observe(duration)

    def store_committed(self, duration: float) -> None:
        self._store_commit.observe(duration)

    def socket_request(self, endpoint: str, code: int) -> None:
        """Count one socket API request (``endpoint`` is a route name, not a path)."""
        self._socket_counts[endpoint, code] += 1

    def count_waiting(self, count: Callable[[], int]) -> None:
        """Expose ``count()``, the connections waiting for token changes."""
        self.registry.register(_Waiting(count))

    def count_ownership(self, read: Callable[[], Ownership]) -> None:
        """Expose a shared store's ``ownership()`` (replicas sharing accounts)."""
        self.registry.register(_Replicas(read))

    # -- exposition ---------------------------------------------------------------------

    async def render(self, accept_encoding: str | None = None) -> tuple[bytes, dict[str, str]]:
        """The exposition body and its response headers (Content-Type, and
        Content-Encoding: gzip when ``accept_encoding`` allows it)."""
        snapshot = await self._snapshot()
        compress = gzip_accepted(accept_encoding)
        body = await anyio.to_thread.run_sync(self._expose, snapshot, compress)
        headers = {"Content-Type": CONTENT_TYPE_PLAIN_0_0_4}
        if compress:
            headers["Content-Encoding"] = "gzip"
        return body, headers

    async def _snapshot(self) -> _Snapshot:
        """Tally the engine's view on the event loop, yielding between slices."""
        accounts = self.engine.accounts
        for _ in range(_TALLY_ATTEMPTS):
            try:
                return await self._tally_view(accounts)
            except _AccountsChanged:
                continue
        # Accounts keep being added or removed: tally a copy (a few ms at 100k).
        return await self._tally_view(dict(accounts))

    async def _tally_view(self, accounts: Mapping[str, AccountView]) -> _Snapshot:
        engine = self.engine
        self._add_providers(engine.providers)
        tallies: dict[str, _ProviderTally] = {}
        for name, runtime in engine.providers.items():
            breaker = runtime.breaker
            tallies[name] = _ProviderTally(circuit=breaker.status, permanent=breaker.permanent)
        snapshot = _Snapshot(tallies, store_degraded=engine.store_problem is not None)
        for publisher in getattr(engine, "publishers", ()):
            if isinstance(publisher, ReportingPublisher):
                snapshot.publishers.append(
                    (
                        publisher.publisher_name,
                        len(publisher.failures()),
                        publisher.errors_total,
                    )
                )
        names = None
        if self.serve.per_account_metrics:
            names = snapshot.account_names = []
            snapshot.account_states = []
            snapshot.account_expiries = []
            snapshot.account_deadlines = []
        # The live mapping, read in slices (no copy of 100,000 entries on the loop);
        # a change of its size between slices (a reload) starts the tally over.
        keys = iter(accounts)
        values = iter(accounts.values())
        now = engine.clock.time()
        slice_started = time.perf_counter()
        while True:
            try:
                chunk = list(islice(values, _SLICE_STEP))
                if names is not None:
                    names.extend(islice(keys, _SLICE_STEP))
            except RuntimeError as exc:  # "dictionary changed size during iteration"
                raise _AccountsChanged from exc
            if not chunk:
                return snapshot
            _tally(
                chunk,
                tallies,
                now,
                snapshot.account_states,
                snapshot.account_expiries,
                snapshot.account_deadlines,
            )
            if time.perf_counter() - slice_started >= _SLICE_BUDGET:
                await anyio.lowlevel.checkpoint()
                slice_started = time.perf_counter()

    def _expose(self, snapshot: _Snapshot, compress: bool) -> bytes:
        """Format (and maybe compress) one scrape; runs in a worker thread."""
        body = generate_latest(_Scrape(self.registry, _SnapshotCollector(snapshot)))
        if snapshot.account_names is not None:
            body = b"".join([body, *_per_account_exposition(snapshot)])
        if compress:
            body = gzip.compress(body, compresslevel=_GZIP_LEVEL, mtime=0)
        return body
