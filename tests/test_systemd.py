"""systemd: the notify protocol against a real datagram socket with tokend as a
subprocess, and ``systemd-analyze verify`` on the shipped unit."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, base_config, wait_until
from tests.idp_harness import IdP
from tests.test_socket_api import RawClient, add_account, add_dead_account

UNIT = REPO / "deploy" / "systemd" / "tokend.service"
# The entry point installed beside this interpreter (the checkout's venv).
TOKEND = Path(sys.executable).parent / "tokend"


class NotifySocket:
    """The service manager's end: a bound SOCK_DGRAM socket collecting messages."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "notify"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.settimeout(0.05)
        # (monotonic receive time, {KEY: VALUE}) per datagram, in order.
        self.messages: list[tuple[float, dict[str, str]]] = []

    def drain(self) -> list[tuple[float, dict[str, str]]]:
        while True:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return self.messages
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
            self.messages.append((time.monotonic(), fields))

    def find(self, key: str, value: str | None = None) -> list[dict[str, str]]:
        return [m for _, m in self.drain() if key in m and (value is None or value in m[key])]


@pytest.fixture
def notify(monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    directory = Path(tempfile.mkdtemp(prefix="td"))
    receiver = NotifySocket(directory)
    monkeypatch.setenv("NOTIFY_SOCKET", str(receiver.path))
    # 0.6 s: a ping every 0.2 s.
    monkeypatch.setenv("WATCHDOG_USEC", "600000")
    yield receiver
    receiver.sock.close()
    shutil.rmtree(directory, ignore_errors=True)


def test_ready_watchdog_status_and_stopping(
    fresh_idp: IdP, tokend_factory: Any, notify: NotifySocket
) -> None:
    fresh_idp.configure(access_token_ttl=60)
    sock = notify.path.parent / "t.sock"
    config = base_config(fresh_idp, socket=str(sock))
    add_account(config, fresh_idp, "alice")
    add_dead_account(config, "carol")  # required, and its seed is rejected
    tokend = tokend_factory(config)
    tokend.start()

    # carol can never get a token: STATUS says so, and READY=1 is never sent.
    settled = "1 needs_reauth, 1 valid; not ready: 1 without a token (carol)"
    wait_until(lambda: notify.find("STATUS", settled), what="STATUS with alice valid, carol not")
    assert not notify.find("READY")
    # The watchdog is pinged from the event loop, at a third of WATCHDOG_USEC.
    wait_until(lambda: len(notify.find("WATCHDOG", "1")) >= 5, 10, what="watchdog pings")
    pings = [t for t, m in notify.messages if m.get("WATCHDOG") == "1"]
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    # About 0.2 s apart (the median: one stall of a loaded test machine is no failure).
    assert 0.1 < statistics.median(gaps) < 0.4, gaps

    # carol is made optional (SIGHUP): every required account has a token -> READY=1,
    # at the moment /readyz answers 200.
    config["accounts"]["carol"]["required"] = False
    tokend.write_config(config)
    tokend.signal(signal.SIGHUP)
    wait_until(lambda: notify.find("READY", "1"), what="READY=1")
    assert RawClient(sock).request("GET", "/readyz").status == 200
    ready = notify.find("READY", "1")[0]
    assert "; ready" in ready["STATUS"] and "2 accounts" in ready["STATUS"]
    assert len(notify.find("READY")) == 1
    for secret in [a.get("refresh_token") for a in config["accounts"].values()]:
        assert all(secret not in m.get("STATUS", "") for _, m in notify.messages)

    # SIGTERM: STOPPING=1 when the drain starts, then a clean exit.
    tokend.signal(signal.SIGTERM)
    assert tokend.proc.wait(20) == 0
    assert notify.find("STOPPING", "1")
    last_ready = max(i for i, (_, m) in enumerate(notify.messages) if "READY" in m)
    stopping = min(i for i, (_, m) in enumerate(notify.messages) if "STOPPING" in m)
    assert stopping > last_ready


def test_without_notify_socket_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    from tokend.publish.systemd import SystemdNotifier

    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert SystemdNotifier.from_environ() is None
    assert SystemdNotifier.from_environ({"NOTIFY_SOCKET": "relative"}) is None
    other_pid = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}
    notifier = SystemdNotifier.from_environ(other_pid)
    assert notifier is not None and notifier.watchdog_interval is None
    assert notifier.address == "\0x"
    notifier.close()


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    # verify checks that ExecStart's program exists: point it at this checkout's tokend.
    tokend = TOKEND
    unit = tmp_path / "tokend.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/tokend", str(tokend)))
    done = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60
    )
    # Unknown keys and bad values are warnings with exit code 0: none is allowed.
    assert (done.returncode, done.stderr, done.stdout) == (0, "", "")


def test_example_config_for_systemd_is_valid(tmp_path: Path) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    for name in ("idp-client-secret", "alice.refresh_token"):
        (credentials / name).write_text("x" * 20 + "\n")
    done = subprocess.run(
        [str(TOKEND), "check", "-c", str(UNIT.parent / "config.yaml")],
        capture_output=True,
        text=True,
        env={**os.environ, "CREDENTIALS_DIRECTORY": str(credentials)},
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    # Every credential the unit loads is one the config reads.
    loaded = [
        line.split("=", 1)[1].split(":", 1)[0]
        for line in UNIT.read_text().splitlines()
        if line.startswith("LoadCredential=")
    ]
    config_text = (UNIT.parent / "config.yaml").read_text()
    assert loaded and all(f"${{CREDENTIALS_DIRECTORY}}/{name}" in config_text for name in loaded)
