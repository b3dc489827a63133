"""Telling systemd how tokend is doing (``Type=notify``), over ``$NOTIFY_SOCKET``.

* ``READY=1`` once every required account holds a valid token: the moment ``/readyz``
  would first answer 200, so units ordered ``After=tokend.service`` start with tokens.
* ``WATCHDOG=1`` from the event loop, at a third of ``WatchdogSec=``: a loop that
  stops turning (a blocking call, a deadlock) stops the pings, and systemd restarts
  tokend.
* ``STATUS=`` with the accounts by state (``systemctl status tokend`` shows it).
* ``STOPPING=1`` when SIGTERM starts the drain.

The protocol is one datagram per message on a unix socket (an ``@`` prefix names an
abstract one); no library is needed. Without ``$NOTIFY_SOCKET`` nothing is sent.
"""

from __future__ import annotations

import collections
import os
import socket
from collections.abc import Mapping
from typing import TYPE_CHECKING

import anyio
from anyio.abc import TaskStatus

from tokend.logs import get_logger

if TYPE_CHECKING:
    from tokend.engine import Engine

_log = get_logger(component="systemd")

# How often readiness and STATUS are looked at: each look walks every account.
STATUS_INTERVAL = 5.0
# Before the first READY=1, readiness is looked at more often.
READY_INTERVAL = 0.25


class SystemdNotifier:
    """Sends ``KEY=VALUE`` lines to the service manager's notification socket."""

    def __init__(self, address: str, watchdog_interval: float | None = None) -> None:
        # "@name" is an abstract socket: its first byte is a NUL on the wire.
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_interval = watchdog_interval
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._socket.setblocking(False)
        self._failed = False
        self.draining = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> SystemdNotifier | None:
        """A notifier for ``$NOTIFY_SOCKET``, or None when not run by systemd.

        ``$WATCHDOG_USEC`` (with ``$WATCHDOG_PID``, when set, naming this process)
        turns the watchdog pings on."""
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET")
        if not address or address[0] not in "/@":
            return None
        watchdog = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            watchdog = int(usec) / 1e6 / 3
        return cls(address, watchdog)

    def send(self, *fields: str) -> bool:
        """Send one message; False (logged once) if the manager cannot be reached."""
        message = "\n".join(fields).encode()
        try:
            self._socket.sendto(message, self.address)
        except OSError as exc:
            if not self._failed:
                _log.warning("systemd_notify_failed", error=type(exc).__name__)
                self._failed = True
            return False
        return True

    def stopping(self) -> None:
        self.draining = True
        self.send("STOPPING=1", "STATUS=draining: in-flight refreshes finish and commit")

    def close(self) -> None:
        self._socket.close()


def status_line(engine: Engine, not_ready: list[str]) -> str:
    """``12 accounts: 10 valid, 1 retrying, 1 needs_reauth; ready`` (no secrets)."""
    counts = collections.Counter(str(account.state) for account in engine.accounts.values())
    total = sum(counts.values())
    by_state = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    line = f"{total} account{'' if total == 1 else 's'}"
    if by_state:
        line += f": {by_state}"
    if not_ready:
        shown = ", ".join(not_ready[:3]) + (", ..." if len(not_ready) > 3 else "")
        line += f"; not ready: {len(not_ready)} without a token ({shown})"
    else:
        line += "; ready"
    problem = getattr(engine, "store_problem", None)
    if problem:
        line += f"; store degraded: {problem}"
    return line


async def notify_systemd(
    engine: Engine,
    notifier: SystemdNotifier,
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Keep systemd told until cancelled: READY=1 once, STATUS= when it changes,
    WATCHDOG=1 at the watchdog interval."""
    task_status.started()
    ready = False
    status = ""
    next_look = next_ping = anyio.current_time()
    watchdog = notifier.watchdog_interval
    try:
        while True:
            now = anyio.current_time()
            if now >= next_look and not notifier.draining:
                not_ready = engine.not_ready()
                line = status_line(engine, not_ready)
                fields = [f"STATUS={line}"] if line != status else []
                if not ready and not not_ready:
                    ready = True
                    fields.insert(0, "READY=1")
                    _log.info("systemd_ready")
                if fields:
                    notifier.send(*fields)
                status = line
                next_look = now + (STATUS_INTERVAL if ready else READY_INTERVAL)
            wake = next_look
            if watchdog is not None:
                if now >= next_ping:
                    notifier.send("WATCHDOG=1")
                    next_ping = now + watchdog
                wake = min(wake, next_ping)
            await anyio.sleep(max(0.0, wake - anyio.current_time()))
    finally:
        notifier.close()
