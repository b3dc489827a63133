"""A new seed refresh token from a sign-in: the record it becomes and the file it goes to.

The record's ``seed_fingerprint`` is chosen so that the configured seed source and the
store agree afterwards: when the seed lives in a file, the file is rewritten with the
new token (first, so a crash in between leaves the file's token to win at the next
start); otherwise the fingerprint of whatever the config says (a seed written inline,
or none) is kept, so the store's newer chain wins over it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from tokend.config import AccountConfig
from tokend.model import StoredAccount, fingerprint


def seed_fingerprint_for(account: AccountConfig, new_seed: str) -> str | None:
    """The seed fingerprint a record of ``new_seed`` carries for ``account``."""
    if account.refresh_token_file is not None:
        return fingerprint(new_seed)
    if account.refresh_token is not None:
        return fingerprint(account.refresh_token.get_secret_value())
    return None


def new_seed_record(
    name: str,
    account: AccountConfig,
    stored: StoredAccount | None,
    new_seed: str,
    now: float,
) -> StoredAccount:
    """The record that starts a new chain from ``new_seed``, replacing ``stored``: no
    access token (the next refresh gets one), nothing in flight, no old error. The
    chain is consented now: refresh-token age limits count from this sign-in."""
    return StoredAccount(
        account=name,
        seed_fingerprint=seed_fingerprint_for(account, new_seed),
        refresh_token=new_seed,
        updated_at=now,
        version=stored.version if stored is not None else 0,
        consented_at=now,
    )


class SeedFileError(Exception):
    """The seed file could not be rewritten; the message names the file, never its content."""


def write_seed_file(path: Path, seed: str) -> None:
    """Replace ``path`` with ``seed`` atomically: a new 0600 file beside it, fsynced,
    renamed over it, and the directory fsynced. The owner of an existing file is kept
    when running as root (so a daemon running as that user can still read it)."""
    directory = path.parent
    owner: tuple[int, int] | None = None
    with contextlib.suppress(FileNotFoundError):
        info = path.stat()
        owner = (info.st_uid, info.st_gid)
    temporary = directory / f".{path.name}.{os.getpid()}.tmp"
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            if owner is not None and os.geteuid() == 0:
                os.fchown(fd, *owner)
            os.write(fd, seed.encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise SeedFileError(
            f"cannot write the seed file {path}: {exc.strerror or type(exc).__name__}"
        ) from None
