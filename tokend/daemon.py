"""Wiring and lifecycle: build the pieces from a config, run them, handle signals.

SIGTERM and SIGINT stop scheduling and drain in-flight refreshes (bounded by
``serve.drain_timeout``) before the process exits: 0, or 3 if a rotated refresh token
could not be committed (the log names the accounts). A state file another tokend holds
is one error line and exit 2.
"""

from __future__ import annotations

import gc
import hashlib
import signal
from collections.abc import Callable, Coroutine
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskGroup

from tokend import logs
from tokend._version import __version__
from tokend.config import Config, ConfigError, ProviderConfig, load_config
from tokend.engine import Engine
from tokend.oauth import ProviderClient, ProviderSetupError
from tokend.publish import Publisher, TokenFiles
from tokend.publish._feed import TokenFeed
from tokend.publish.metrics import Metrics
from tokend.publish.server import ServeError, serve_socket, serve_tcp
from tokend.publish.systemd import SystemdNotifier, notify_systemd
from tokend.sources import SeedSources, SeedWatcher, VaultClient, VaultError, VaultWriteBack
from tokend.store import SharedStore, StoreError, open_store

_log = logs.get_logger()

# A server run in the daemon's task group: ``await service(task_status=...)``.
Service = Callable[..., Coroutine[Any, Any, None]]
# How often token files that could not be written are looked at again (each account
# backs off on its own; see TokenFiles.retry_failed).
_PUBLISH_RETRY_TICK = 1.0


def build_clients(config: Config) -> tuple[dict[str, ProviderClient], dict[str, str]]:
    """One client per provider. A provider that cannot be set up (an unreadable key
    file, say) is reported, and its accounts wait; every other provider runs."""
    clients: dict[str, ProviderClient] = {}
    errors: dict[str, str] = {}
    for name, pconf in config.providers.items():
        try:
            clients[name] = ProviderClient(name, pconf)
        except ProviderSetupError as exc:
            errors[name] = str(exc)
            _log.error("provider_setup_failed", provider=name, error=str(exc))
    return clients, errors


def provider_fingerprint(config: ProviderConfig) -> str:
    """Changes when anything that shapes a provider's client changes, including the
    content of its secret and key files (so fixing a secret file and sending SIGHUP
    counts as a config change). Reads files: call it in a worker thread."""
    digest = hashlib.sha256(config.model_dump_json().encode())
    if config.client_secret is not None:
        digest.update(b"\0secret\0" + config.client_secret.get_secret_value().encode())
    for path in (config.client_secret_file, config.private_key_file):
        if path is not None:
            try:
                digest.update(b"\0file\0" + path.read_bytes())
            except OSError as exc:
                digest.update(f"\0unreadable\0{exc.errno}".encode())
    return digest.hexdigest()


def provider_fingerprints(config: Config) -> dict[str, str]:
    return {name: provider_fingerprint(p) for name, p in config.providers.items()}


async def read_providers(
    config: Config, previous: dict[str, str] | None = None
) -> tuple[dict[str, str], set[str], dict[str, ProviderClient], dict[str, str]]:
    """Every provider's fingerprint, the providers whose fingerprint differs from
    ``previous`` (all of them without it), and clients (with setup errors) for those.
    Secret and key files are read in a worker thread: a slow volume must not stall the
    event loop, which goes on serving tokens meanwhile."""

    def read() -> tuple[dict[str, str], set[str], dict[str, ProviderClient], dict[str, str]]:
        fingerprints = provider_fingerprints(config)
        changed = {
            name
            for name, fp in fingerprints.items()
            if previous is None or previous.get(name) != fp
        }
        providers = {name: config.providers[name] for name in sorted(changed)}
        clients, errors = build_clients(config.model_copy(update={"providers": providers}))
        return fingerprints, changed, clients, errors

    return await anyio.to_thread.run_sync(read)


def build_publishers(config: Config) -> list[Publisher]:
    """The publishers, in the order the engine awaits them. Raises ValueError for an
    unusable setting (an unknown token file owner, a template that is not allowed)."""
    from tokend.publish.notify import ChangeNotifier

    serve = config.serve
    publishers: list[Publisher] = []
    if serve.token_dir is not None:
        publishers.append(
            TokenFiles(
                serve.token_dir,
                serve.token_file_mode,
                owner=serve.token_file_owner,
                group=serve.token_file_group,
                outputs={name: account.outputs for name, account in config.accounts.items()},
            )
        )
    # After the files: an application told about a new token reads it from them.
    if any(account.on_change is not None for account in config.accounts.values()):
        publishers.append(ChangeNotifier(config.accounts, token_dir=serve.token_dir))
    return publishers


class Daemon:
    """One tokend process: the engine plus everything around it."""

    def __init__(self, config: Config, config_path: Path) -> None:
        self.config = config
        self.config_path = config_path
        self.clients: dict[str, ProviderClient] = {}
        self.fingerprints: dict[str, str] = {}
        self.vault: VaultClient | None = None
        self.seeds = SeedSources(None)
        self.write_back: VaultWriteBack | None = None
        self.systemd = SystemdNotifier.from_environ()
        self.feed: TokenFeed | None = None

    async def _close_clients(self) -> None:
        for client in self.clients.values():
            await client.aclose()

    async def _open(self, stack: AsyncExitStack) -> Engine:
        store = open_store(self.config.state)
        await store.open()
        stack.push_async_callback(store.close)
        self.fingerprints, _, clients, errors = await read_providers(self.config)
        self.clients = dict(clients)
        stack.push_async_callback(self._close_clients)
        await self._open_vault(stack)
        engine = Engine(
            self.config,
            store,
            clients,
            client_errors=errors,
            publishers=build_publishers(self.config),
            seeds=self.seeds,
            write_back=self.write_back,
        )
        sink = self.write_back
        self.metrics = Metrics(
            engine,
            self.config.serve,
            writeback_pending=None if sink is None else lambda: len(sink.pending),
        )
        engine.observers.append(self.metrics)
        if isinstance(store, SharedStore):
            self.metrics.count_ownership(store.ownership)
        if self.config.serve.socket is not None:
            # Last: a connection it wakes finds the token files already written.
            feed = self.feed = TokenFeed(engine, self.config.serve.waiters_limit)
            engine.publishers = [*engine.publishers, feed]
            self.metrics.count_waiting(lambda: feed.waiting)
        return engine

    async def _open_vault(self, stack: AsyncExitStack) -> None:
        """The vault client, and every vault seed read ahead (a secret that cannot be
        read is its accounts' seed error; the others start)."""
        if self.config.vault is None:
            return
        vault = self.vault = VaultClient(self.config.vault)
        stack.push_async_callback(vault.aclose)
        self.seeds = SeedSources(vault)
        self.write_back = VaultWriteBack(vault, self.seeds, lambda: self.config.accounts)
        try:
            await vault.ensure_token()
        except VaultError as exc:
            # Each account's read below says it again, with its secret.
            _log.error("vault_auth_failed", error=str(exc))
        await self.seeds.sync(self.config.accounts)

    async def _seed_tasks(self, engine: Engine, group: TaskGroup) -> None:
        watcher = SeedWatcher(
            self.seeds,
            lambda: self.config.accounts,
            engine.reseed,
            vault_interval=self.config.vault.poll_interval if self.config.vault else 30.0,
        )
        group.start_soon(watcher.run)
        if self.vault is not None:
            group.start_soon(self.vault.maintain_token)
        if self.write_back is not None:
            group.start_soon(self.write_back.run, engine)

    async def run(self) -> int:
        code = 1
        try:
            code = await self._run()
        except* StoreError as store_errors:
            # The state file is another tokend's, or cannot be opened: nothing was
            # refreshed, and starting anyway would spend the same refresh tokens twice.
            for store_error in store_errors.exceptions:
                _log.error("cannot_open_store", error=str(store_error))
            code = 2
        except* ServeError as serve_errors:
            # A socket or port tokend cannot take (another tokend is live on it, say):
            # say so in one line; nothing has been refreshed yet.
            for serve_error in serve_errors.exceptions:
                _log.error("cannot_serve", error=str(serve_error))
        return code

    async def _run(self) -> int:
        async with AsyncExitStack() as stack:
            engine = await self._open(stack)
            _log.info(
                "starting",
                version=__version__,
                config=str(self.config_path),
                providers=len(self.config.providers),
                accounts=len(self.config.accounts),
            )
            async with anyio.create_task_group() as group:
                store = engine.store
                # What other replicas write from here on reaches this one, after load.
                changes = store.changes() if isinstance(store, SharedStore) else None
                await self._start_shared_store(engine, group)
                await engine.load()
                # The accounts just loaded live as long as the process: keep the cyclic
                # collector from rescanning them (a full pass over 100,000 accounts stops
                # every thread for ~125 ms).
                gc.collect()
                gc.freeze()
                if changes is not None:
                    group.start_soon(engine.follow, changes)
                group.start_soon(self._handle_signals, engine, group)
                await self._seed_tasks(engine, group)
                group.start_soon(self._retry_failed_publishing, engine)
                # Services answer while the engine runs and drains, then stop with it.
                for service in self._services(engine):
                    await group.start(service)
                code = await engine.run()
                group.cancel_scope.cancel()
            _log.info("stopped", exit_code=code)
        return code

    async def _start_shared_store(self, engine: Engine, group: TaskGroup) -> None:
        """A store shared with other replicas (etcd) keeps its lease and watch in the
        background, from before the first read until the process stops."""
        if isinstance(engine.store, SharedStore):
            await group.start(engine.store.run)

    def _services(self, engine: Engine) -> list[Service]:
        """Long-running servers around the engine; each is started with
        ``task_group.start`` and reports readiness through ``task_status``."""
        services: list[Service] = []
        if self.config.serve.socket is not None:
            services.append(
                partial(serve_socket, engine, self.config, self.metrics, feed=self.feed)
            )
        if self.config.serve.metrics_listen is not None:
            services.append(partial(serve_tcp, engine, self.config, self.metrics))
        if self.systemd is not None:
            services.append(partial(notify_systemd, engine, self.systemd))
        return services

    async def run_once(self) -> int:
        try:
            return await self._run_once()
        except StoreError as exc:
            _log.error("cannot_open_store", error=str(exc))
            return 2

    async def _run_once(self) -> int:
        async with AsyncExitStack() as stack:
            engine = await self._open(stack)
            async with anyio.create_task_group() as group:
                await self._start_shared_store(engine, group)
                ok = await engine.run_once()
                group.cancel_scope.cancel()
            missing = sorted(
                name
                for name, account in engine.accounts.items()
                if not account.token_valid(engine.clock.time())
            )
            _log.info("once_done", ok=ok, accounts_without_token=missing)
        return 0 if ok else 1

    async def _retry_failed_publishing(self, engine: Engine) -> None:
        while True:
            await anyio.sleep(_PUBLISH_RETRY_TICK)
            for publisher in engine.publishers:
                if isinstance(publisher, TokenFiles):
                    await publisher.retry_failed()

    async def _handle_signals(self, engine: Engine, group: TaskGroup) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    await self.reload(engine, group)
                    continue
                _log.info("stopping", signal=signal.Signals(signum).name)
                if self.systemd is not None:
                    self.systemd.stopping()
                engine.stop()

    async def reload(self, engine: Engine, group: TaskGroup) -> None:
        """Re-read the config (SIGHUP). A bad config is rejected with its errors logged
        and the old one kept. ``state`` and ``serve`` need a restart to change."""
        _log.info("reload_requested", config=str(self.config_path))
        try:
            config = await anyio.to_thread.run_sync(load_config, self.config_path)
        except ConfigError as exc:
            _log.error(
                "reload_rejected",
                errors=[str(issue) for issue in exc.errors],
                detail="the config in force stays unchanged; fix the file and send SIGHUP again",
            )
            return
        for section in ("state", "serve", "vault"):
            if getattr(config, section) != getattr(self.config, section):
                _log.warning("reload_needs_restart", section=section)
        config = config.model_copy(
            update={
                "state": self.config.state,
                "serve": self.config.serve,
                "vault": self.config.vault,
            }
        )
        if config.log != self.config.log:
            logs.configure(config.log.level, config.log.format)
        fingerprints, changed, clients, errors = await read_providers(config, self.fingerprints)
        try:
            publishers = build_publishers(config)
        except ValueError as exc:
            _log.error("reload_rejected", errors=[str(exc)], detail="the config in force stays")
            for client in clients.values():
                await client.aclose()
            return
        # What the token files being replaced still owe (files not written) carries over.
        for old in engine.publishers:
            for new in publishers:
                if isinstance(old, TokenFiles) and isinstance(new, TokenFiles):
                    new.inherit_failures(old)
        # The new publishers first: an added account's files start with it. The feed
        # outlives reloads: connections wait on it.
        if self.feed is not None:
            publishers = [*publishers, self.feed]
        # Vault seeds are re-read where their secret's version moved (and new ones read).
        await self.seeds.sync(config.accounts)
        retired = await engine.reload(config, clients, errors, changed, publishers)
        self.fingerprints = fingerprints
        for name in set(self.clients) - set(config.providers):
            del self.clients[name]
        self.clients.update(clients)
        for client in retired:
            # Requests already using the old client finish first (bounded by its timeout).
            group.start_soon(self._close_later, client, client.timeout + 1.0)
        self.config = config
        _log.info(
            "reloaded",
            providers_changed=sorted(changed),
            accounts=len(config.accounts),
        )

    async def _close_later(self, client: ProviderClient, delay: float) -> None:
        try:
            await anyio.sleep(delay)
        finally:
            with anyio.CancelScope(shield=True):
                await client.aclose()
