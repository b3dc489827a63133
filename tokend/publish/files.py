"""Token files on a shared volume: ``TOKEN_DIR/ACCOUNT/token``, ``token.json`` and any
extra outputs rendered from a template.

Layout
------
Each account's files are published together, as one version, the way Kubernetes
publishes ConfigMap and Secret volumes (its AtomicWriter)::

    ACCOUNT/
      ..20250101T120000.3f1c9a0e5b7d2c44.k2x9_a/   one version: token, token.json, outputs
      ..20250101T115000.9d04e1b7a2c3f815.p0q7_z/   the version before it
      ..data -> ..20250101T120000.3f1c9a0e5b7d2c44.k2x9_a
      ..version                                     the current version's number
      token -> ..data/token
      token.json -> ..data/token.json
      auth-header -> ..data/auth-header             (an output, if configured)

An account has two version directories, the current one and the one before it, used
in turn. A new version is written into the older one: the directory is first renamed
to the new version's name (so a path resolved through the old name fails from then
on), each file is rewritten in place (mode and owner set before the first byte, then
fsynced), and the version is published by renaming a new ``..data`` symlink over the
old one, which is atomic; the account directory is fsynced after the swap. The first
two versions are written into fresh directories. Why a versioned directory rather
than renaming each file into place: a reader that opens ``token`` and then
``token.json`` could otherwise see the new token in one and the old in the other. With
one symlink swap, every path resolved at one moment names one version. Why reuse the
directories: creating and deleting a directory and its files per version made the
filesystem's inode allocation the larger part of tokend's CPU time under many
refreshes (on ext4 without a journal it searches past every recently freed inode).

What a reader can rely on:

* any one file opened through the account directory (``ACCOUNT/token``) is the
  current version, complete: a version is never written while ``..data`` names it;
* to read several files as one version, resolve ``ACCOUNT/..data`` once (``realpath``)
  and read them all from the directory it names; if one of them has vanished
  (``ENOENT``: two newer versions were published meanwhile, and the directory was
  renamed to be rewritten), resolve again. Or read ``token.json`` alone: it carries the
  token too;
* the version a swap replaces stays untouched until the next swap, so a reader that
  resolved ``..data`` just before a swap still finds its files. Read a file soon after
  opening it: a descriptor kept open across two more publishes of the account reads
  the directory's new contents.

``..version`` holds the current version's number (the ``version`` in ``token.json`` and
in the socket's token answers) and a newline. It is rewritten in place after every
swap, so a program can wait for new tokens with inotify on that one file
(``IN_CLOSE_WRITE``; for example ``inotifywait -e close_write ACCOUNT/..version``)
and then read the files, which already show that version or a newer one. Expiry (see
below) is a version too: its number is the expired token's plus one.

Kubernetes ``subPath`` mounts of these files never see an update: they bind the
file's inode at mount time. Mount the directory.

The version directory's name carries a fingerprint of what it holds (a hash of the
token and of the modes, owner and templates it was written with), so a restart that
republishes every restored token rewrites nothing that is already on disk: one
``readlink`` per account instead of a few fsyncs. After the first publish of an account,
the fingerprint of what was last written is kept in memory. So ``expires_in`` is as of
the write that made the version: applications should go by ``expires_at``.

Expiry
------
When tokend knows an account's published token has expired and nothing replaced it,
:meth:`TokenFiles.expire` publishes an *expired version*: ``token.json`` becomes
``{"access_token": null, "expired": true, ...}`` (with the old ``token_type``,
``expires_at`` and ``scope``, and ``expires_in`` 0), and ``token`` and every output
are absent (their symlinks dangle, so opening them fails with ``ENOENT``). An
application then fails with "no such file" - an error that says what is wrong and
that file-watching health checks notice - rather than sending an expired token and
puzzling over 401s; an empty file would be read as an empty token and sent as
``Authorization: Bearer``. The next publish restores every file, in one swap.

Failures
--------
A write that fails (a read-only or immutable directory, a full volume) leaves the
files as they were. The account is then listed by :meth:`TokenFiles.failures` (shown
by ``tokend status``, ``/v1/accounts``, ``/readyz`` and the metrics) until a write
succeeds; :meth:`TokenFiles.retry_failed`, called every second by the daemon, tries
again with backoff (1 s doubling to 10 s). Meanwhile the files still show the older
token; once it has expired, the expired version replaces it, or if even that cannot
be written, ``..data`` is removed so that every file dangles: stale files never go on
looking valid.

Templates
---------
Outputs are rendered from templates such as ``"Authorization: Bearer {access_token}"``
with the placeholders ``{access_token}``, ``{token_type}``, ``{expires_at}``,
``{expires_in}``, ``{scope}`` (empty without one) and ``{account}`` only; ``{{`` and
``}}`` are literal braces. Attribute and index access, conversions and format specs are
rejected when the publisher is built, and rendering never calls ``str.format``.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import secrets
import shutil
import signal
import stat
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import anyio
import orjson

from tokend._ids import resolve_id
from tokend.clock import Clock, SystemClock
from tokend.config import OutputConfig
from tokend.logs import get_logger
from tokend.model import TokenSet
from tokend.template import PLACEHOLDERS, Template

__all__ = [
    "PLACEHOLDERS",
    "Template",
    "TokenFiles",
    "fsync_dir",
    "token_json",
    "write_atomic",
]

_log = get_logger(component="token_files")
_T = TypeVar("_T")


TOKEN = "token"
TOKEN_JSON = "token.json"
DATA = "..data"
VERSION = "..version"
_DATA_TMP = "..data_tmp"
# ..STAMP.FINGERPRINT.RANDOM (RANDOM: letters, digits, "_"; older versions used tempfile).
_VERSION = re.compile(r"\.\.\d{8}T\d{6}\.([0-9a-f]{16})\.[A-Za-z0-9_]+")
# Accounts share these locks by hash: bounded memory at 100,000 accounts, and with
# far more stripes than worker threads two accounts rarely wait for each other.
_LOCK_STRIPES = 1024
# Worker threads token-file I/O may occupy at once. Its own limiter rather than
# anyio's shared default one: a slow or hung token volume (NFS, a full disk retrying)
# must not take every thread the store's commits and the metrics need.
_IO_THREADS = 8
# Retrying the accounts whose files could not be written.
_RETRY_FIRST = 1.0
_RETRY_MAX = 10.0
# How long a scan of the token directory may stand in for looking at an account's
# files: long enough for a restart's republishing, short enough that files changed by
# hand later are looked at again.
_SCAN_VALID_FOR = 120.0


# -- writing one file ------------------------------------------------------------------


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _create_file(path: Path, data: bytes, mode: int, uid: int = -1, gid: int = -1) -> None:
    """Create ``path`` (which must not exist) holding ``data``, durably.

    The mode and owner are set before the first byte is written, so the file is never
    readable by anyone its final mode would not let read it."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, mode)
    try:
        # O_CREAT's mode is filtered by the umask; set the exact mode explicitly.
        os.fchmod(fd, mode)
        if uid != -1 or gid != -1:
            os.fchown(fd, uid, gid)
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int, uid: int = -1, gid: int = -1) -> None:
    """Replace the single file ``path`` with ``data`` atomically and durably (blocking;
    run it in a thread). ``uid``/``gid`` of -1 leave the owner/group as created."""
    directory = path.parent
    tmp = directory / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        _create_file(tmp, data, mode, uid, gid)
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


# Rewriting a file in place is safe only while nobody else has it open: a write lease
# is granted only then (and makes a later open wait until it is let go). The kernel
# tells the lease holder of such an open with a signal; SIGURG's default is to ignore it.
_LEASE_SIGNAL = signal.SIGURG
_BUSY = {errno.EAGAIN, errno.EBUSY}


def _rewrite_in_place(path: Path, data: bytes, mode: int, uid: int, gid: int, durable: bool) -> str:
    """Replace the contents of the regular file ``path`` in place, giving it ``mode``
    and owner first, if no other descriptor is open on it. Returns ``"done"``,
    ``"missing"`` (no such file) or ``"replace"`` (in use, not a regular file, or
    leases unavailable: the caller replaces the file by a rename instead)."""
    flags = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.EWOULDBLOCK):
            return "replace"
        raise
    try:
        try:
            fcntl.fcntl(fd, fcntl.F_SETSIG, _LEASE_SIGNAL)
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
        except OSError:
            # EAGAIN: a reader still has it open (it may be reading); EACCES, EINVAL:
            # no leases here (not the owner, leases disabled, another filesystem).
            return "replace"
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return "replace"
            if stat.S_IMODE(st.st_mode) != mode:
                os.fchmod(fd, mode)
            if (uid != -1 and st.st_uid != uid) or (gid != -1 and st.st_gid != gid):
                os.fchown(fd, uid, gid)
            _write_all(fd, data)
            if st.st_size > len(data):
                os.ftruncate(fd, len(data))
            if durable:
                os.fsync(fd)
        finally:
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    finally:
        os.close(fd)
    return "done"


def _put_file(
    path: Path, data: bytes, mode: int, uid: int = -1, gid: int = -1, *, durable: bool = True
) -> bool:
    """Make ``path`` hold ``data`` with ``mode`` and owner: in place when nobody has
    it open, else by renaming a new file over it. Returns whether a directory entry
    was made or replaced (the directory then needs an fsync to make it durable)."""
    outcome = _rewrite_in_place(path, data, mode, uid, gid, durable)
    if outcome == "done":
        return False
    if outcome == "missing":
        _create_file(path, data, mode, uid, gid)
        return True
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        _create_file(tmp, data, mode, uid, gid)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return True


def _remove_entry(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def token_json(token: TokenSet, now: float) -> bytes:
    return orjson.dumps(
        {
            "access_token": token.access_token,
            "token_type": token.token_type,
            "expires_at": int(token.expires_at),
            "expires_in": max(0, int(token.expires_at - now)),
            "scope": token.scope,
            "version": token.version,
        }
    )


# -- templates -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Output:
    file: str
    template: Template
    mode: int


def _check_output_name(name: str) -> None:
    if name in (TOKEN, TOKEN_JSON) or name.startswith("..") or "/" in name or name in ("", "."):
        raise ValueError(
            f"output file name {name!r} is reserved or not a plain file name "
            "(not token, token.json, or starting with '..')"
        )


# -- owner and group -------------------------------------------------------------------


# -- what was last written -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Written:
    """What an account's files show, as far as this process knows."""

    fingerprint: str
    # Expiry of the token the files show; None when they show the expired marker.
    expires_at: float | None
    # The version's number (``..version``), and the names of the current version
    # directory and of the one before it (the next to be rewritten), where known.
    number: int | None = None
    directory: str | None = None
    spare: str | None = None


@dataclass(slots=True)
class _Failure:
    """An account whose files do not show what they should."""

    error: str
    since: float  # unix seconds, the first failure
    # The token the files should show; None when they should show the expired version.
    token: TokenSet | None
    # Expiry of the token the files still show, when known.
    shown_expires_at: float | None
    retry_at: float  # monotonic
    delay: float = _RETRY_FIRST
    # The files show a token that has expired, and neither the expired version nor
    # removing ..data could be written.
    stale: bool = False


def _error_text(exc: BaseException, fallback: Path) -> str:
    if isinstance(exc, OSError):
        return f"{exc.strerror or type(exc).__name__}: {exc.filename or fallback}"
    return f"{type(exc).__name__} writing {fallback}"


def _current_version(account_dir: Path) -> str | None:
    try:
        return os.readlink(account_dir / DATA)
    except OSError:
        return None


def _version_fingerprint(version: str | None) -> str | None:
    match = _VERSION.fullmatch(version) if version else None
    return match.group(1) if match else None


def _read_number(account_dir: Path) -> int | None:
    """The number ``..version`` holds, or None."""
    try:
        text = (account_dir / VERSION).read_bytes()
    except OSError:
        return None
    text = text.strip()
    return int(text) if text.isdigit() and len(text) < 20 else None


class TokenFiles:
    """Publishes each account's token as files under ``root`` (see the module doc).

    ``mode`` applies to ``token``, ``token.json`` and outputs without a mode of their
    own; ``owner`` and ``group`` (names or numbers, None: the daemon's) apply to every
    file and directory tokend creates for an account. ``outputs`` maps account names to
    their extra files. Raises ValueError for an unknown user or group, or an output
    whose template or name is not allowed.
    """

    publisher_name = "token_files"

    def __init__(
        self,
        root: Path,
        mode: int = 0o640,
        *,
        owner: str | int | None = None,
        group: str | int | None = None,
        outputs: Mapping[str, Sequence[OutputConfig]] | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.root = root
        self.mode = mode
        self.uid = resolve_id(owner, "user", "serve.token_file_owner")
        self.gid = resolve_id(group, "group", "serve.token_file_group")
        self.clock: Clock = clock or SystemClock()
        self._outputs: dict[str, tuple[_Output, ...]] = {}
        for account, configured in (outputs or {}).items():
            compiled = []
            for output in configured:
                try:
                    _check_output_name(output.file)
                    template = Template(output.template)
                except ValueError as exc:
                    raise ValueError(
                        f"account {account!r}, output {output.file!r}: {exc}"
                    ) from None
                mode_ = self.mode if output.mode is None else output.mode
                compiled.append(_Output(output.file, template, mode_))
            if compiled:
                self._outputs[account] = tuple(compiled)
        self._written: dict[str, _Written] = {}
        self._locks: list[anyio.Lock] = []
        # Fingerprints and ..version numbers of the versions found on disk by one scan
        # (see _scanned).
        self._scan: dict[str, tuple[str, int | None]] = {}
        self._scanned_at: float | None = None
        self._scan_lock: anyio.Lock | None = None
        self._io_limiter: anyio.CapacityLimiter | None = None
        self._failing: dict[str, _Failure] = {}
        # Writes that failed, ever (a counter for the metrics).
        self.errors_total = 0

    # -- shape of an account's files --------------------------------------------------

    def _dir_mode(self, account: str) -> int:
        # Directories hold tokens too: owner and group only, unless some file is
        # meant for everyone.
        modes = [self.mode, *(o.mode for o in self._outputs.get(account, ()))]
        return 0o750 | (0o005 if any(m & 0o004 for m in modes) else 0)

    def _link_names(self, account: str) -> list[str]:
        return [TOKEN, TOKEN_JSON, *(o.file for o in self._outputs.get(account, ()))]

    def _fingerprint(self, account: str, *fields: object) -> str:
        """A short hash of what an account's files would hold: ``fields`` (the token's)
        and everything else that shapes the files (modes, owner, templates)."""
        outputs = [[o.file, o.template.text, o.mode] for o in self._outputs.get(account, ())]
        material = [*fields, self.mode, self.uid, self.gid, outputs]
        return hashlib.sha256(orjson.dumps(material)).hexdigest()[:16]

    def _token_fingerprint(self, account: str, token: TokenSet) -> str:
        return self._fingerprint(
            account,
            "token",
            token.access_token,
            token.token_type,
            int(token.expires_at),
            token.scope,
            token.version,
        )

    def _lock(self, account: str) -> anyio.Lock:
        if not self._locks:
            # Created on first use: anyio locks belong to the running event loop.
            self._locks = [anyio.Lock() for _ in range(_LOCK_STRIPES)]
            self._scan_lock = anyio.Lock()
        return self._locks[hash(account) % _LOCK_STRIPES]

    def _limiter(self) -> anyio.CapacityLimiter:
        if self._io_limiter is None:
            # Created on first use, like the locks: it belongs to the running loop.
            self._io_limiter = anyio.CapacityLimiter(_IO_THREADS)
        return self._io_limiter

    def _forget(self, account: str) -> None:
        """What is on disk for ``account`` is unknown: look at it again next time."""
        self._written.pop(account, None)
        self._scan.pop(account, None)

    def _chown(self, path: Path) -> None:
        if self.uid != -1 or self.gid != -1:
            os.chown(path, self.uid, self.gid, follow_symlinks=False)

    # -- publishing ---------------------------------------------------------------------

    async def publish(self, account: str, token: TokenSet) -> None:
        fingerprint = self._token_fingerprint(account, token)
        async with self._lock(account):
            known = self._written.get(account)
            if known is not None and known.fingerprint == fingerprint:
                return
            written = _Written(fingerprint, token.expires_at, token.version)
            if known is None and await self._scanned(account) == (fingerprint, token.version):
                self._written[account] = written
                return
            files = self._render(account, token, self.clock.time())
            error, result = await self._run(
                "token_file_write_failed", account, self._swap_in, account, written, files, known
            )
            if error is None and result is not None:
                self._written[account] = result
                self._recovered(account)
            else:
                self._failed(account, error or "the files were not written", token, known)

    async def expire(self, account: str, now: float | None = None) -> bool:
        """Replace ``account``'s files with the expired version (see the module doc) if
        the token they show has expired by ``now`` (default: the clock's time).

        Returns True when the files now show the expired version and did not before.
        Does nothing, and returns False, when they show a token still valid at ``now``
        (one published after the caller decided to expire), already show the expired
        version, or do not exist. Never raises for I/O errors (they are logged)."""
        if now is None:
            now = self.clock.time()
        async with self._lock(account):
            self._scan.pop(account, None)
            known = self._written.get(account)
            if known is not None and (known.expires_at is None or known.expires_at > now):
                return False
            error, result = await self._run(
                "token_file_expire_failed", account, self._expire_sync, account, now, known
            )
            if error is not None:
                self._failed(account, error, None, known)
                return False
            if result is None:
                # No files (or a valid token in them): nothing is owed, unless a newer
                # token is still waiting to be written.
                failure = self._failing.get(account)
                if failure is not None and failure.token is None:
                    self._recovered(account)
                return False
            # The files show the expired version: nothing looks valid past its expiry.
            self._recovered(account)
            changed, written = result
            self._written[account] = written
            return bool(changed)

    async def withdraw(self, account: str) -> None:
        async with self._lock(account):
            self._forget(account)
            # The account is gone: nothing about it is owed any more.
            self._failing.pop(account, None)
            await self._run("token_file_withdraw_failed", account, self._withdraw_sync, account)

    # -- failures ---------------------------------------------------------------------

    def failures(self) -> dict[str, str]:
        """Accounts whose files do not show their current token, and why."""
        return {
            name: failure.error
            + ("; the files still show an expired token" if failure.stale else "")
            for name, failure in self._failing.items()
        }

    def inherit_failures(self, previous: TokenFiles) -> None:
        """Take over what ``previous`` (the publisher a reload replaces) still owes."""
        for name, failure in previous._failing.items():
            self._failing.setdefault(name, failure)
        self.errors_total += previous.errors_total

    def _failed(
        self, account: str, error: str, token: TokenSet | None, known: _Written | None
    ) -> None:
        self.errors_total += 1
        failure = self._failing.get(account)
        if failure is None:
            shown = known.expires_at if known is not None else None
            self._failing[account] = _Failure(
                error,
                self.clock.time(),
                token,
                shown,
                self.clock.monotonic() + _RETRY_FIRST,
            )
            return
        failure.error = error
        failure.token = token
        failure.delay = min(failure.delay * 2, _RETRY_MAX)
        failure.retry_at = self.clock.monotonic() + failure.delay

    def _recovered(self, account: str) -> None:
        failure = self._failing.pop(account, None)
        if failure is not None:
            _log.info(
                "token_files_recovered",
                account=account,
                failing_for_s=round(self.clock.time() - failure.since, 1),
            )

    async def retry_failed(self) -> None:
        """Try again for the accounts whose files could not be written (those due),
        and make sure none of them goes on showing a token that has expired."""
        now = self.clock.time()
        monotonic = self.clock.monotonic()
        for account, failure in list(self._failing.items()):
            expired_shown = failure.shown_expires_at is not None and failure.shown_expires_at <= now
            due = failure.retry_at <= monotonic or (expired_shown and not failure.stale)
            if not due:
                continue
            token = failure.token
            if token is not None and token.expires_at > now:
                await self.publish(account, token)
            else:
                await self.expire(account, now)
            still = self._failing.get(account)
            if still is not None:
                await self._hide_if_expired(account, still, now)

    async def _hide_if_expired(self, account: str, failure: _Failure, now: float) -> None:
        """The expired version could not be written: if the files show an expired
        token, remove ``..data`` (every file then dangles)."""
        async with self._lock(account):
            if account not in self._failing:
                return
            try:
                hidden = await anyio.to_thread.run_sync(
                    self._hide_expired_sync, account, now, limiter=self._limiter()
                )
            except OSError as exc:
                if not failure.stale:
                    _log.error(
                        "token_file_stale",
                        account=account,
                        error=_error_text(exc, self.root / account),
                        detail="the files show an expired token and cannot be changed",
                    )
                failure.stale = True
                return
            failure.stale = False
            if hidden:
                failure.shown_expires_at = None
                self._forget(account)
                _log.warning(
                    "token_files_hidden",
                    account=account,
                    detail="the expired token's files are unlinked until a write succeeds",
                )

    def _hide_expired_sync(self, account: str, now: float) -> bool:
        """Remove ``ACCOUNT/..data`` if the ``token.json`` it leads to shows a token
        that has expired by ``now`` (not the expired version). True if removed."""
        account_dir = self.root / account
        try:
            document = orjson.loads((account_dir / TOKEN_JSON).read_bytes())
        except FileNotFoundError:
            return False
        except (OSError, orjson.JSONDecodeError):
            document = {}
        if isinstance(document, dict):
            if document.get("expired") is True:
                return False
            expires_at = document.get("expires_at")
            if isinstance(expires_at, int | float) and expires_at > now:
                return False
        os.unlink(account_dir / DATA)
        fsync_dir(account_dir)
        return True

    async def _run(
        self, event: str, account: str, func: Callable[..., _T], *args: object
    ) -> tuple[str | None, _T | None]:
        """Run ``func`` in a worker thread; log, never raise, when it fails. Returns
        ``(None, result)``, or ``(why, None)`` when it failed."""
        try:
            return None, await anyio.to_thread.run_sync(func, *args, limiter=self._limiter())
        except OSError as exc:
            # What is on disk is now uncertain: the next publish looks at it again.
            self._forget(account)
            # Retries for an account already failing log at debug: one line per episode.
            log = _log.debug if account in self._failing else _log.error
            log(
                event,
                account=account,
                path=str(exc.filename or self.root / account),
                error=exc.strerror or str(exc),
            )
            return _error_text(exc, self.root / account), None
        except Exception as exc:
            self._forget(account)
            _log.exception(event, account=account)
            return _error_text(exc, self.root / account), None

    async def _scanned(self, account: str) -> tuple[str, int | None] | None:
        """The fingerprint of ``account``'s version on disk, if a scan found its files
        complete and as configured. At a restart every restored token is republished:
        one pass over the token directory, in one worker thread, answers for every
        account, instead of a thread hop and a few syscalls each. Used once per account."""
        if self._scanned_at is None:
            assert self._scan_lock is not None
            async with self._scan_lock:
                if self._scanned_at is None:
                    try:
                        self._scan = await anyio.to_thread.run_sync(
                            self._scan_disk, limiter=self._limiter()
                        )
                    except OSError as exc:
                        # Not fatal: each account's files are looked at one by one.
                        _log.warning(
                            "token_dir_scan_failed",
                            path=str(self.root),
                            error=exc.strerror or str(exc),
                        )
                    self._scanned_at = self.clock.monotonic()
        elif self._scan and self.clock.monotonic() - self._scanned_at > _SCAN_VALID_FOR:
            self._scan.clear()
        return self._scan.pop(account, None)

    def _render(self, account: str, token: TokenSet, now: float) -> list[tuple[str, bytes, int]]:
        files = [
            (TOKEN_JSON, token_json(token, now), self.mode),
            (TOKEN, token.access_token.encode(), self.mode),
        ]
        outputs = self._outputs.get(account, ())
        if outputs:
            values = {
                "access_token": token.access_token,
                "token_type": token.token_type,
                "expires_at": str(int(token.expires_at)),
                "expires_in": str(max(0, int(token.expires_at - now))),
                "scope": token.scope or "",
                "account": account,
            }
            for output in outputs:
                files.append((output.file, output.template.render(values).encode(), output.mode))
        return files

    # -- blocking parts, in worker threads (the caller holds the account's lock) ----------

    def _swap_in(
        self,
        account: str,
        written: _Written,
        files: Sequence[tuple[str, bytes, int]],
        known: _Written | None,
    ) -> _Written:
        """Publish ``files`` as the account's new version, unless (on the first write
        in this process, ``known`` None) the version on disk already holds them.
        Returns what the files now show."""
        account_dir = self.root / account
        first = known is None
        if first:
            self._prepare_account_dir(account, account_dir)
        # Written here before; but another writer (a publisher being replaced by a
        # reload, a person) may have swapped in a version since: then look again.
        if (
            known is not None
            and known.directory is not None
            and _current_version(account_dir) != known.directory
        ):
            known = replace(known, directory=None)
        if known is None or known.directory is None:
            # Not written by this process yet: look at what is on disk.
            previous = _current_version(account_dir)
            if first and _version_fingerprint(previous) == written.fingerprint:
                changed = self._ensure_links(account, account_dir)
                if self._write_number(account_dir, written.number, check=True):
                    changed = True
                if changed:
                    fsync_dir(account_dir)
                spare = self._spare_on_disk(account_dir, previous)
                return replace(written, directory=previous, spare=spare)
            spare = self._spare_on_disk(account_dir, previous)
            from_disk = True
        else:
            previous, spare, from_disk = known.directory, known.spare, False
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(self.clock.time()))
        name = f"..{stamp}.{written.fingerprint}.{secrets.token_hex(4)}"
        version = account_dir / name
        recycled = False
        if spare is not None:
            try:
                # From here on, paths resolved through the old name fail (ENOENT).
                os.rename(account_dir / spare, version)
                recycled = True
            except FileNotFoundError:
                pass
        if not recycled:
            os.mkdir(version, 0o700)
        try:
            entries_changed = self._fill(account, version, files, recycled, from_disk)
            if not recycled or from_disk:
                # Made 0700 until complete; readers need the account dir's access.
                st = os.stat(version)
                if stat.S_IMODE(st.st_mode) != self._dir_mode(account):
                    os.chmod(version, self._dir_mode(account))
                if (self.uid != -1 and st.st_uid != self.uid) or (
                    self.gid != -1 and st.st_gid != self.gid
                ):
                    self._chown(version)
            if entries_changed:
                fsync_dir(version)
            link = account_dir / _DATA_TMP
            try:
                os.symlink(name, link)
            except FileExistsError:
                # Left over by a write that died before its rename.
                link.unlink()
                os.symlink(name, link)
            self._chown(link)
            os.replace(link, account_dir / DATA)
        except BaseException:
            if not recycled:
                shutil.rmtree(version, ignore_errors=True)
            raise
        if first:
            self._ensure_links(account, account_dir)
        # One fsync covers the swap and any links made just above.
        fsync_dir(account_dir)
        self._write_number(account_dir, written.number, check=first)
        keep = previous if previous is not None and _VERSION.fullmatch(previous) else None
        return replace(written, directory=name, spare=keep)

    def _fill(
        self,
        account: str,
        version: Path,
        files: Sequence[tuple[str, bytes, int]],
        recycled: bool,
        from_disk: bool,
    ) -> bool:
        """Write ``files`` into the directory ``version`` (rewriting in place what a
        recycled one holds) and remove anything else from it. Returns whether any
        directory entry was made or removed."""
        changed = False
        for name, data, mode in files:
            path = version / name
            if recycled:
                if _put_file(path, data, mode, self.uid, self.gid):
                    changed = True
                continue
            _create_file(path, data, mode, self.uid, self.gid)
            changed = True
        if not recycled:
            return changed
        wanted = {name for name, _, _ in files}
        if from_disk:
            # Written by another process, maybe with other outputs: look.
            with os.scandir(version) as entries:
                leftovers = [entry.name for entry in entries if entry.name not in wanted]
        else:
            leftovers = [name for name in self._link_names(account) if name not in wanted]
        for name in leftovers:
            try:
                _remove_entry(version / name)
            except FileNotFoundError:
                continue
            changed = True
        return changed

    def _write_number(self, account_dir: Path, number: int | None, *, check: bool) -> bool:
        """Make ``..version`` hold ``number``; returns whether it changed. Not fsynced:
        after a crash, the first publish of the account checks it (``check``)."""
        if number is None:
            return False
        data = b"%d\n" % number
        path = account_dir / VERSION
        if check:
            try:
                if path.read_bytes() == data:
                    return False
            except OSError:
                pass
        _put_file(path, data, self.mode, self.uid, self.gid, durable=False)
        return True

    def _spare_on_disk(self, account_dir: Path, current: str | None) -> str | None:
        """The newest version directory other than ``current``, to be rewritten as the
        next version; any older ones are removed."""
        with os.scandir(account_dir) as entries:
            found = sorted(
                entry.name
                for entry in entries
                if entry.name != current
                and _VERSION.fullmatch(entry.name)
                and entry.is_dir(follow_symlinks=False)
            )
        for stale in found[:-1]:
            shutil.rmtree(account_dir / stale, ignore_errors=True)
        return found[-1] if found else None

    def _scan_disk(self) -> dict[str, tuple[str, int | None]]:
        found: dict[str, tuple[str, int | None]] = {}
        try:
            entries = os.scandir(self.root)
        except FileNotFoundError:
            return found
        with entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    complete = self._complete_version(entry.name, Path(entry.path))
                    if complete is not None:
                        found[entry.name] = complete
        return found

    def _complete_version(self, account: str, account_dir: Path) -> tuple[str, int | None] | None:
        """The fingerprint and ``..version`` number of the version ``account_dir``
        shows, if its directory has the mode and owner configured and every file's
        link is in place."""
        try:
            st = os.stat(account_dir)
            if stat.S_IMODE(st.st_mode) != self._dir_mode(account):
                return None
            if (self.uid != -1 and st.st_uid != self.uid) or (
                self.gid != -1 and st.st_gid != self.gid
            ):
                return None
            fingerprint = _version_fingerprint(_current_version(account_dir))
            if fingerprint is None:
                return None
            for name in self._link_names(account):
                if os.readlink(account_dir / name) != f"{DATA}/{name}":
                    return None
            number = _read_number(account_dir)
        except OSError:
            return None
        return fingerprint, number

    def _prepare_account_dir(self, account: str, account_dir: Path) -> None:
        dir_mode = self._dir_mode(account)
        try:
            os.mkdir(account_dir, dir_mode)
        except FileNotFoundError:
            self._make_root(dir_mode)
            os.mkdir(account_dir, dir_mode)
        except FileExistsError:
            pass
        else:
            # A new directory entry is durable once its parent is fsynced.
            fsync_dir(self.root)
        # Also fixes a directory made by an older layout or with another mode/owner;
        # looked at first, since a restart finds nearly every directory already right.
        st = os.stat(account_dir)
        if stat.S_IMODE(st.st_mode) != dir_mode:
            os.chmod(account_dir, dir_mode)
        if (self.uid != -1 and st.st_uid != self.uid) or (self.gid != -1 and st.st_gid != self.gid):
            self._chown(account_dir)

    def _make_root(self, dir_mode: int) -> None:
        existed = self.root.exists()
        self.root.mkdir(parents=True, exist_ok=True, mode=dir_mode)
        if not existed:
            # Only a root made here is ours to hand to the token files' owner/group.
            os.chmod(self.root, dir_mode)
            self._chown(self.root)
            fsync_dir(self.root.parent)

    def _ensure_links(self, account: str, account_dir: Path) -> bool:
        """Make ``NAME -> ..data/NAME`` for every file of the account, replacing plain
        files of an older layout atomically, and drop links to outputs no longer
        configured. Returns whether anything changed."""
        changed = False
        names = self._link_names(account)
        for name in names:
            path = account_dir / name
            target = f"{DATA}/{name}"
            try:
                if os.readlink(path) == target:
                    continue
            except OSError:
                pass  # missing, or a plain file (EINVAL)
            tmp = account_dir / f"..link_tmp.{name}"
            tmp.unlink(missing_ok=True)
            os.symlink(target, tmp)
            self._chown(tmp)
            os.replace(tmp, path)
            changed = True
        with os.scandir(account_dir) as entries:
            for entry in entries:
                if entry.name.startswith("..") or entry.name in names or not entry.is_symlink():
                    continue
                if os.readlink(entry.path).startswith(f"{DATA}/"):
                    os.unlink(entry.path)
                    changed = True
        return changed

    def _expire_sync(
        self, account: str, now: float, known: _Written | None
    ) -> tuple[bool, _Written] | None:
        """Publish the expired version; None when there are no files, or when files
        left by an earlier process still show a valid token."""
        account_dir = self.root / account
        try:
            document = orjson.loads((account_dir / TOKEN_JSON).read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, orjson.JSONDecodeError):
            # Unreadable: whatever it holds must not go on looking valid.
            document = {}
        if not isinstance(document, dict):
            document = {}
        if document.get("expired") is True:
            current = _version_fingerprint(_current_version(account_dir)) or ""
            return False, _Written(current, None, _read_number(account_dir))
        expires_at = document.get("expires_at")
        if not isinstance(expires_at, int | float) or isinstance(expires_at, bool):
            expires_at = None
        if expires_at is not None and expires_at > now:
            return None
        token_type, scope = document.get("token_type"), document.get("scope")
        version = document.get("version")
        if not isinstance(version, int) or isinstance(version, bool):
            version = _read_number(account_dir) or 0
        # Expiry is a change of what the files show: a version of its own.
        number = version + 1
        marker = {
            "access_token": None,
            "token_type": token_type,
            "expires_at": expires_at,
            "expires_in": 0,
            "scope": scope,
            "version": number,
            "expired": True,
        }
        written = _Written(
            self._fingerprint(account, "expired", token_type, expires_at, scope, number),
            None,
            number,
        )
        files = [(TOKEN_JSON, orjson.dumps(marker), self.mode)]
        return True, self._swap_in(account, written, files, known)

    def _withdraw_sync(self, account: str) -> None:
        account_dir = self.root / account
        if not account_dir.exists():
            return
        # Out of the namespace in one rename, so nobody sees a half-deleted account;
        # "~" cannot occur in account names, so this cannot hit another account.
        doomed = self.root / f"{account}~withdrawn~{secrets.token_hex(4)}"
        os.rename(account_dir, doomed)
        fsync_dir(self.root)
        shutil.rmtree(doomed)
