"""Wiring and lifecycle: build the pieces from a config, run them, handle signals.

SIGTERM and SIGINT stop scheduling and drain in-flight refreshes (bounded by
``serve.drain_timeout``) before the process exits 0.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Coroutine
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path
from typing import Any

import anyio

from tokend import logs
from tokend._version import __version__
from tokend.config import Config
from tokend.engine import Engine
from tokend.oauth import ProviderClient, ProviderSetupError
from tokend.publish import Publisher, TokenFiles
from tokend.publish.metrics import Metrics
from tokend.publish.server import serve_socket, serve_tcp
from tokend.store import open_store

_log = logs.get_logger()

# A server run in the daemon's task group: ``await service(task_status=...)``.
Service = Callable[..., Coroutine[Any, Any, None]]


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


def build_publishers(config: Config) -> list[Publisher]:
    publishers: list[Publisher] = []
    if config.serve.token_dir is not None:
        publishers.append(TokenFiles(config.serve.token_dir, config.serve.token_file_mode))
    return publishers


class Daemon:
    """One tokend process: the engine plus everything around it."""

    def __init__(self, config: Config, config_path: Path) -> None:
        self.config = config
        self.config_path = config_path

    async def _open(self, stack: AsyncExitStack) -> Engine:
        store = open_store(self.config.state)
        await store.open()
        stack.push_async_callback(store.close)
        clients, errors = build_clients(self.config)
        for client in clients.values():
            stack.push_async_callback(client.aclose)
        engine = Engine(
            self.config,
            store,
            clients,
            client_errors=errors,
            publishers=build_publishers(self.config),
        )
        self.metrics = Metrics(engine, self.config.serve)
        engine.observers.append(self.metrics)
        return engine

    async def run(self) -> int:
        async with AsyncExitStack() as stack:
            engine = await self._open(stack)
            _log.info(
                "starting",
                version=__version__,
                config=str(self.config_path),
                providers=len(self.config.providers),
                accounts=len(self.config.accounts),
            )
            await engine.load()
            async with anyio.create_task_group() as group:
                group.start_soon(self._handle_signals, engine)
                # Services answer while the engine runs and drains, then stop with it.
                for service in self._services(engine):
                    await group.start(service)
                await engine.run()
                group.cancel_scope.cancel()
            _log.info("stopped")
        return 0

    def _services(self, engine: Engine) -> list[Service]:
        """Long-running servers around the engine; each is started with
        ``task_group.start`` and reports readiness through ``task_status``."""
        services: list[Service] = []
        if self.config.serve.socket is not None:
            services.append(partial(serve_socket, engine, self.config, self.metrics))
        if self.config.serve.metrics_listen is not None:
            services.append(partial(serve_tcp, engine, self.config, self.metrics))
        return services

    async def run_once(self) -> int:
        async with AsyncExitStack() as stack:
            engine = await self._open(stack)
            ok = await engine.run_once()
            missing = sorted(
                name
                for name, account in engine.accounts.items()
                if not account.token_valid(engine.clock.time())
            )
            _log.info("once_done", ok=ok, accounts_without_token=missing)
        return 0 if ok else 1

    async def _handle_signals(self, engine: Engine) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    _log.info("reload_requested")
                    continue
                _log.info("stopping", signal=signal.Signals(signum).name)
                engine.stop()
