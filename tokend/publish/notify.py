"""Telling applications that an account's token changed (an account's ``on_change``).

For each newly published token, per account and in this order:

* ``command`` (an argv list, run without a shell) is run, bounded by ``timeout``: on
  timeout the command and everything in its process group is killed. Its stdout and
  stderr are captured and logged, truncated. It gets neither the token in its argv nor
  tokend's environment (which may hold client secrets and seed tokens); it gets
  ``PATH``, ``HOME``, ``LANG``, ``LC_*``, ``TZ``, ``TMPDIR``, ``USER``, ``LOGNAME`` and
  ``TOKEND_ACCOUNT``, ``TOKEND_EXPIRES_AT`` (unix seconds) and, when tokend writes
  token files, ``TOKEND_TOKEN_FILE`` and ``TOKEND_TOKEN_JSON``. The command, like the
  application, reads the token from the file;
* the process whose pid is in ``pid_file`` is sent ``signal`` (default SIGHUP). A pid
  file that is missing or not a plain positive number, a process that is gone, or a pid
  file older than the process now holding its pid (the writer exited and the pid was
  reused) is logged as a warning and nothing is signalled.

List this publisher after the token files: the engine awaits publishers in order, so
the files are written when the application is told. A notification that fails is
logged and never stops other publishers or accounts. The command runs inside the
account's refresh, so a slow one holds that refresh (and its concurrency slot) for at
most ``timeout``.

Notifications are deduplicated per token in memory: publishing the same token again
tells nobody, and after a restart each account is told once about its restored token.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

import anyio
from anyio.abc import ByteReceiveStream, Process

from tokend.config import AccountConfig, OnChangeConfig
from tokend.logs import get_logger
from tokend.model import TokenSet, fingerprint

__all__ = ["ChangeNotifier"]

_log = get_logger(component="on_change")

# Logged output per stream; the rest is read (so the command never blocks on a full
# pipe) and counted.
_OUTPUT_LIMIT = 2000
# After the command exits, output still in the pipes arrives at once; a background
# child that inherited them must not hold the refresh until the timeout.
_DRAIN_GRACE = 0.5
# Bounded wait for a killed command to be reaped.
_REAP_TIMEOUT = 5.0
# A process that started this much later than its pid file was written is not the
# writer. Generous, because the check compares wall-clock times a clock step moves.
_PID_REUSE_SLACK = 10.0
_PASSED_ENV = ("PATH", "HOME", "LANG", "TZ", "TMPDIR", "USER", "LOGNAME")


class ChangeNotifier:
    """A publisher that runs each account's ``on_change`` for every new token."""

    def __init__(
        self, accounts: Mapping[str, AccountConfig], *, token_dir: Path | None = None
    ) -> None:
        self._targets: dict[str, OnChangeConfig] = {
            name: account.on_change
            for name, account in accounts.items()
            if account.on_change is not None
        }
        self.token_dir = token_dir.absolute() if token_dir is not None else None
        # Fingerprint of the last token each account was notified about.
        self._notified: dict[str, str] = {}

    async def publish(self, account: str, token: TokenSet) -> None:
        target = self._targets.get(account)
        if target is None:
            return
        token_fp = fingerprint(token.access_token)
        if self._notified.get(account) == token_fp:
            return
        # Recorded up front: a failed notification is logged, not retried on an
        # idempotent republish of the same token.
        self._notified[account] = token_fp
        try:
            if target.command:
                await self._run_command(account, target, token)
            if target.pid_file is not None:
                await anyio.to_thread.run_sync(_signal_pid_file, account, target)
        except Exception:
            _log.exception("on_change_failed", account=account)

    async def withdraw(self, account: str) -> None:
        self._notified.pop(account, None)

    def _environment(self, account: str, token: TokenSet) -> dict[str, str]:
        env = {
            key: value
            for key, value in os.environ.items()
            if key in _PASSED_ENV or key.startswith("LC_")
        }
        env.setdefault("PATH", os.defpath)
        env["TOKEND_ACCOUNT"] = account
        env["TOKEND_EXPIRES_AT"] = str(int(token.expires_at))
        if self.token_dir is not None:
            env["TOKEND_TOKEN_FILE"] = str(self.token_dir / account / "token")
            env["TOKEND_TOKEN_JSON"] = str(self.token_dir / account / "token.json")
        return env

    async def _run_command(self, account: str, target: OnChangeConfig, token: TokenSet) -> None:
        assert target.command
        argv = list(target.command)
        started = time.monotonic()
        try:
            process = await anyio.open_process(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self._environment(account, token),
                # Its own process group, so a timeout kills what it started too.
                start_new_session=True,
            )
        except OSError as exc:
            _log.warning(
                "on_change_command_failed",
                account=account,
                command=argv[0],
                error=exc.strerror or str(exc),
            )
            return
        stdout, stderr = _Capture(), _Capture()
        exited = False
        async with process:
            try:
                exited = await _wait_draining(process, stdout, stderr, target.timeout)
            finally:
                # Timed out, or tokend is stopping: nothing it started may linger.
                if process.returncode is None:
                    _kill_group(process)
                    with anyio.CancelScope(shield=True), anyio.move_on_after(_REAP_TIMEOUT):
                        await process.wait()
        code = process.returncode
        fields: dict[str, object] = {
            "account": account,
            "command": argv[0],
            "exit_code": code,
            "duration_ms": round((time.monotonic() - started) * 1000, 1),
        }
        if stdout.total:
            fields["stdout"] = stdout.text()
        if stderr.total:
            fields["stderr"] = stderr.text()
        if not exited:
            _log.warning("on_change_command_timeout", timeout_s=target.timeout, **fields)
        elif code != 0:
            _log.warning("on_change_command_failed", **fields)
        else:
            _log.info("on_change_command", **fields)


class _Capture:
    """The first bytes of a stream, and how many there were in all."""

    def __init__(self) -> None:
        self.head = bytearray()
        self.total = 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = _OUTPUT_LIMIT - len(self.head)
        if room > 0:
            self.head += chunk[:room]

    def text(self) -> str:
        text = self.head.decode(errors="replace")
        dropped = self.total - len(self.head)
        return f"{text}...[{dropped} more bytes]" if dropped else text


async def _drain(stream: ByteReceiveStream | None, capture: _Capture) -> None:
    if stream is None:
        return
    async for chunk in stream:
        capture.add(chunk)


async def _wait_draining(
    process: Process, stdout: _Capture, stderr: _Capture, seconds: float
) -> bool:
    """Wait for ``process`` to exit, reading its output, for up to ``seconds``.
    Returns whether it exited."""
    exited = False
    with anyio.move_on_after(seconds):
        async with anyio.create_task_group() as group:
            group.start_soon(_drain, process.stdout, stdout)
            group.start_soon(_drain, process.stderr, stderr)
            await process.wait()
            exited = True
            group.cancel_scope.deadline = min(
                group.cancel_scope.deadline, anyio.current_time() + _DRAIN_GRACE
            )
    return exited


def _kill_group(process: Process) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # exited (with its group) meanwhile
    except PermissionError:
        # Not ours to kill (it changed user): at least end the direct child.
        process.kill()


# -- signalling, in a worker thread ----------------------------------------------------


def _signal_pid_file(account: str, target: OnChangeConfig) -> None:
    assert target.pid_file is not None
    path = target.pid_file
    signum = signal.Signals[target.signal]
    try:
        with open(path, "rb") as pid_file:
            raw = pid_file.read(64)
            written_at = os.fstat(pid_file.fileno()).st_mtime
    except OSError as exc:
        _log.warning(
            "on_change_pid_file_unreadable",
            account=account,
            pid_file=str(path),
            error=exc.strerror or str(exc),
        )
        return
    pid = _parse_pid(raw)
    if pid is None:
        _log.warning(
            "on_change_pid_file_invalid",
            account=account,
            pid_file=str(path),
            detail="expected a positive process id",
        )
        return
    started_at = _process_start_time(pid)
    if started_at is not None and started_at > written_at + _PID_REUSE_SLACK:
        _log.warning(
            "on_change_pid_file_stale",
            account=account,
            pid_file=str(path),
            pid=pid,
            detail="the process with this pid started after the pid file was written: "
            "its writer has exited and the pid was reused; not signalling",
        )
        return
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        _log.warning("on_change_no_such_process", account=account, pid_file=str(path), pid=pid)
    except PermissionError:
        _log.warning("on_change_signal_denied", account=account, pid_file=str(path), pid=pid)
    else:
        _log.info("on_change_signalled", account=account, pid=pid, signal=signum.name)


def _parse_pid(raw: bytes) -> int | None:
    text = raw.strip()
    # 0 and negative numbers would signal process groups (-1: every process), so only
    # a plain positive number is a pid.
    if not text.isdigit() or len(text) > 10:
        return None
    pid = int(text)
    return pid if 0 < pid < 2**31 else None


def _process_start_time(pid: int) -> float | None:
    """When process ``pid`` started (unix seconds), where /proc tells; else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
        with open("/proc/stat", "rb") as proc_stat:
            boot = next(int(line.split()[1]) for line in proc_stat if line.startswith(b"btime "))
        # Fields after "(comm)", which may itself hold spaces and parentheses;
        # starttime is field 22 overall, in clock ticks since boot.
        ticks = int(stat[stat.rindex(b")") + 2 :].split()[19])
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None
