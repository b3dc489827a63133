"""Token files on a shared volume: ``TOKEN_DIR/ACCOUNT/token`` and ``token.json``.

Every write is atomic and durable: a temp file in the same directory gets its final
mode before any byte is written, is fsynced, renamed over the old file, and the
directory is fsynced. A reader sees the old file or the new one, never an empty,
partial or mixed one.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

import anyio
import orjson

from tokend.logs import get_logger
from tokend.model import TokenSet

_log = get_logger(component="token_files")


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` with ``data`` atomically and durably (blocking; run in a thread)."""
    directory = path.parent
    tmp = directory / f".{path.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        # O_CREAT's mode is filtered by the umask; set the exact mode explicitly.
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(directory)


def fsync_dir(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def token_json(token: TokenSet, now: float) -> bytes:
    return orjson.dumps(
        {
            "access_token": token.access_token,
            "token_type": token.token_type,
            "expires_at": int(token.expires_at),
            "expires_in": max(0, int(token.expires_at - now)),
            "scope": token.scope,
        }
    )


class TokenFiles:
    """Publishes each account's token as files under ``root``."""

    def __init__(self, root: Path, mode: int = 0o640) -> None:
        self.root = root
        self.mode = mode
        # Directories hold tokens too: nobody but the owner and group may list them.
        self.dir_mode = 0o750 | (0o005 if mode & 0o004 else 0)

    def _account_dir(self, account: str) -> Path:
        directory = self.root / account
        directory.mkdir(parents=True, exist_ok=True, mode=self.dir_mode)
        return directory

    def _write(self, account: str, token: TokenSet, now: float) -> None:
        directory = self._account_dir(account)
        write_atomic(directory / "token.json", token_json(token, now), self.mode)
        write_atomic(directory / "token", token.access_token.encode(), self.mode)

    async def publish(self, account: str, token: TokenSet) -> None:
        import time

        try:
            await anyio.to_thread.run_sync(self._write, account, token, time.time())
        except OSError as exc:
            _log.error(
                "token_file_write_failed",
                account=account,
                path=str(self.root / account),
                error=f"{exc.strerror or exc}",
            )

    async def withdraw(self, account: str) -> None:
        await anyio.to_thread.run_sync(
            lambda: shutil.rmtree(self.root / account, ignore_errors=True)
        )
