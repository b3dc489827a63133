"""File I/O stays off the event loop: the daemon reads provider secret and key files
in worker threads (watched in a real tokend process through an audit hook), and token
files use worker threads of their own, never the shared pool the store commits use."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
import pytest

from tests.conftest import base_config
from tests.idp_harness import BASIC_SECRET, IdP
from tokend.model import TokenSet
from tokend.publish import files as files_module
from tokend.publish.files import TokenFiles

# Imported by the tokend subprocess (PYTHONPATH): reports, as a JSON log line, every
# open of a watched file from a thread that is running an event loop.
SITECUSTOMIZE = """
import asyncio, json, os, sys

_watched = set(filter(None, os.environ.get("TOKEND_TEST_WATCHED_FILES", "").split(os.pathsep)))

def _hook(event, args):
    if event == "open" and args and isinstance(args[0], (str, os.PathLike)):
        path = os.fspath(args[0])
        if path in _watched and asyncio._get_running_loop() is not None:
            line = json.dumps({"event": "_file_opened_on_event_loop", "path": path})
            os.write(2, line.encode() + b"\\n")

if _watched:
    sys.addaudithook(_hook)
"""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_provider_secret_and_key_files_are_read_off_the_event_loop(
    fresh_idp: IdP,
    idp_keys: dict[str, Any],
    tokend_factory: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(SITECUSTOMIZE)
    secret_file = tmp_path / "client-secret"
    secret_file.write_text(BASIC_SECRET + "\n")
    key_file = Path(idp_keys["ec_pem"])
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(hook_dir), os.environ.get("PYTHONPATH")]))
    )
    monkeypatch.setenv(
        "TOKEND_TEST_WATCHED_FILES", os.pathsep.join([str(secret_file), str(key_file)])
    )

    config = base_config(fresh_idp)
    provider = config["providers"]["idp"]
    del provider["client_secret"]
    provider["client_secret_file"] = str(secret_file)
    config["providers"]["jwt"] = {
        "issuer": fresh_idp.issuer,
        "client_id": "jwt-client",
        "auth_method": "private_key_jwt",
        "private_key_file": str(key_file),
        "timeout": "3s",
    }
    config["accounts"]["alice"] = {
        "provider": "idp",
        "refresh_token": fresh_idp.seed("basic-client"),
    }
    config["accounts"]["bob"] = {"provider": "jwt", "refresh_token": fresh_idp.seed("jwt-client")}
    tokend = tokend_factory(config).start()
    tokend.wait_event("refresh", account="alice", outcome="success")
    tokend.wait_event("refresh", account="bob", outcome="success")

    # A reload reads both files again (their content is part of the provider's
    # fingerprint); a changed secret file rebuilds that provider's client.
    secret_file.write_text(BASIC_SECRET + "\r\n")
    tokend.signal(signal.SIGHUP)
    reloaded = tokend.wait_event("reloaded")
    assert reloaded[0]["providers_changed"] == ["idp"]
    tokend.wait_event("refresh", account="alice", outcome="success", count=2)
    assert tokend.stop() == 0
    on_loop = tokend.events("_file_opened_on_event_loop")
    assert on_loop == [], json.dumps(on_loop)


def token(access: str) -> TokenSet:
    return TokenSet(
        access_token=access, token_type="Bearer", expires_at=2e9, issued_at=1.7e9, scope=None
    )


@pytest.mark.anyio
async def test_token_file_io_leaves_the_shared_worker_threads_free(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A token volume that hangs (an NFS server gone, say): every file creation blocks.
    release = threading.Event()
    all_blocked = anyio.Event()
    blocked = 0
    lock = threading.Lock()
    create_file = files_module._create_file

    def hanging_create_file(*args: Any, **kwargs: Any) -> None:
        nonlocal blocked
        with lock:
            blocked += 1
            if blocked == files_module._IO_THREADS:
                anyio.from_thread.run_sync(all_blocked.set)
        release.wait(30)
        create_file(*args, **kwargs)

    monkeypatch.setattr(files_module, "_create_file", hanging_create_file)
    files = TokenFiles(tmp_path / "tokens")
    shared = anyio.to_thread.current_default_thread_limiter()
    try:
        async with anyio.create_task_group() as group:
            for i in range(int(shared.total_tokens) + 10):
                group.start_soon(files.publish, f"account{i}", token(f"token-{i:08d}"))
            with anyio.fail_after(10):
                await all_blocked.wait()
            # Every token-file thread is stuck, and the shared pool is untouched: the
            # store's commits (and the metrics exposition) still get threads at once.
            assert shared.borrowed_tokens == 0
            with anyio.fail_after(5):
                assert await anyio.to_thread.run_sync(lambda: 42) == 42
            assert blocked == files_module._IO_THREADS
            release.set()
    finally:
        release.set()
    for i in range(int(shared.total_tokens) + 10):
        assert (tmp_path / "tokens" / f"account{i}" / "token").read_text() == f"token-{i:08d}"
