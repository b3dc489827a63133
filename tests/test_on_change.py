"""on_change with real processes and real signals: a pid file's process is signalled
once per new token, a command runs, a hanging one is killed, and a broken pid file
is logged without disturbing anything else."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import structlog

from tokend.config import AccountConfig, Config
from tokend.daemon import build_publishers
from tokend.model import TokenSet
from tokend.publish.files import TokenFiles
from tokend.publish.notify import ChangeNotifier


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def make_token(access: str) -> TokenSet:
    return TokenSet(
        access_token=access, token_type="Bearer", expires_at=time.time() + 3600, issued_at=0
    )


def account(**on_change: Any) -> AccountConfig:
    return AccountConfig.model_validate(
        {"provider": "idp", "grant": "client_credentials", "on_change": on_change}
    )


async def wait_for(predicate: Callable[[], Any], within: float = 15.0, what: str = "") -> Any:
    deadline = time.monotonic() + within
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what or predicate}")
        await anyio.sleep(0.01)


def read_int(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def alive(pid: int) -> bool:
    """Running, and not a zombie nobody reaped yet."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2 :].split()[0] != b"Z"


def exited_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(gone.stdout)


# An application: counts SIGUSR1s in a file, and writes its pid file once its handler
# is installed.
APP = r"""
import os, signal, sys
count_path, pid_path = sys.argv[1], sys.argv[2]
count = 0
def on_usr1(signum, frame):
    global count
    count += 1
    with open(count_path + ".tmp", "w") as f:
        f.write(str(count))
    os.replace(count_path + ".tmp", count_path)
signal.signal(signal.SIGUSR1, on_usr1)
with open(pid_path + ".tmp", "w") as f:
    f.write(f"{os.getpid()}\n")
os.replace(pid_path + ".tmp", pid_path)
while True:
    signal.pause()
"""


class App:
    def __init__(self, workdir: Path) -> None:
        self.count_file = workdir / "count"
        self.pid_file = workdir / "app.pid"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", APP, str(self.count_file), str(self.pid_file)]
        )

    def count(self) -> int:
        return read_int(self.count_file) or 0

    def count_is(self, expected: int) -> Callable[[], bool]:
        return lambda: self.count() == expected


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    started = App(tmp_path)
    yield started
    started.proc.kill()
    started.proc.wait()


@pytest.mark.anyio
async def test_signals_the_pid_file_process_once_per_new_token(app: App) -> None:
    notifier = ChangeNotifier({"acct": account(pid_file=str(app.pid_file), signal="SIGUSR1")})
    await wait_for(app.pid_file.exists, what="the app's pid file")
    with structlog.testing.capture_logs() as logs:
        for i in range(1, 6):
            await notifier.publish("acct", make_token(f"token-number-{i}"))
            # Signals of one kind do not queue: wait for each before sending the next.
            await wait_for(app.count_is(i), what=f"signal {i}")
            # The same token again is not a change.
            await notifier.publish("acct", make_token(f"token-number-{i}"))
        await notifier.publish("unconfigured", make_token("token-other"))
    signalled = [e for e in logs if e["event"] == "on_change_signalled"]
    assert len(signalled) == 5
    assert {e["pid"] for e in signalled} == {app.proc.pid}
    assert app.count() == 5


@pytest.mark.anyio
async def test_broken_pid_files_are_logged_and_others_still_signalled(
    tmp_path: Path, app: App
) -> None:
    gone = exited_pid()
    pid_files = {
        "missing": tmp_path / "missing.pid",
        "garbage": tmp_path / "garbage.pid",
        "negative": tmp_path / "negative.pid",  # kill(-1) would signal every process
        "zero": tmp_path / "zero.pid",  # kill(0) would signal tokend's own group
        "gone": tmp_path / "gone.pid",
        "stale": tmp_path / "stale.pid",
    }
    pid_files["garbage"].write_text("not a pid\n")
    pid_files["negative"].write_text("-1\n")
    pid_files["zero"].write_text("0")
    pid_files["gone"].write_text(str(gone))
    await wait_for(app.pid_file.exists, what="the app's pid file")
    # The app's pid, in a pid file written long before the app started: its writer
    # has exited and the pid now belongs to someone else.
    pid_files["stale"].write_text(str(app.proc.pid))
    an_hour_ago = time.time() - 3600
    os.utime(pid_files["stale"], (an_hour_ago, an_hour_ago))
    accounts = {
        name: account(pid_file=str(path), signal="SIGUSR1") for name, path in pid_files.items()
    }
    accounts["good"] = account(pid_file=str(app.pid_file), signal="SIGUSR1")
    notifier = ChangeNotifier(accounts)
    with structlog.testing.capture_logs() as logs:
        for name in accounts:
            await notifier.publish(name, make_token(f"token-for-{name}"))
        await wait_for(app.count_is(1), what="the good account's signal")
    events = {e["account"]: e["event"] for e in logs}
    assert events == {
        "missing": "on_change_pid_file_unreadable",
        "garbage": "on_change_pid_file_invalid",
        "negative": "on_change_pid_file_invalid",
        "zero": "on_change_pid_file_invalid",
        "gone": "on_change_no_such_process",
        "stale": "on_change_pid_file_stale",
        "good": "on_change_signalled",
    }
    assert all(e["log_level"] == "warning" for e in logs if e["account"] != "good")


@pytest.mark.anyio
async def test_command_runs_without_the_token_and_its_output_is_logged(
    tmp_path: Path,
) -> None:
    marker = tmp_path / "marker.json"
    script = (
        "import json, os, sys\n"
        "json.dump({'argv': sys.argv, 'env': dict(os.environ)}, open(sys.argv[1], 'w'))\n"
        "print('x' * 5000)\n"
        "print('complaint', file=sys.stderr)\n"
    )
    os.environ["TOKEND_TEST_SECRET"] = "client-secret-in-env"
    try:
        notifier = ChangeNotifier(
            {"acct": account(command=[sys.executable, "-c", script, str(marker)], timeout="10s")},
            token_dir=tmp_path / "tokens",
        )
        with structlog.testing.capture_logs() as logs:
            await notifier.publish("acct", make_token("the-access-token-1"))
    finally:
        del os.environ["TOKEND_TEST_SECRET"]
    seen = json.loads(marker.read_text())
    assert "the-access-token-1" not in json.dumps(seen)
    assert "TOKEND_TEST_SECRET" not in seen["env"]
    assert seen["env"]["TOKEND_ACCOUNT"] == "acct"
    assert seen["env"]["TOKEND_TOKEN_FILE"] == str(tmp_path / "tokens" / "acct" / "token")
    [event] = [e for e in logs if e["event"] == "on_change_command"]
    assert event["exit_code"] == 0
    assert event["stdout"].startswith("x" * 100)
    assert event["stdout"].endswith("...[3001 more bytes]")
    assert event["stderr"] == "complaint\n"


@pytest.mark.anyio
async def test_hanging_command_and_its_children_are_killed_after_the_timeout(
    tmp_path: Path,
) -> None:
    pids = tmp_path / "pids"
    script = (
        "import os, subprocess, sys, time\n"
        "child = subprocess.Popen(['sleep', '1000'])\n"
        "open(sys.argv[1] + '.tmp', 'w').write(f'{os.getpid()} {child.pid}')\n"
        "os.replace(sys.argv[1] + '.tmp', sys.argv[1])\n"
        "time.sleep(1000)\n"
    )
    notifier = ChangeNotifier(
        {"acct": account(command=[sys.executable, "-c", script, str(pids)], timeout="2s")}
    )
    started = time.monotonic()
    with structlog.testing.capture_logs() as logs:
        await notifier.publish("acct", make_token("the-access-token-2"))
    elapsed = time.monotonic() - started
    # Bounded by the timeout, plus killing and reaping.
    assert 2.0 <= elapsed < 10.0
    [event] = [e for e in logs if e["event"] == "on_change_command_timeout"]
    assert event["exit_code"] == -signal.SIGKILL
    command_pid, child_pid = map(int, pids.read_text().split())
    assert not alive(command_pid)
    # The grandchild was in the command's process group: killed too (once reaped by
    # whoever adopted it, it is gone from /proc).
    await wait_for(lambda: not alive(child_pid), what="the command's child to die")


@pytest.mark.anyio
async def test_failing_and_missing_commands_are_logged(tmp_path: Path) -> None:
    notifier = ChangeNotifier(
        {
            "fails": account(command=[sys.executable, "-c", "raise SystemExit(3)"]),
            "missing": account(command=[str(tmp_path / "no-such-program")]),
        }
    )
    with structlog.testing.capture_logs() as logs:
        await notifier.publish("fails", make_token("token-fails-1"))
        await notifier.publish("missing", make_token("token-missing-1"))
    events = {e["account"]: (e["event"], e.get("exit_code")) for e in logs}
    assert events == {
        "fails": ("on_change_command_failed", 3),
        "missing": ("on_change_command_failed", None),
    }


@pytest.mark.anyio
async def test_command_then_signal_after_the_files_are_written(tmp_path: Path, app: App) -> None:
    """build_publishers puts the files first; the command sees the new token file."""
    seen = tmp_path / "seen-by-command"
    config = Config.model_validate(
        {
            "serve": {"token_dir": str(tmp_path / "tokens"), "socket": None},
            "providers": {
                "idp": {
                    "token_endpoint": "https://idp.example",
                    "client_id": "c",
                    "auth_method": "none",
                }
            },
            "accounts": {
                "acct": {
                    "provider": "idp",
                    "grant": "client_credentials",
                    "on_change": {
                        "pid_file": str(app.pid_file),
                        "signal": "SIGUSR1",
                        "command": [
                            sys.executable,
                            "-c",
                            "import os, sys; open(sys.argv[1], 'w').write("
                            "open(os.environ['TOKEND_TOKEN_FILE']).read())",
                            str(seen),
                        ],
                    },
                }
            },
        }
    )
    publishers = build_publishers(config)
    assert [type(p) for p in publishers] == [TokenFiles, ChangeNotifier]
    await wait_for(app.pid_file.exists, what="the app's pid file")
    for publisher in publishers:
        await publisher.publish("acct", make_token("the-new-token-3"))
    assert seen.read_text() == "the-new-token-3"
    await wait_for(app.count_is(1), what="the signal")


@pytest.mark.anyio
async def test_a_cancelled_notification_kills_its_command(tmp_path: Path) -> None:
    """tokend stopping (its drain deadline) mid-command leaves nothing running."""
    pids = tmp_path / "pids"
    script = (
        "import os, subprocess, sys, time\n"
        "child = subprocess.Popen(['sleep', '1000'])\n"
        "open(sys.argv[1] + '.tmp', 'w').write(f'{os.getpid()} {child.pid}')\n"
        "os.replace(sys.argv[1] + '.tmp', sys.argv[1])\n"
        "time.sleep(1000)\n"
    )
    notifier = ChangeNotifier(
        {"acct": account(command=[sys.executable, "-c", script, str(pids)], timeout="60s")}
    )
    async with anyio.create_task_group() as group:
        group.start_soon(notifier.publish, "acct", make_token("the-access-token-4"))
        await wait_for(pids.exists, what="the command to start")
        group.cancel_scope.cancel()
    command_pid, child_pid = map(int, pids.read_text().split())
    assert not alive(command_pid)
    await wait_for(lambda: not alive(child_pid), what="the command's child to die")
