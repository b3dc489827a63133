"""The application side: ``tokend token``, ``tokend status``, and the client library
(``get_token``, ``TokendAuth`` with httpx) against tokend running as a subprocess."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from tests.conftest import Tokend, wait_until
from tests.idp_harness import IdP
from tests.test_socket_api import (
    add_account,
    add_dead_account,
    refreshes_since,
    socket_config,
    start,
    wait_for_token,
)
from tokend import client as tokend_client
from tokend.cli import main
from tokend.client_commands import resolve_socket_path


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: unix socket paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="td"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def served(fresh_idp: IdP, tokend_factory: Any, short_dir: Path) -> tuple[Tokend, Path, list[str]]:
    """tokend with alice and bob (valid, 60 s tokens) and carol (dead seed, optional)."""
    fresh_idp.configure(access_token_ttl=60)
    sock = short_dir / "tokend.sock"
    config = socket_config(fresh_idp, sock)
    seeds = [
        add_account(config, fresh_idp, "alice"),
        add_account(config, fresh_idp, "bob"),
        add_dead_account(config, "carol", required=False),
    ]
    tokend = start(tokend_factory(config), sock)
    wait_for_token(sock, "alice")
    wait_for_token(sock, "bob")
    tokend.wait_event("refresh", account="carol", outcome="account_permanent")
    # The socket hands out a token as soon as it is committed; its files follow.
    for account in ("alice", "bob"):
        wait_until(
            lambda: (tokend.workdir / "tokens" / account / "token.json").exists(),  # noqa: B023
            what=f"{account}'s token files",
        )
    return tokend, sock, seeds


def cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> Any:
    """``tokend ARGS`` as a real process."""
    return subprocess.run(
        [sys.executable, "-m", "tokend", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=60,
    )


def current_token(sock: Path, account: str) -> str:
    return str(wait_for_token(sock, account)["access_token"])


# -- tokend token ------------------------------------------------------------------------------


def test_token_command_prints_the_token_or_one_line_and_an_exit_code(
    served: tuple[Tokend, Path, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    _, sock, seeds = served
    token = current_token(sock, "alice")

    done = cli("token", "alice", "--socket", str(sock))
    assert (done.returncode, done.stdout, done.stderr) == (0, token + "\n", "")

    assert main(["token", "alice", "--socket", str(sock), "--json", "--min-valid", "30"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {"access_token", "token_type", "expires_at", "expires_in", "scope"}
    assert data["access_token"] == token and data["expires_in"] > 30

    assert main(["token", "nobody", "--socket", str(sock)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == "tokend: unknown account 'nobody'\n"

    # No valid token: exit 1, one line that says why, and no secret in it.
    assert main(["token", "carol", "--socket", str(sock)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert "no valid token (state needs_reauth)" in err
    for secret in [token, *seeds]:
        assert secret not in err

    assert main(["token", "alice", "--socket", str(sock.parent / "missing.sock")]) == 1
    assert "tokend is not running at" in capsys.readouterr().err

    with pytest.raises(SystemExit) as usage:
        main(["token", "alice", "--min-valid", "soon"])
    assert usage.value.code == 2
    capsys.readouterr()


def test_token_command_finds_the_socket_from_config_or_environment(
    served: tuple[Tokend, Path, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokend, sock, _ = served
    token = current_token(sock, "alice")
    monkeypatch.delenv("TOKEND_CONFIG", raising=False)
    monkeypatch.delenv("TOKEND_SOCKET", raising=False)

    # -c names the daemon's config: its serve.socket is used.
    assert resolve_socket_path(None, str(tokend.config_path)) == str(sock)
    # ./config.yaml is found in the working directory (the daemon's own).
    found = cli("token", "alice", cwd=tokend.workdir)
    assert (found.returncode, found.stdout) == (0, token + "\n")
    # Elsewhere, $TOKEND_SOCKET; --socket beats everything.
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    from_env = cli("token", "alice", cwd=empty, env={"TOKEND_SOCKET": str(sock)})
    assert (from_env.returncode, from_env.stdout) == (0, token + "\n")
    assert resolve_socket_path("x.sock", str(tokend.config_path)) == "x.sock"
    # Nothing at all: ./run/tokend.sock, relative to the working directory.
    monkeypatch.chdir(empty)
    assert resolve_socket_path(None, None, {}) == "run/tokend.sock"

    broken = tmp_path / "broken.yaml"
    broken.write_text("serve: [\n")
    bad = cli("token", "alice", "-c", str(broken))
    assert bad.returncode == 2 and "pass --socket PATH" in bad.stderr


# -- tokend status -------------------------------------------------------------------------------


def test_status_command_shows_a_table_without_secrets(
    served: tuple[Tokend, Path, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    _, sock, seeds = served
    token = current_token(sock, "alice")
    assert main(["status", "--socket", str(sock)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == [
        "ACCOUNT",
        "PROVIDER",
        "STATE",
        "EXPIRES",
        "IN",
        "LAST",
        "REFRESH",
        "NEXT",
        "REFRESH",
        "REAUTH",
        "BY",
        "LAST",
        "ERROR",
    ]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == {"alice", "bob", "carol"}
    alice = rows["alice"].split()
    assert alice[1:3] == ["idp", "valid"]
    assert alice[3].endswith("s") and "ago" in rows["alice"] and " in " in rows["alice"]
    carol = rows["carol"]
    assert "needs_reauth" in carol and carol.split()[3] == "-"
    # The error column is cut to 60 characters.
    error_column = lines[0].index("LAST ERROR")
    assert len(carol[error_column:]) <= 60
    for secret in [token, *seeds]:
        assert secret not in out

    assert main(["status", "--socket", str(sock.parent / "missing.sock")]) == 1
    assert capsys.readouterr().err.startswith("tokend: tokend is not running")


# -- the library ---------------------------------------------------------------------------------


def test_get_token_and_its_errors(served: tuple[Tokend, Path, list[str]]) -> None:
    _, sock, seeds = served
    token = tokend_client.get_token("alice", sock)
    assert token == current_token(sock, "alice")
    info = tokend_client.get_token_info("alice", str(sock), min_valid=10)
    assert info.access_token == token and info.expires_in > 10
    assert token not in repr(info)

    with pytest.raises(tokend_client.UnknownAccount):
        tokend_client.get_token("nobody", sock)
    with pytest.raises(tokend_client.TokenUnavailable) as unavailable:
        tokend_client.get_token("carol", sock)
    assert unavailable.value.status == 503 and unavailable.value.state == "needs_reauth"
    assert unavailable.value.last_error
    for secret in seeds:
        assert secret not in str(unavailable.value)
    with pytest.raises(tokend_client.TokendUnreachable):
        tokend_client.get_token("alice", sock.parent / "missing.sock", timeout=2)
    accounts = tokend_client.list_accounts(sock)
    assert [a["name"] for a in accounts] == ["alice", "bob", "carol"]


class _ResourceServer:
    """An API that rejects the access tokens it is told are revoked (401)."""

    def __init__(self) -> None:
        self.revoked: set[str] = set()
        self.seen: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                header = self.headers.get("Authorization", "")
                token = header.removeprefix("Bearer ")
                outer.seen.append(token)
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                status = 401 if token in outer.revoked or not header.startswith("Bearer ") else 200
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/api"

    @contextlib.contextmanager
    def running(self) -> Iterator[_ResourceServer]:
        thread = threading.Thread(target=self.server.serve_forever)
        thread.start()
        try:
            yield self
        finally:
            self.server.shutdown()
            thread.join()
            self.server.server_close()


def test_tokend_auth_refreshes_once_on_401(
    served: tuple[Tokend, Path, list[str]], fresh_idp: IdP
) -> None:
    _, sock, _ = served
    api = _ResourceServer()
    with api.running():
        # alice's current token gets revoked at the API: one 401, one refresh, one retry.
        first = current_token(sock, "alice")
        api.revoked.add(first)
        since = time.time()
        auth = tokend_client.TokendAuth("alice", sock)
        with httpx.Client(auth=auth) as http:
            response = http.post(api.url, content=b"payload")
        assert response.status_code == 200 and response.content == b"payload"
        second = current_token(sock, "alice")
        assert api.seen == [first, second] and second != first
        assert len(refreshes_since(fresh_idp, since)) == 1

        # Revoked again at once: the refresh is refused (rate limit) and tokend's token
        # is the rejected one, so the 401 comes back as it is -- no loop, no new refresh.
        api.revoked.add(second)
        with httpx.Client(auth=auth) as http:
            assert http.post(api.url, content=b"again").status_code == 401
        assert api.seen[2:] == [second]
        assert len(refreshes_since(fresh_idp, since)) == 1
        # Refused, but tokend holds a newer token than the rejected one: that is used.
        assert auth._replacement(tokend_client.Token(first, "Bearer", 0, 0, None)) is not None

        # The same with httpx.AsyncClient, for bob.
        bob = current_token(sock, "bob")
        api.revoked.add(bob)

        async def call() -> httpx.Response:
            async with httpx.AsyncClient(auth=tokend_client.TokendAuth("bob", sock)) as http:
                return await http.post(api.url, content=b"async")

        assert anyio.run(call).status_code == 200
        assert api.seen[-2] == bob and api.seen[-1] == current_token(sock, "bob") != bob


def test_requests_auth_refreshes_once_on_401(
    served: tuple[Tokend, Path, list[str]], fresh_idp: IdP
) -> None:
    import requests

    _, sock, _ = served
    api = _ResourceServer()
    with api.running(), requests.Session() as session:
        first = current_token(sock, "alice")
        api.revoked.add(first)
        since = time.time()
        session.auth = tokend_client.TokendRequestsAuth("alice", sock)
        response = session.post(api.url, data=b"payload")
        assert response.status_code == 200 and response.content == b"payload"
        second = current_token(sock, "alice")
        assert api.seen == [first, second] and second != first
        assert [r.status_code for r in response.history] == [401]
        assert len(refreshes_since(fresh_idp, since)) == 1
        # Rejected again at once: refused refresh, same token, the 401 as it is.
        api.revoked.add(second)
        assert session.post(api.url, data=b"again").status_code == 401
        assert api.seen[2:] == [second]
        assert len(refreshes_since(fresh_idp, since)) == 1


def test_tokens_are_cached_until_near_expiry_and_read_from_token_files(
    served: tuple[Tokend, Path, list[str]],
) -> None:
    tokend, sock, _ = served
    token = tokend_client.get_token("alice", sock)
    tokens = tokend.workdir / "tokens"

    def from_file() -> tokend_client.Token | None:
        try:
            found = tokend_client.get_token_info("alice", token_dir=tokens, cache=False)
        except tokend_client.TokenUnavailable:
            return None  # the files are written just after the socket has the token
        return found if found.access_token == token else None

    assert wait_until(from_file, what="alice's token file").expires_in > 0
    with pytest.raises(tokend_client.TokenUnavailable):
        tokend_client.get_token("carol", token_dir=tokens)
    with pytest.raises(tokend_client.TokenUnavailable):
        tokend_client.get_token("alice", token_dir=tokens, min_valid=3600)

    # With tokend gone, the cached token (54 s left of 60) is still handed out; a
    # demand beyond what the cache can promise, or cache=False, asks tokend.
    assert tokend.stop() == 0
    assert tokend_client.get_token("alice", sock, min_valid=5) == token
    with pytest.raises(tokend_client.TokendUnreachable):
        tokend_client.get_token("alice", sock, min_valid=50)
    with pytest.raises(tokend_client.TokendUnreachable):
        tokend_client.get_token("alice", sock, cache=False)
    tokend_client.clear_cache()
    with pytest.raises(tokend_client.TokendUnreachable):
        tokend_client.get_token("alice", sock)


def test_status_shows_when_a_new_sign_in_is_due() -> None:
    from tokend.client_commands import format_status

    now = 1_800_000_000.0
    table = format_status(
        [
            {
                "name": "soon",
                "state": "valid",
                "reauth_deadline": now + 3 * 86400,
                "reauth_warning": True,
            },
            {
                "name": "later",
                "state": "valid",
                "reauth_deadline": now + 60 * 86400,
                "reauth_warning": False,
            },
            {"name": "unknown", "state": "valid", "reauth_deadline": None, "reauth_warning": False},
        ],
        now,
    )
    rows = {line.split()[0]: line for line in table.splitlines()[1:]}
    assert "in 3d00h (sign in again)" in rows["soon"]
    assert "in 60d00h" in rows["later"] and "sign in" not in rows["later"]
    assert "sign in" not in rows["unknown"]
