"""Connections waiting for token changes (long-polls on the socket).

* Idle waiters: 10,000 long-polls (``GET /v1/tokens/x?after=V&wait=300s``) held open
  by one tokend; its RSS with them minus its RSS before. Reference: the plain asyncio
  echo server (bench/_echo.py) holding as many idle connections, same run. Then one
  forced refresh answers all of them: the time until the last answer arrived.
* Delay from commit to event: 1,000 long-polls, 50 on each of 20 accounts; forced
  refreshes one account at a time, and for every waiter the time from the token's
  version (when tokend received the token from the IdP, in microseconds) to its
  answer, so the figure includes the durable commit (sqlite on the disk) and the token
  files (on the disk) written before the waiters are told. Reference: the same with
  one waiter on one account and nothing else waiting.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import socket
import time
from pathlib import Path
from typing import Any

from bench._common import (
    Echo,
    Options,
    Row,
    Tokend,
    http,
    keepalive_client,
    log,
    ms,
    percentile,
    provider_section,
    request_head,
    rss_mb,
    serve_section,
    start_idp,
    wait_for,
    workdir,
    write_config,
)
from bench._load import exchange

IDLE_WAITERS = 10_000
DELAY_ACCOUNTS = 20
DELAY_PER_ACCOUNT = 50


def waiting(sock: Path) -> int:
    status, body = http(sock, "GET", "/metrics")
    for line in body.decode().splitlines():
        if line.startswith("tokend_socket_waiting_connections "):
            return int(float(line.split()[1]))
    raise RuntimeError(f"no waiting-connections gauge ({status})")


def open_connections(path: Path, count: int, request: bytes | None) -> list[socket.socket]:
    conns = []
    for _ in range(count):
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(os.fspath(path))
        if request is not None:
            conn.sendall(request)
        conns.append(conn)
    return conns


def settle_rss(pid: int) -> float:
    """RSS once it stops moving (the allocator returns what it let go of)."""
    previous = rss_mb(pid)
    for _ in range(20):
        time.sleep(0.25)
        current = rss_mb(pid)
        if abs(current - previous) < 0.2:
            return current
        previous = current
    return previous


def config_for(directory: Path, idp: Any, accounts: dict[str, Any], waiters: int) -> Path:
    return write_config(
        directory,
        {
            "state": {"path": str(directory / "state.db")},
            "serve": serve_section(
                directory,
                max_connections=waiters + 100,
                max_waiters=waiters + 50,
                idle_timeout="300s",
                force_refresh_interval=0,
            ),
            "log": {"level": "warning"},
            "providers": {"a": provider_section(idp, "bench-a")},
            "accounts": accounts,
        },
    )


def idle_waiters(options: Options, directory: Path, idp: Any) -> Row:
    n = IDLE_WAITERS
    accounts = {"x": {"provider": "a", "refresh_token": idp.seed("bench-a")}}
    config = config_for(directory, idp, accounts, n)
    sock = directory / "t.sock"
    with Echo(directory) as echo:
        assert echo.proc is not None
        echo_before = settle_rss(echo.proc.pid)
        conns = open_connections(echo.socket, n, None)
        wait_for(lambda: rss_mb(echo.proc.pid) > echo_before, 10, what="echo connections")
        echo_after = settle_rss(echo.proc.pid)
        for conn in conns:
            conn.close()
    with Tokend(config, sock) as tokend:
        tokend.wait_ready()
        _, body = http(sock, "GET", "/v1/tokens/x")
        version = json.loads(body)["version"]
        before = settle_rss(tokend.pid)
        log(f"opening {n} long-polls")
        t0 = time.perf_counter()
        request = request_head("GET", f"/v1/tokens/x?after={version}&wait=300s")
        conns = open_connections(sock, n, request)
        wait_for(lambda: waiting(sock) == n, 60, interval=0.05, what=f"{n} waiters")
        opened = time.perf_counter() - t0
        after = settle_rss(tokend.pid)
        # One commit answers them all.
        selector = selectors.DefaultSelector()
        for conn in conns:
            conn.setblocking(False)
            selector.register(conn, selectors.EVENT_READ)
        forced = keepalive_client(sock)
        t0 = time.perf_counter()
        response = exchange(forced, request_head("POST", "/v1/tokens/x/refresh"))
        if not response.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"forced refresh failed: {response[:200]!r}")
        answered = 0
        deadline = time.perf_counter() + 60
        while answered < n and time.perf_counter() < deadline:
            for key, _ in selector.select(timeout=1):
                conn = key.fileobj
                assert isinstance(conn, socket.socket)
                with contextlib.suppress(BlockingIOError):
                    if conn.recv(65536).startswith(b"HTTP/1.1 200"):
                        answered += 1
                        selector.unregister(conn)
        fan_out = time.perf_counter() - t0
        forced.close()
        for conn in conns:
            conn.close()
    added, echo_added = after - before, echo_after - echo_before
    return Row(
        f"idle waiters: {n:,} long-polls, RSS added",
        f"+{added:.1f} MB ({added * 1024 / n:.1f} KB each)",
        f"echo server, {n:,} idle connections: +{echo_added:.1f} MB",
        f"{added / echo_added:.2f}x" if echo_added > 0 else "-",
        "10,000 within +50 MB",
        added <= 50,
        [
            f"tokend {before:.1f} MB before, {after:.1f} MB with {n:,} waiting; opened in "
            f"{opened:.1f} s; one forced refresh then answered {answered:,} of them, the "
            f"last {ms(fan_out)} after the refresh was requested"
        ],
    )


class Waiters:
    """Long-polls on a tokend socket, each renewed as soon as it is answered."""

    def __init__(self, sock: Path) -> None:
        self.sock = sock
        self.selector = selectors.DefaultSelector()
        self.delays: list[float] = []

    def add(self, account: str, version: int, count: int) -> None:
        for conn in open_connections(self.sock, count, self._request(account, version)):
            conn.setblocking(False)
            self.selector.register(conn, selectors.EVENT_READ, [account, b""])

    @staticmethod
    def _request(account: str, version: int) -> bytes:
        return request_head("GET", f"/v1/tokens/{account}?after={version}&wait=300s")

    def collect(self, expected: int, timeout: float = 20.0) -> int:
        """Read answers until ``expected`` arrived; each is timed and renewed."""
        got = 0
        deadline = time.perf_counter() + timeout
        while got < expected and time.perf_counter() < deadline:
            for key, _ in self.selector.select(timeout=0.5):
                received = time.time()
                conn = key.fileobj
                assert isinstance(conn, socket.socket)
                state = key.data
                with contextlib.suppress(BlockingIOError):
                    state[1] += conn.recv(65536)
                head, sep, body = state[1].partition(b"\r\n\r\n")
                if not sep:
                    continue
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                if len(body) < length:
                    continue
                state[1] = body[length:]
                version = json.loads(body[:length])["version"]
                self.delays.append(received - version / 1_000_000)
                got += 1
                conn.setblocking(True)
                conn.sendall(self._request(state[0], version))
                conn.setblocking(False)
        return got

    def close(self) -> None:
        for key in list(self.selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]


def delays(
    directory: Path, idp: Any, per_account: int, accounts: int, rounds: int
) -> tuple[list[float], list[float]]:
    """(per-waiter delays, the forcing client's delays) over ``rounds`` refreshes."""
    names = [f"acct{i:02d}" for i in range(accounts)]
    config = config_for(
        directory,
        idp,
        {name: {"provider": "a", "refresh_token": idp.seed("bench-a")} for name in names},
        per_account * accounts,
    )
    sock = directory / "t.sock"
    forced_delays: list[float] = []
    with Tokend(config, sock) as tokend:
        tokend.wait_ready()
        waiters = Waiters(sock)
        try:
            for name in names:
                _, body = http(sock, "GET", f"/v1/tokens/{name}")
                waiters.add(name, json.loads(body)["version"], per_account)
            total = per_account * accounts
            wait_for(lambda: waiting(sock) == total, 30, interval=0.02, what="waiters")
            forced = keepalive_client(sock)
            for r in range(rounds):
                name = names[r % accounts]
                response = exchange(forced, request_head("POST", f"/v1/tokens/{name}/refresh"))
                received = time.time()
                if not response.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(f"forced refresh failed: {response[:200]!r}")
                body = response.partition(b"\r\n\r\n")[2]
                forced_delays.append(received - json.loads(body)["version"] / 1_000_000)
                if waiters.collect(per_account) < per_account:
                    raise RuntimeError(f"round {r}: not every waiter was answered")
                # Every waiter has renewed its long-poll before the next refresh.
                wait_for(lambda: waiting(sock) == total, 10, interval=0.002, what="renewed")
            forced.close()
        finally:
            waiters.close()
    return waiters.delays, forced_delays


def event_delay(options: Options, directory: Path, idp: Any) -> Row:
    rounds = 40 if options.quick else 100
    log(f"1 waiter, {rounds} refreshes")
    alone, _ = delays(directory, idp, 1, 1, rounds)
    log(f"{DELAY_ACCOUNTS * DELAY_PER_ACCOUNT} waiters, {rounds} refreshes")
    many, forced = delays(directory, idp, DELAY_PER_ACCOUNT, DELAY_ACCOUNTS, rounds)
    p99, ref99 = percentile(many, 99), percentile(alone, 99)
    return Row(
        "token received to event (commit, files inside), 1,000 long-polls, p99",
        ms(p99),
        f"1 waiter {ms(ref99)}",
        f"{p99 / ref99:.2f}x",
        "p99 <= 5 ms",
        p99 <= 0.005,
        [
            f"{len(many):,} answers over {rounds} forced refreshes ({DELAY_PER_ACCOUNT} "
            f"waiters on each of {DELAY_ACCOUNTS} accounts); timed from when tokend "
            "received the token (its version), so the durable commit and the token "
            f"files are inside the figure; p50 {ms(percentile(many, 50))} (1 waiter "
            f"{ms(percentile(alone, 50))}); the forced refresh's own answer, timed the "
            f"same way: p50 {ms(percentile(forced, 50))}, p99 {ms(percentile(forced, 99))}"
        ],
    )


def run(options: Options) -> list[Row]:
    with workdir("push") as directory:
        idp = start_idp(directory / "idp", access_token_ttl=3600)
        try:
            rows = [idle_waiters(options, directory, idp)]
            rows.append(event_delay(options, directory, idp))
        finally:
            idp.stop()
    return rows
