"""Token files that cannot be written are shown everywhere (status, /v1/accounts,
/readyz, metrics), never leave an expired token looking valid, and recover by
themselves. A real tokend writing to a real tmpfs that fills up, then goes read-only."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Tokend, wait_until
from tests.idp_harness import IdP
from tests.test_socket_api import RawClient, add_account, short_dir, socket_config, start

__all__ = ["short_dir"]  # the fixture, imported to be used here

MS_RDONLY, MS_REMOUNT, MNT_DETACH = 1, 32, 2


@pytest.fixture
def tiny_token_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "tokend" / "tokens"
    path.mkdir(parents=True)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"tmpfs", str(path).encode(), b"tmpfs", 0, b"size=256k") != 0:
        pytest.skip(f"cannot mount a tmpfs here: {os.strerror(ctypes.get_errno())}")
    try:
        yield path
    finally:
        libc.umount2(str(path).encode(), MNT_DETACH)


def remount(path: Path, *, read_only: bool) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    flags = MS_REMOUNT | (MS_RDONLY if read_only else 0)
    if libc.mount(b"tmpfs", str(path).encode(), b"tmpfs", flags, b"size=256k") != 0:
        raise OSError(ctypes.get_errno(), "remount failed")


def fill(directory: Path) -> Path:
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    return filler


def account_view(sock: Path) -> dict[str, Any]:
    with contextlib.closing(RawClient(sock)) as client:
        return dict(client.request("GET", "/v1/accounts").json()["accounts"][0])


def readyz(sock: Path) -> tuple[int, dict[str, Any]]:
    with contextlib.closing(RawClient(sock)) as client:
        response = client.request("GET", "/readyz")
    return response.status, response.json()


def publish_metrics(port: int) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    values = {}
    for line in text.splitlines():
        if line.startswith("tokend_publish_"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def status_output(tokend: Tokend) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "tokend", "status", "-c", str(tokend.config_path)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tokend.workdir,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def shown_token(tokend: Tokend) -> dict[str, Any] | None:
    """token.json as an application reads it (None when it cannot be opened)."""
    try:
        return dict(json.loads((tokend.workdir / "tokens" / "alice" / "token.json").read_text()))
    except FileNotFoundError:
        return None


def test_unwritable_token_files_are_shown_and_never_left_looking_valid(
    fresh_idp: IdP, tokend_factory: Any, short_dir: Path, tiny_token_dir: Path
) -> None:
    sock = short_dir / "tokend.sock"
    config = socket_config(fresh_idp, sock, metrics_listen="127.0.0.1:0")
    add_account(config, fresh_idp, "alice")
    tokend = start(tokend_factory(config), sock)
    port = tokend.wait_event("metrics_listening")[0]["port"]
    tokend.wait_event("refresh", account="alice", outcome="success")
    wait_until(lambda: shown_token(tokend), what="token.json")
    assert account_view(sock)["publish_error"] is None
    assert readyz(sock)[0] == 200
    assert publish_metrics(port)['tokend_publish_failing{publisher="token_files"}'] == 0

    # The volume fills up: the next refresh's files cannot be written.
    filler = fill(tiny_token_dir)
    failing = wait_until(
        lambda: account_view(sock)["publish_error"], timeout=20, what="a publish_error"
    )
    assert "No space left on device" in failing and str(tiny_token_dir) in failing
    status, body = readyz(sock)
    assert status == 503 and body["not_ready"] == ["alice"]
    assert "No space left" in body["publish_errors"]["alice"]
    metrics = publish_metrics(port)
    assert metrics['tokend_publish_failing{publisher="token_files"}'] == 1
    assert metrics['tokend_publish_errors_total{publisher="token_files"}'] >= 1
    assert "token files not written: No space left on device" in status_output(tokend)

    # The files keep the older token until it expires, then stop showing it (the
    # expired version cannot be written on a full volume: every file dangles).
    shown = shown_token(tokend)
    assert shown is not None and shown["access_token"]
    deadline = shown["expires_at"] + 3
    while time.time() < deadline:
        current = shown_token(tokend)
        if current is not None and current.get("expired") is not True:
            # One retry tick (1 s) of slack, plus the whole-second rounding.
            assert current["expires_at"] > time.time() - 2.5, current
        time.sleep(0.1)
    final = shown_token(tokend)
    # Rewriting a version in place needs no new blocks: a newer token may have been
    # written meanwhile after all. What must never be shown is an expired one.
    if final is not None and final.get("expired") is not True:
        assert final["expires_at"] > time.time() - 2.5, final
    else:
        assert not (tokend.workdir / "tokens" / "alice" / "token").exists()

    # Space comes back: the current token is written without waiting for a refresh.
    filler.unlink()
    wait_until(lambda: account_view(sock)["publish_error"] is None, timeout=15, what="recovery")
    assert readyz(sock)[0] == 200
    with contextlib.closing(RawClient(sock)) as client:
        served = client.request("GET", "/v1/tokens/alice").json()["access_token"]
    on_disk = (tokend.workdir / "tokens" / "alice" / "token").read_text()
    assert on_disk == served or tokend.events("refresh", account="alice")
    tokend.wait_event("token_files_recovered", account="alice")

    # A read-only volume: shown the same way, and recovered the same way.
    remount(tiny_token_dir, read_only=True)
    try:
        failing = wait_until(
            lambda: account_view(sock)["publish_error"], timeout=20, what="a publish_error"
        )
        assert "Read-only file system" in failing
        assert readyz(sock)[0] == 503
    finally:
        remount(tiny_token_dir, read_only=False)
    wait_until(lambda: readyz(sock)[0] == 200, timeout=15, what="recovery")
    assert tokend.stop() == 0
    # One error line per failure episode (two here), not one per retry.
    assert len(tokend.events("token_file_write_failed", level="error")) in (2, 3)
