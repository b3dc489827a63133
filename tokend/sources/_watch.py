"""Noticing a new seed without a SIGHUP: seed files polled by stat, vault secrets polled
by version.

A Kubernetes Secret volume updates by writing a new hidden directory and swapping the
``..data`` symlink to it; the file names are symlinks through ``..data``. Following
the symlinks, ``os.stat`` then sees another inode, so one ``stat`` per file per second
notices both an in-place write and a swap (no inotify: it is not in the standard
library, and one stat a second per file costs nothing).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Final

import anyio

from tokend.config import AccountConfig
from tokend.logs import get_logger
from tokend.sources._seeds import SeedSources

__all__ = ["SeedWatcher", "file_signature"]

_log = get_logger()

FILE_POLL_INTERVAL: Final = 1.0
# A failed vault read is tried again sooner than the poll interval, backing off to it.
_RETRY_MIN: Final = 1.0

Signature = tuple[int, int, int, int, str] | None


def file_signature(path: Path) -> Signature:
    """What changes when the file's content is replaced (None: it cannot be read)."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    try:
        link = os.readlink(path.parent / "..data")
    except OSError:
        link = ""
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, link)


class SeedWatcher:
    """Calls ``on_change(names)`` when the seeds of the named accounts may have changed."""

    def __init__(
        self,
        sources: SeedSources,
        accounts: Callable[[], Mapping[str, AccountConfig]],
        on_change: Callable[[set[str]], Awaitable[None]],
        *,
        vault_interval: float,
        file_interval: float = FILE_POLL_INTERVAL,
    ) -> None:
        self.sources = sources
        self.accounts = accounts
        self.on_change = on_change
        self.vault_interval = vault_interval
        self.file_interval = file_interval
        self._files: dict[str, tuple[Path, Signature]] = {}

    async def run(self) -> None:
        async with anyio.create_task_group() as group:
            group.start_soon(self._watch_files)
            if self.sources.vault is not None:
                group.start_soon(self._poll_vault)

    async def _watch_files(self) -> None:
        await self._scan()  # the signatures the config was loaded with
        while True:
            await anyio.sleep(self.file_interval)
            changed = await self._scan()
            if changed:
                _log.info("seed_file_changed", accounts=sorted(changed))
                await self.on_change(changed)

    async def _scan(self) -> set[str]:
        # The list is taken here (a reload may change the accounts meanwhile); the
        # stats, one per file, run off the event loop.
        files = [
            (name, aconf.refresh_token_file)
            for name, aconf in self.accounts().items()
            if aconf.refresh_token_file is not None
        ]
        if not files:
            self._files = {}
            return set()
        return await anyio.to_thread.run_sync(self._scan_files, files)

    def _scan_files(self, files: list[tuple[str, Path]]) -> set[str]:
        changed: set[str] = set()
        seen: dict[str, tuple[Path, Signature]] = {}
        for name, path in files:
            signature = file_signature(path)
            before = self._files.get(name)
            if signature is None and before is not None:
                # A file gone for a moment (mid-swap) is not a new seed: keep the old view.
                seen[name] = before
                continue
            if before is not None and before[0] == path and before[1] != signature:
                changed.add(name)
            seen[name] = (path, signature)
        self._files = seen
        return changed

    async def _poll_vault(self) -> None:
        delay = _RETRY_MIN
        while True:
            failing = bool(self.sources.failing())
            wait = min(delay, self.vault_interval) if failing else self.vault_interval
            await anyio.sleep(wait)
            delay = delay * 2 if failing else _RETRY_MIN
            changed = await self.sources.sync(self.accounts())
            if changed:
                await self.on_change(changed)
