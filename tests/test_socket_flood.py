"""Clients that send without reading: tokend's memory stays bounded, the abusers are
cut off, and a well-behaved client keeps getting its token. Real sockets against a
tokend subprocess; memory is read from /proc."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path
from typing import Any

from tests.idp_harness import IdP
from tests.test_socket_api import (
    RawClient,
    add_account,
    encode_request,
    short_dir,
    socket_config,
    start,
    wait_for_token,
)

__all__ = ["short_dir"]  # the fixture, imported to be used here

FLOODERS = 6
FLOOD_SECONDS = 3.0
# Growth of the peak resident set allowed while the flood lasts.
MAX_GROWTH = 30 * 1024 * 1024


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of ``pid``, in KiB."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0])
    return values


def flood(path: Path, stop: threading.Event, stats: dict[str, int], lock: threading.Lock) -> None:
    """Pipeline token requests as fast as the socket takes them, never reading an
    answer; reconnect whenever tokend cuts the connection."""
    burst = encode_request("GET", "/v1/tokens/alice") * 2000
    while not stop.is_set():
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(0.2)
        try:
            sock.connect(str(path))
            with lock:
                stats["connections"] += 1
            while not stop.is_set():
                try:
                    sent = sock.send(burst)
                except TimeoutError:
                    continue  # tokend stopped reading: the kernel buffers are full
                with lock:
                    stats["bytes"] += sent
        except OSError:
            with lock:
                stats["cut_off"] += 1
        finally:
            sock.close()


def test_clients_that_never_read_cannot_grow_memory(
    fresh_idp: IdP, tokend_factory: Any, short_dir: Path
) -> None:
    sock = short_dir / "tokend.sock"
    config = socket_config(fresh_idp, sock, idle_timeout="1s")
    add_account(config, fresh_idp, "alice")
    tokend = start(tokend_factory(config), sock)
    wait_for_token(sock, "alice")
    assert tokend.proc is not None
    pid = tokend.proc.pid
    normal = RawClient(sock)
    for _ in range(200):
        assert normal.request("GET", "/v1/tokens/alice").status == 200
    before = memory_kib(pid)

    stop = threading.Event()
    lock = threading.Lock()
    stats = {"connections": 0, "bytes": 0, "cut_off": 0}
    threads = [
        threading.Thread(target=flood, args=(sock, stop, stats, lock)) for _ in range(FLOODERS)
    ]
    for thread in threads:
        thread.start()
    served = 0
    worst = 0.0
    try:
        deadline = time.monotonic() + FLOOD_SECONDS
        while time.monotonic() < deadline:
            started = time.perf_counter()
            response = normal.request("GET", "/v1/tokens/alice")
            worst = max(worst, time.perf_counter() - started)
            assert response.status == 200
            assert response.json()["access_token"]
            served += 1
            # The idle timeout (1 s) must not close the well-behaved connection.
            time.sleep(0.01)
        after = memory_kib(pid)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    normal.close()

    growth = (after["VmHWM"] - before["VmHWM"]) * 1024
    print(
        f"\nflood: {FLOODERS} clients sent {stats['bytes'] / 1e6:.0f} MB over "
        f"{stats['connections']} connections ({stats['cut_off']} cut off); "
        f"RSS idle {before['VmRSS'] / 1024:.1f} MiB, peak before {before['VmHWM'] / 1024:.1f} "
        f"MiB, peak during {after['VmHWM'] / 1024:.1f} MiB; well-behaved client: "
        f"{served} tokens, slowest {worst * 1e3:.0f} ms"
    )
    assert growth < MAX_GROWTH, f"peak RSS grew {growth / 1e6:.0f} MB under the flood"
    assert served >= 50
    # Clients that never read are cut off (at the idle timeout at the latest), and
    # nothing they sent or failed to read is kept.
    assert stats["cut_off"] >= FLOODERS
    assert tokend.wait_event("connection_dropped")
    with contextlib.closing(RawClient(sock)) as client:
        assert client.request("GET", "/healthz").status == 200
    assert tokend.events("request_failed") == []
