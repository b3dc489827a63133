"""Token changes pushed to applications: the long-poll, the event stream, the waiter
limit and ``..version``, against a tokend subprocess and the real IdP."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Tokend, wait_until
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

__all__ = ["short_dir"]  # a fixture, used by name


class EventReader:
    """A client of ``GET /v1/events`` on its own connection."""

    def __init__(self, sock: Path, target: str = "/v1/events", timeout: float = 20.0) -> None:
        self.conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.conn.settimeout(timeout)
        self.conn.connect(str(sock))
        self.conn.sendall(encode_request("GET", target))
        self.raw = b""
        while b"\r\n\r\n" not in self.raw:
            self._fill()
        head, _, self.buffer = self.raw.partition(b"\r\n\r\n")
        self.status = int(head.split(b" ")[1])
        self.head = head.decode("latin-1").lower()

    def _fill(self) -> None:
        chunk = self.conn.recv(65536)
        if not chunk:
            raise ConnectionError("tokend closed the stream")
        self.raw += chunk
        if hasattr(self, "buffer"):
            self.buffer += chunk

    def next_event(self) -> tuple[str, dict[str, Any]]:
        """The next event (comments and the retry field skipped)."""
        while True:
            while b"\n\n" not in self.buffer:
                self._fill()
            block, _, self.buffer = self.buffer.partition(b"\n\n")
            fields = dict(
                line.split(": ", 1)
                for line in block.decode().split("\n")
                if line and not line.startswith(":") and ": " in line
            )
            if "event" in fields:
                return fields["event"], json.loads(fields["data"])

    def close(self) -> None:
        self.conn.close()


def long_poll(sock: Path, account: str, after: int, wait: str = "30s") -> RawClient:
    client = RawClient(sock, timeout=40)
    client.send(encode_request("GET", f"/v1/tokens/{account}?after={after}&wait={wait}"))
    return client


def version_file(tokend: Any, account: str) -> int | None:
    try:
        return int((tokend.workdir / "tokens" / account / "..version").read_text())
    except FileNotFoundError:
        return None


def serve_alice(
    idp: IdP, tokend_factory: Any, sock: Path, **serve: Any
) -> tuple[Tokend, dict[str, Any]]:
    """tokend serving one account, alice, with one-hour tokens; and her first token."""
    idp.configure(access_token_ttl=3600)
    config = socket_config(idp, sock, **serve)
    add_account(config, idp, "alice")
    tokend = start(tokend_factory(config), sock)
    return tokend, wait_for_token(sock, "alice")


def test_long_poll_is_answered_by_the_next_token_and_at_the_wait_end(
    fresh_idp: IdP, tokend_factory: Any, short_dir: Path
) -> None:
    sock = short_dir / "tokend.sock"
    tokend, first = serve_alice(fresh_idp, tokend_factory, sock, force_refresh_interval="0s")
    version = first["version"]
    assert isinstance(version, int) and version > 0
    # The socket may answer with a token a moment before its files are written.
    wait_until(lambda: version_file(tokend, "alice") == version, what="..version")

    # Not this version: answered at once.
    with contextlib.closing(long_poll(sock, "alice", 0)) as client:
        answer = client.read_response()
        assert answer.status == 200 and answer.json() == first | {
            "expires_in": answer.json()["expires_in"]
        }

    # This version: it waits until a refresh publishes the next token.
    with contextlib.closing(long_poll(sock, "alice", version)) as waiting:
        wait_until(lambda: _waiting(sock) == 1, what="the long-poll to wait")
        with contextlib.closing(RawClient(sock)) as other:
            refreshed = other.request("POST", "/v1/tokens/alice/refresh")
        assert refreshed.status == 200
        answer = waiting.read_response()
        assert answer.status == 200
        assert answer.json()["access_token"] == refreshed.json()["access_token"]
        assert answer.json()["version"] == refreshed.json()["version"] > version
        # The token files were written before the waiter was woken.
        assert version_file(tokend, "alice") == answer.json()["version"]
        assert tokend.token_json("alice")["version"] == answer.json()["version"]

        # Kept alive: the next long-poll on the same connection ends with its wait.
        newest = answer.json()["version"]
        waiting.send(encode_request("GET", f"/v1/tokens/alice?after={newest}&wait=0.5s"))
        end = waiting.read_response()
        assert end.status == 200 and end.json()["version"] == newest

    with contextlib.closing(RawClient(sock)) as client:
        for target in (
            "/v1/tokens/alice?wait=5s",
            "/v1/tokens/alice?after=x",
            "/v1/tokens/alice?after=1&wait=301s",
            "/v1/tokens/alice?after=1&min_valid=5",
        ):
            bad = client.request("GET", target)
            assert bad.status == 400, target
            assert bad.json()["error"] == "bad_request"
        assert client.request("GET", "/v1/tokens/nobody?after=1").status == 404


def _waiting(sock: Path) -> int:
    with contextlib.closing(RawClient(sock)) as client:
        text = client.request("GET", "/metrics").body.decode()
    for line in text.splitlines():
        if line.startswith("tokend_socket_waiting_connections "):
            return int(float(line.split()[1]))
    raise AssertionError("no tokend_socket_waiting_connections in /metrics")


def test_event_stream_carries_versions_and_state_never_the_token(
    fresh_idp: IdP, tokend_factory: Any, short_dir: Path
) -> None:
    sock = short_dir / "tokend.sock"
    config = socket_config(fresh_idp, sock)
    add_account(config, fresh_idp, "alice")
    add_account(config, fresh_idp, "bob")
    start(tokend_factory(config), sock)
    wait_for_token(sock, "alice")
    wait_for_token(sock, "bob")

    everything = EventReader(sock)
    one = EventReader(sock, "/v1/events?account=alice&token=1")
    seen_tokens: set[str] = set()
    try:
        assert everything.status == 200 and "text/event-stream" in everything.head
        # First the current state of every account, in name order.
        snapshot = [everything.next_event(), everything.next_event()]
        assert [(kind, data["account"]) for kind, data in snapshot] == [
            ("token", "alice"),
            ("token", "bob"),
        ]
        for _, data in snapshot:
            assert set(data) == {"account", "version", "expires_at", "state", "token_valid"}
            assert data["state"] == "valid" and data["token_valid"] is True
        versions = {data["account"]: data["version"] for _, data in snapshot}

        # The 5-second tokens are refreshed: each change arrives as an event.
        newer: dict[str, int] = {}
        while len(newer) < 2:
            kind, data = everything.next_event()
            assert kind == "token" and set(data) == set(snapshot[0][1])
            if data["version"] > versions[data["account"]]:
                newer[data["account"]] = data["version"]

        # One account, with its token: the token of each version as the API gives it.
        kind, data = one.next_event()
        assert kind == "token" and data["account"] == "alice"
        seen_tokens.add(data["access_token"])
        kind, data = one.next_event()
        assert kind == "token" and data["version"] > versions["alice"]
        seen_tokens.add(data["access_token"])
        with contextlib.closing(RawClient(sock)) as client:
            current = client.request("GET", "/v1/tokens/alice").json()
        if current["version"] == data["version"]:
            assert current["access_token"] == data["access_token"]
    finally:
        everything.close()
        one.close()
    assert seen_tokens and not any(token.encode() in everything.raw for token in seen_tokens)


def test_event_stream_and_long_poll_respect_the_allow_list(
    fresh_idp: IdP, tokend_factory: Any, short_dir: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to act as other uids")
    short_dir.chmod(0o755)
    sock = short_dir / "tokend.sock"
    config = socket_config(fresh_idp, sock, socket_mode="0666")
    add_account(config, fresh_idp, "alice", allow={"uids": [65534]})
    start(tokend_factory(config), sock)

    def alice_version() -> int | None:
        with contextlib.closing(RawClient(sock)) as client:
            (alice,) = client.request("GET", "/v1/accounts").json()["accounts"]
        return alice["version"] if alice["token_valid"] else None

    version = wait_until(alice_version, what="alice's token")

    def first_answer(uid: int, target: str) -> bytes:
        """What tokend answers ``target`` from a child running as ``uid``, up to the
        first event (or the whole answer)."""
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(read_end)
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                    conn.settimeout(10)
                    conn.connect(str(sock))
                    conn.sendall(encode_request("GET", target, {"Connection": "close"}))
                    answer = b""
                    while b"data: " not in answer and (chunk := conn.recv(65536)):
                        answer += chunk
                    while b"data: " in answer and not answer.endswith(b"\n\n"):
                        answer += conn.recv(65536)
                os.write(write_end, answer)
            except BaseException as exc:
                os.write(write_end, f"CHILD-ERROR {exc!r}".encode())
            finally:
                os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            answer = pipe.read()
        os.waitpid(pid, 0)
        return answer

    with_token = "/v1/events?account=alice&token=1"
    assert first_answer(0, with_token).startswith(b"HTTP/1.1 403")
    assert first_answer(0, f"/v1/tokens/alice?after={version}").startswith(b"HTTP/1.1 403")
    allowed = first_answer(65534, with_token)
    assert allowed.startswith(b"HTTP/1.1 200") and b'"access_token":"' in allowed
    # Without the token, the stream says what /v1/accounts says, to anyone.
    plain = first_answer(0, "/v1/events?account=alice")
    assert plain.startswith(b"HTTP/1.1 200") and b"access_token" not in plain


def test_waiting_connections_are_limited_with_a_clear_503(
    fresh_idp: IdP, tokend_factory: Any, short_dir: Path
) -> None:
    sock = short_dir / "tokend.sock"
    tokend, first = serve_alice(fresh_idp, tokend_factory, sock, max_connections=8, max_waiters=2)
    version = first["version"]

    first = long_poll(sock, "alice", version)
    stream = EventReader(sock)
    try:
        wait_until(lambda: _waiting(sock) == 2, what="two waiting connections")
        for target in (f"/v1/tokens/alice?after={version}", "/v1/events"):
            with contextlib.closing(RawClient(sock)) as client:
                refused = client.request("GET", target)
                assert refused.status == 503, target
                assert refused.json()["error"] == "too_many_waiters"
                assert refused.json()["max_waiters"] == 2
                assert refused.headers["retry-after"] == "1"
                # Reads that do not wait are served as ever, on the same connection.
                assert client.request("GET", "/v1/tokens/alice").status == 200
    finally:
        first.close()
    # A waiter that leaves makes room for the next.
    wait_until(lambda: _waiting(sock) == 1, what="the closed long-poll to be let go")
    with contextlib.closing(long_poll(sock, "alice", version, wait="0.2s")) as second:
        assert second.read_response().json()["version"] == version
    stream.close()

    # max_waiters must leave connections for reads.
    bad = socket_config(fresh_idp, sock, max_connections=8, max_waiters=8)
    bad["accounts"] = tokend.config["accounts"]
    tokend.write_config(bad)
    result = tokend.run_once()
    assert result.returncode != 0
    assert "max_waiters (8) must be less than max_connections (8)" in (
        result.stdout + result.stderr
    )


def test_version_file_changes_with_every_publish(
    fresh_idp: IdP, tokend_factory: Any, short_dir: Path
) -> None:
    sock = short_dir / "tokend.sock"
    config = socket_config(fresh_idp, sock)
    add_account(config, fresh_idp, "alice")
    tokend = start(tokend_factory(config), sock)
    wait_for_token(sock, "alice")
    seen: list[int] = []

    def three_versions() -> bool:
        number = version_file(tokend, "alice")
        document = tokend.token_json("alice")
        if number is None or document is None:
            return False
        if not seen or seen[-1] != number:
            seen.append(number)
        # token.json already shows the version ..version names, or a newer one.
        assert document["version"] >= number
        return len(seen) >= 3

    wait_until(three_versions, timeout=30, what="two refreshes of 5-second tokens")
    assert seen == sorted(seen) and len(set(seen)) == len(seen)


def test_client_cache_follows_the_pushed_token_not_a_timer(
    fresh_idp: IdP, tokend_factory: Any, short_dir: Path
) -> None:
    import httpx

    from tokend import client as tokend_client

    # One-hour tokens: a cache going by time alone would keep the first for a minute.
    sock = short_dir / "tokend.sock"
    serve_alice(fresh_idp, tokend_factory, sock, force_refresh_interval="0s")
    tokend_client.clear_cache()
    sent: list[str] = []
    transport = httpx.MockTransport(
        lambda request: sent.append(request.headers["authorization"]) or httpx.Response(200)
    )
    try:
        first = tokend_client.get_token_info("alice", sock)
        assert first.version is not None
        auth = tokend_client.TokendAuth("alice", sock)
        with httpx.Client(transport=transport, auth=auth) as http:
            http.get("http://app.example/")
            assert sent == [f"Bearer {first.access_token}"]
            wait_until(lambda: _waiting(sock) == 1, what="the client's long-poll")

            # Another process has the token refreshed: the cache follows at once.
            with contextlib.closing(RawClient(sock)) as other:
                second = other.request("POST", "/v1/tokens/alice/refresh").json()
            assert second["access_token"] != first.access_token
            wait_until(
                lambda: tokend_client.get_token("alice", sock) == second["access_token"],
                what="the cache to take the pushed token",
            )
            http.get("http://app.example/")
            assert sent[-1] == f"Bearer {second['access_token']}"
        # The watch asks again for the version after the one it holds.
        wait_until(lambda: _waiting(sock) == 1, what="the next long-poll")
    finally:
        tokend_client.clear_cache()
