"""The socket API, end to end: tokend runs as a subprocess against the real IdP and the
tests talk to its unix socket the way applications do (a raw socket with keep-alive,
httpx's unix-socket transport, clients running as other uids), plus the TCP port for
probes and metrics. Also the request-head parser, checked against h11."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests._canary import CANARY
from tests.conftest import Tokend, base_config, wait_until
from tests.idp_harness import IdP
from tokend.publish._http import HttpError, parse_head

# -- helpers ----------------------------------------------------------------------------------


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: unix socket paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="td"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class RawClient:
    """An HTTP/1.1 client on one unix socket connection, kept alive across requests."""

    path: Path
    timeout: float = 15.0
    sock: socket.socket = field(init=False)
    buffer: bytes = b""

    def __post_init__(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(str(self.path))

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(
        self, method: str = "GET", target: str = "/", headers: dict[str, str] | None = None
    ) -> Response:
        self.send(encode_request(method, target, headers))
        return self.read_response()

    def read_response(self) -> Response:
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(self.buffer) < length:
            self._fill()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        CANARY.note_output(f"socket answer ({status_line})", body)
        return Response(int(status_line.split(" ")[1]), headers, body)

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("tokend closed the connection")
        self.buffer += chunk

    def is_closed_by_peer(self) -> bool:
        """Whether tokend has closed the connection (anything it sent first is read)."""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buffer += chunk
        except (TimeoutError, BlockingIOError):
            return False
        except ConnectionResetError:
            return True


def encode_request(method: str, target: str, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: tokend"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def socket_config(idp: IdP, sock: Path, **serve: Any) -> dict[str, Any]:
    config = base_config(idp, socket=str(sock), **serve)
    # A few failures in a row must not hold an account back for long in a test.
    config["providers"]["idp"]["backoff"] = {"initial": "0.2s", "max": "1s"}
    return config


def add_account(config: dict[str, Any], idp: IdP, name: str, **extra: Any) -> str:
    seed = idp.seed("basic-client")
    config["accounts"][name] = {"provider": "idp", "refresh_token": seed, **extra}
    return seed


def add_dead_account(config: dict[str, Any], name: str, **extra: Any) -> str:
    """An account whose seed the IdP rejects (invalid_grant): it ends in needs_reauth."""
    seed = f"not-a-valid-refresh-token-{name}-0123456789"
    config["accounts"][name] = {"provider": "idp", "refresh_token": seed, **extra}
    return seed


def start(tokend: Tokend, sock: Path) -> Tokend:
    tokend.start()
    tokend.wait_event("socket_listening")
    assert sock.exists()
    return tokend


def wait_for_token(sock: Path, account: str, timeout: float = 15.0) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        client = RawClient(sock)
        try:
            response = client.request("GET", f"/v1/tokens/{account}")
        finally:
            client.close()
        return response.json() if response.status == 200 else None

    return wait_until(ready, timeout, what=f"a token for {account}")


def refreshes_since(idp: IdP, since: float) -> list[dict[str, Any]]:
    return [e for e in idp.log() if e["grant_type"] == "refresh_token" and e["t_start"] >= since]


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


# -- reading tokens -----------------------------------------------------------------------------


def test_token_reads_json_and_text_on_one_kept_alive_connection(
    fresh_idp: IdP, tokend_factory: Any, short_dir: Path
) -> None:
    sock = short_dir / "tokend.sock"
    config = socket_config(fresh_idp, sock)
    add_account(config, fresh_idp, "alice")
    tokend = start(tokend_factory(config), sock)
    wait_for_token(sock, "alice")

    client = RawClient(sock)
    first = client.request("GET", "/v1/tokens/alice")
    assert first.status == 200
    assert first.headers["content-type"] == "application/json"
    assert first.headers["cache-control"] == "no-store"
    data = first.json()
    assert set(data) == {
        "access_token",
        "token_type",
        "expires_at",
        "expires_in",
        "scope",
        "version",
    }
    assert data["token_type"].lower() == "bearer"
    assert isinstance(data["expires_at"], int) and isinstance(data["expires_in"], int)
    assert 0 <= data["expires_in"] <= 5
    assert abs(data["expires_at"] - time.time() - data["expires_in"]) <= 2
    assert data["scope"] == "openid offline_access read"

    text = client.request("GET", "/v1/tokens/alice", {"Accept": "text/plain"})
    assert text.status == 200
    assert text.headers["content-type"].startswith("text/plain")
    later = client.request("GET", "/v1/tokens/alice").json()
    # A scheduled refresh may land between two reads; the raw token is one of them.
    assert text.body.decode() in {data["access_token"], later["access_token"]}

    # Pipelined: two requests in one write, two answers in order, same connection.
    client.send(
        encode_request("GET", "/v1/tokens/alice", {"Accept": "text/plain"})
        + encode_request("GET", "/healthz")
    )
    assert client.read_response().status == 200
    assert client.read_response().json() == {"status": "ok"}
    tokens = {data["access_token"], later["access_token"]}
    for _ in range(20):
        response = client.request("GET", "/v1/tokens/alice")
        assert response.status == 200
        tokens.add(response.json()["access_token"])

    transport = httpx.HTTPTransport(uds=str(sock))
    with httpx.Client(transport=transport, base_url="http://tokend") as http:
        as_json = http.get("/v1/tokens/alice")
        as_text = http.get("/v1/tokens/alice", headers={"Accept": "text/plain"})
        accounts = http.get("/v1/accounts")
    assert as_json.status_code == 200 and as_json.json()["access_token"]
    assert as_text.status_code == 200 and as_text.text
    assert accounts.status_code == 200
    tokens |= {as_json.json()["access_token"], as_text.text}

    # Stopping with a connection open (and another mid-request) closes them cleanly.
    idle = RawClient(sock)
    idle.send(b"GET /v1/tokens/alice HTTP/1.1\r\n")
    assert tokend.stop() == 0
    assert not sock.exists()
    assert wait_until(client.is_closed_by_peer, 5, what="the connection closed")
    assert wait_until(idle.is_closed_by_peer, 5, what="the connection closed")
    client.close()
    idle.close()
    # Serving tokens leaves no trace of them in the log.
    log = tokend.log_text()
    assert '"socket_listening"' in log
    for token in tokens:
        assert token not in log


def test_min_valid_waits_for_a_refresh_and_503_when_it_cannot_be_had(
    fresh_idp: IdP, tokend_factory: Any, short_dir: Path
) -> None:
    fresh_idp.configure(access_token_ttl=60)
    sock = short_dir / "tokend.sock"
    config = socket_config(fresh_idp, sock, force_refresh_interval=0)
    add_account(config, fresh_idp, "alice")
    tokend = start(tokend_factory(config), sock)
    first = wait_for_token(sock, "alice")
    client = RawClient(sock)

    # Valid long enough: served at once, nothing asked of the IdP.
    since = time.time()
    served = client.request("GET", "/v1/tokens/alice?min_valid=30")
    assert served.status == 200
    assert served.json()["access_token"] == first["access_token"]
    assert refreshes_since(fresh_idp, since) == []

    # Not valid 59.5 more seconds: the request waits for a refresh, which the IdP sees.
    # expires_at is whole seconds, rounded down: the token lives up to 1 s longer.
    wait_until(lambda: first["expires_at"] + 1 - time.time() < 59.5, what="the token to age")
    since = time.time()
    fresh = client.request("GET", "/v1/tokens/alice?min_valid=59.5")
    assert fresh.status == 200
    assert fresh.json()["access_token"] != first["access_token"]
    assert fresh.json()["expires_in"] >= 59
    assert len(refreshes_since(fresh_idp, since)) == 1

    # Longer than the IdP's tokens live: one refresh is tried, then 503 (no token).
    since = time.time()
    impossible = client.request("GET", "/v1/tokens/alice?min_valid=120")
    assert impossible.status == 503
    body = impossible.json()
    assert body["error"] == "token_unavailable" and body["state"] == "valid"
    assert "access_token" not in body
    assert len(refreshes_since(fresh_idp, since)) == 1

    # The IdP failing: 503 with the state and the error, and the old token withheld.
    fresh_idp.fault("status_500")
    failing = client.request("GET", "/v1/tokens/alice?min_valid=120")
    assert failing.status == 503
    assert failing.json()["state"] == "retrying"
    assert "500" in failing.json()["last_error"]
    assert fresh.json()["access_token"].encode() not in failing.body

    # A client that gives up while its request waits: the wait ends, nothing breaks.
    fresh_idp.fault("hang")
    waiting = RawClient(sock)
    waiting.send(encode_request("GET", "/v1/tokens/alice?min_valid=120"))
    fresh_idp.wait_for_log(lambda log: any(e["fault"] == "hang" for e in log))
    waiting.close()
    assert client.request("GET", "/healthz").status == 200
    fresh_idp.fault("none")
    assert client.request("GET", "/v1/tokens/alice").status == 200
    assert tokend.events("request_failed") == []
    client.close()


def test_forced_refresh_returns_a_new_token_and_is_rate_limited(
    fresh_idp: IdP, tokend_factory: Any, short_dir: Path
) -> None:
    fresh_idp.configure(access_token_ttl=60)
    sock = short_dir / "tokend.sock"
    config = socket_config(fresh_idp, sock, force_refresh_interval="30s")
    add_account(config, fresh_idp, "alice")
    add_account(config, fresh_idp, "bob")
    start(tokend_factory(config), sock)
    old = wait_for_token(sock, "alice")
    wait_for_token(sock, "bob")
    client = RawClient(sock)

    assert client.request("GET", "/v1/tokens/alice/refresh").status == 405
    since = time.time()
    refreshed = client.request("POST", "/v1/tokens/alice/refresh")
    assert refreshed.status == 200
    new = refreshed.json()
    assert new["access_token"] != old["access_token"]
    assert len(refreshes_since(fresh_idp, since)) == 1

    limited = client.request("POST", "/v1/tokens/alice/refresh")
    assert limited.status == 429
    assert 1 <= int(limited.headers["retry-after"]) <= 30
    assert limited.json() == {
        "error": "rate_limited",
        "retry_after": int(limited.headers["retry-after"]),
    }
    assert client.request("GET", "/v1/tokens/alice").json()["access_token"] == new["access_token"]
    assert len(refreshes_since(fresh_idp, since)) == 1

    # Applications that get a 401 at the same moment share one refresh.
    fresh_idp.fault("delay", delay_ms=600)
    since = time.time()

    def force(_: int) -> Response:
        with contextlib.closing(RawClient(sock)) as own:
            return own.request("POST", "/v1/tokens/bob/refresh", {"Accept": "text/plain"})

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(force, range(8)))
    assert {a.status for a in answers} == {200}
    assert len({a.body for a in answers}) == 1
    assert len(refreshes_since(fresh_idp, since)) == 1
    client.close()


def test_accounts_show_state_and_never_a_token(
    fresh_idp: IdP, tokend_factory: Any, short_dir: Path
) -> None:
    sock = short_dir / "tokend.sock"
    config = socket_config(fresh_idp, sock)
    seeds = [
        add_account(config, fresh_idp, "alice"),
        add_dead_account(config, "carol", required=False),
    ]
    tokend = start(tokend_factory(config), sock)
    token = wait_for_token(sock, "alice")["access_token"]
    tokend.wait_event("refresh", account="carol", outcome="account_permanent")

    client = RawClient(sock)
    response = client.request("GET", "/v1/accounts")
    assert response.status == 200
    accounts = response.json()["accounts"]
    assert [a["name"] for a in accounts] == ["alice", "carol"]
    alice, carol = accounts
    assert set(alice) == {
        "name",
        "provider",
        "state",
        "required",
        "token_valid",
        "expires_at",
        "version",
        "last_refresh_at",
        "next_refresh_at",
        "last_error",
        "publish_error",
        "reauth_deadline",
        "reauth_warning",
    }
    assert alice["publish_error"] is None
    # Nothing is known of the refresh token's lifetime at this provider.
    assert alice["reauth_deadline"] is None and alice["reauth_warning"] is False
    assert alice["provider"] == "idp" and alice["state"] in {"valid", "queued", "refreshing"}
    assert alice["token_valid"] is True and alice["required"] is True
    assert alice["next_refresh_at"] >= int(time.time()) - 1
    assert alice["expires_at"] >= alice["next_refresh_at"]
    assert carol["state"] == "needs_reauth" and carol["token_valid"] is False
    assert carol["required"] is False and carol["last_error"]
    assert carol["next_refresh_at"] is None and carol["expires_at"] is None
    for secret in [token, *seeds]:
        assert secret.encode() not in response.body
    # needs_reauth: no token, and no refresh forced either.
    assert client.request("POST", "/v1/tokens/carol/refresh").json()["state"] == "needs_reauth"
    client.close()


def test_errors_are_json_with_the_right_status(
    fresh_idp: IdP, tokend_factory: Any, short_dir: Path
) -> None:
    sock = short_dir / "tokend.sock"
    config = socket_config(fresh_idp, sock, max_header_bytes=2048)
    add_account(config, fresh_idp, "alice")
    start(tokend_factory(config), sock)
    wait_for_token(sock, "alice")

    client = RawClient(sock)
    # Answers that keep the connection open.
    expectations: list[tuple[str, str, int, dict[str, Any]]] = [
        ("GET", "/v1/tokens/nobody", 404, {"error": "unknown_account"}),
        ("POST", "/v1/tokens/nobody/refresh", 404, {"error": "unknown_account"}),
        ("GET", "/nope", 404, {"error": "not_found"}),
        ("GET", "/v1/tokens/", 404, {"error": "not_found"}),
        ("GET", "/v1/tokens/alice/extra", 404, {"error": "not_found"}),
        ("GET", "/v1/tokens/alice?min_valid=abc", 400, {"error": "bad_request"}),
        ("GET", "/v1/tokens/alice?min_valid=-1", 400, {"error": "bad_request"}),
        ("GET", "/v1/tokens/alice?min-valid=5", 400, {"error": "bad_request"}),
        ("POST", "/v1/tokens/alice", 405, {"error": "method_not_allowed"}),
        ("DELETE", "/healthz", 405, {"error": "method_not_allowed"}),
        ("HEAD", "/v1/accounts", 405, {"error": "method_not_allowed"}),
    ]
    for method, target, status, expected in expectations:
        response = client.request(method, target)
        assert response.status == status, (method, target)
        body = response.json()
        assert {k: body[k] for k in expected} == expected, (method, target, body)
        assert response.headers["content-type"] == "application/json"
        if status == 405:
            assert response.headers["allow"] in {"GET", "POST"}
    assert client.request("POST", "/v1/tokens/alice").headers["allow"] == "GET"
    assert client.request("GET", "/v1/tokens/alice/refresh").headers["allow"] == "POST"
    assert client.request("GET", "/v1/tokens/alice").status == 200
    client.close()

    # Answers after which the connection is closed: what follows cannot be trusted.
    closing: list[tuple[bytes, int, str]] = [
        (
            b"GET /v1/tokens/alice HTTP/1.1\r\nX-Big: " + b"a" * 4096 + b"\r\n\r\n",
            431,
            "headers_too_large",
        ),
        (b"GET /v1/tokens/alice HTTP/1.1\r\nX-Big: " + b"a" * 4096, 431, "headers_too_large"),
        (
            b"POST /v1/tokens/alice/refresh HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
            413,
            "body_not_allowed",
        ),
        (
            b"POST /v1/tokens/alice/refresh HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            413,
            "body_not_allowed",
        ),
        (
            b"PUT /v1/accounts/alice/seed HTTP/1.1\r\nContent-Length: 16385\r\n\r\n",
            413,
            "body_too_large",
        ),
        (
            b"PUT /v1/accounts/alice/seed HTTP/1.1\r\nContent-Length: 2\r\n"
            b"Content-Length: 2\r\n\r\n{}",
            400,
            "bad_request",
        ),
        (b"GET /v1/tokens/alice HTTP/1.1\r\nBad Header: x\r\n\r\n", 400, "bad_request"),
        (b"GET /v1/tokens/alice HTTP/1.1\r\n folded: x\r\n\r\n", 400, "bad_request"),
        (b"GET http://x/v1/tokens/alice HTTP/1.1\r\n\r\n", 400, "bad_request"),
        (b"GET /v1/tokens/alice HTTP/2.0\r\n\r\n", 400, "bad_request"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400, "bad_request"),
    ]
    for raw, status, error in closing:
        client = RawClient(sock)
        client.send(raw)
        response = client.read_response()
        assert (response.status, response.json()["error"]) == (status, error), raw[:40]
        assert response.headers["connection"] == "close"
        assert wait_until(client.is_closed_by_peer, 5, what="the connection to close")
        client.close()

    # HTTP/1.0 without keep-alive, and Connection: close, end after one answer.
    for raw in (
        b"GET /healthz HTTP/1.0\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n",
    ):
        client = RawClient(sock)
        client.send(raw)
        assert client.read_response().status == 200
        assert wait_until(client.is_closed_by_peer, 5, what="the connection to close")
        client.close()


def test_misbehaving_clients_do_not_slow_down_a_normal_one(
    fresh_idp: IdP, tokend_factory: Any, short_dir: Path
) -> None:
    sock = short_dir / "tokend.sock"
    config = socket_config(
        fresh_idp, sock, max_connections=40, idle_timeout="2s", max_header_bytes=4096
    )
    add_account(config, fresh_idp, "alice")
    start(tokend_factory(config), sock)
    wait_for_token(sock, "alice")
    normal = RawClient(sock)
    assert normal.request("GET", "/v1/tokens/alice").status == 200

    stop = threading.Event()
    # Idle connections up to the limit, minus a few for the others below.
    idle = [RawClient(sock, timeout=0.05) for _ in range(30)]
    # Slow clients: half a request head, then a byte now and then.
    slow = [RawClient(sock, timeout=0.05) for _ in range(4)]
    slow_started = time.monotonic()
    for client in slow:
        client.send(b"GET /v1/tokens/alice HTTP/1.1\r\nHost: tokend\r\n")

    def trickle() -> None:
        while not stop.wait(0.2):
            for client in slow:
                with contextlib.suppress(OSError):
                    client.send(b"X")

    def oversized() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError), contextlib.closing(RawClient(sock)) as big:
                big.send(b"GET /v1/tokens/alice HTTP/1.1\r\nX-Big: " + b"a" * 65536)
                big.read_response()

    threads = [
        threading.Thread(target=trickle),
        *(threading.Thread(target=oversized) for _ in range(2)),
    ]
    for thread in threads:
        thread.start()
    try:
        latencies = []
        for _ in range(300):
            started = time.perf_counter()
            assert normal.request("GET", "/v1/tokens/alice").status == 200
            latencies.append(time.perf_counter() - started)
        p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
        print(f"\nnormal client under abuse: p50 {p50 * 1e6:.0f} us, p99 {p99 * 1e6:.0f} us")
        assert p99 < 0.2

        # The slow ones are dropped at the head-read deadline, however they trickle.
        for client in slow:
            assert wait_until(
                client.is_closed_by_peer, 6, interval=0.05, what="a slow client dropped"
            )
        assert time.monotonic() - slow_started < 2 + 3
        assert b"408" in slow[0].buffer
    finally:
        stop.set()
        for thread in threads:
            thread.join()

    # Beyond max_connections a new connection is refused at once, and the others live on.
    crowd = [RawClient(sock, timeout=0.05) for _ in range(40)]
    extra = RawClient(sock)
    refused = extra.read_response()
    assert refused.status == 503 and refused.json() == {"error": "overloaded"}
    # Idle connections are closed after idle_timeout: the limit frees itself.
    normal.sock.settimeout(0.1)
    assert wait_until(normal.is_closed_by_peer, 6, what="an idle connection dropped")
    assert wait_until(lambda: crowd[-1].is_closed_by_peer(), 6, what="the crowd dropped")
    for client in [*idle, *crowd, extra, normal]:
        client.close()

    def healthy() -> bool:
        with contextlib.closing(RawClient(sock)) as client:
            return client.request("GET", "/healthz").status == 200

    assert wait_until(healthy, 10, what="room for a new connection")


# -- the socket file ------------------------------------------------------------------------------


def test_socket_file_mode_stale_file_second_instance_and_removal(
    fresh_idp: IdP, tokend_factory: Any, short_dir: Path
) -> None:
    sock = short_dir / "run" / "tokend.sock"
    sock.parent.mkdir()
    # A crashed tokend's socket file: bound, never unlinked, nobody listening.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock))
    stale.close()
    assert stat.S_ISSOCK(os.lstat(sock).st_mode)

    config = socket_config(fresh_idp, sock, socket_mode="0600")
    add_account(config, fresh_idp, "alice")
    first = start(tokend_factory(config), sock)
    first.wait_event("stale_socket_removed")
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    wait_for_token(sock, "alice")

    # A second tokend on the same socket refuses to start, and says why.
    second = tokend_factory(config, name="second")
    second.start()
    assert second.proc is not None
    assert second.proc.wait(30) != 0
    assert "is in use" in second.log_text()
    # One JSON line saying so, not a traceback.
    assert second.events("cannot_serve") and "Traceback" not in second.log_text()
    assert wait_for_token(sock, "alice")

    # Not a socket: never removed.
    other = short_dir / "not-a-socket"
    other.write_text("keep me")
    blocked = tokend_factory(socket_config(fresh_idp, other), name="blocked")
    blocked.start()
    assert blocked.proc is not None and blocked.proc.wait(30) != 0
    assert "exists and is not a socket" in blocked.log_text()
    assert other.read_text() == "keep me"

    assert first.stop() == 0
    assert not sock.exists()


def test_parent_directory_created_and_long_paths_refused(
    fresh_idp: IdP, tokend_factory: Any, short_dir: Path
) -> None:
    sock = short_dir / "a" / "b" / "tokend.sock"
    config = socket_config(fresh_idp, sock)
    add_account(config, fresh_idp, "alice")
    tokend = start(tokend_factory(config), sock)
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660
    assert tokend.stop() == 0

    too_long = short_dir / ("x" * 120) / "tokend.sock"
    refused = tokend_factory(socket_config(fresh_idp, too_long), name="long")
    refused.start()
    assert refused.proc is not None and refused.proc.wait(30) != 0
    assert "limited to 107" in refused.log_text()


# -- readiness, probes, metrics over TCP ----------------------------------------------------------


def test_readiness_follows_the_first_token_and_tcp_serves_probes_only(
    fresh_idp: IdP, tokend_factory: Any, short_dir: Path
) -> None:
    fresh_idp.fault("status_500")
    sock = short_dir / "tokend.sock"
    config = socket_config(fresh_idp, sock, metrics_listen="127.0.0.1:0")
    # Readiness is what is tested, not the breaker: its 30 s cooldown, opened by the
    # failures a slow machine lets pile up, would outlast the wait for readiness.
    config["providers"]["idp"]["breaker"] = {"failure_threshold": 1000}
    seed = add_account(config, fresh_idp, "alice")
    add_account(config, fresh_idp, "optional", required=False)
    tokend = start(tokend_factory(config), sock)
    port = tokend.wait_event("metrics_listening")[0]["port"]
    tcp = httpx.Client(base_url=f"http://127.0.0.1:{port}")
    client = RawClient(sock)

    tokend.wait_event("refresh", account="alice", outcome="transient")
    not_ready = client.request("GET", "/readyz")
    assert not_ready.status == 503
    assert not_ready.json() == {"ready": False, "not_ready": ["alice"]}
    assert tcp.get("/readyz").status_code == 503
    assert client.request("GET", "/healthz").status == 200
    assert tcp.get("/healthz").json() == {"status": "ok"}
    unavailable = client.request("GET", "/v1/tokens/alice")
    assert unavailable.status == 503
    assert unavailable.json()["error"] == "token_unavailable"
    assert unavailable.json()["state"] in {"pending", "queued", "retrying", "refreshing"}

    fresh_idp.fault("none")
    wait_until(lambda: client.request("GET", "/readyz").status == 200, 20, what="ready")
    assert client.request("GET", "/readyz").json() == {"ready": True}
    assert tcp.get("/readyz").json() == {"ready": True}

    # No token endpoint on TCP, ever.
    for path in ("/v1/tokens/alice", "/v1/accounts"):
        assert tcp.get(path).status_code == 404
    assert tcp.post("/v1/tokens/alice/refresh").status_code == 404
    scrape = tcp.get("/metrics", headers={"Accept-Encoding": "gzip"})
    assert scrape.status_code == 200
    assert scrape.headers["content-type"].startswith("text/plain")
    assert seed not in scrape.text
    # Requests on the socket are counted by route name and status, never by path.
    metrics = client.request("GET", "/metrics").body.decode()
    assert 'endpoint="readyz"' in metrics and 'code="503"' in metrics
    assert "alice" not in metrics.split("tokend_socket_requests_total", 1)[-1].split("\n#")[0]
    tcp.close()
    client.close()
    assert tokend.stop() == 0


# -- who may read a token ------------------------------------------------------------------------


def request_as(uid: int, gid: int, sock: Path, raw: bytes) -> bytes:
    """Send ``raw`` over a new connection from a forked child running as uid/gid, and
    return everything tokend answered (the request must ask to close)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop privileges, ask, report, exit without cleanup
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(10)
                conn.connect(str(sock))
                conn.sendall(raw)
                answer = b""
                while chunk := conn.recv(65536):
                    answer += chunk
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


def status_and_body(answer: bytes) -> tuple[int, bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 "), answer[:80]
    return int(head.split(b" ")[1]), body


def test_peer_credentials_decide_who_reads_a_token(
    fresh_idp: IdP, tokend_factory: Any, short_dir: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to act as other uids")
    short_dir.chmod(0o755)
    sock = short_dir / "tokend.sock"
    config = socket_config(fresh_idp, sock, socket_mode="0666")
    add_account(config, fresh_idp, "alice", allow={"uids": [65534]})
    add_account(config, fresh_idp, "bob", allow={"gids": [4242]})
    add_account(config, fresh_idp, "carol")
    start(tokend_factory(config), sock)

    def all_valid() -> bool:
        with contextlib.closing(RawClient(sock)) as client:
            accounts = client.request("GET", "/v1/accounts").json()["accounts"]
        return all(a["token_valid"] for a in accounts)

    wait_until(all_valid, what="three tokens")

    def get(
        uid: int, gid: int, account: str, method: str = "GET", suffix: str = ""
    ) -> tuple[int, bytes]:
        raw = encode_request(
            method, f"/v1/tokens/{account}{suffix}", {"Accept": "text/plain", "Connection": "close"}
        )
        return status_and_body(request_as(uid, gid, sock, raw))

    # uid 0 is not special: root is not in alice's list.
    assert get(0, 0, "alice") == (403, b'{"error":"forbidden"}')
    assert get(0, 0, "alice", "POST", "/refresh") == (403, b'{"error":"forbidden"}')
    status, token = get(65534, 65534, "alice")
    assert status == 200 and len(token) > 20
    assert get(65534, 65534, "bob") == (403, b'{"error":"forbidden"}')
    assert get(65533, 4242, "bob")[0] == 200
    assert get(65533, 4242, "alice")[0] == 403
    # No allow list: whoever can connect (the socket's mode decides that).
    assert get(65533, 65533, "carol")[0] == 200
    # The rest of the API is open to anyone who can connect.
    accounts = status_and_body(
        request_as(
            65533, 65533, sock, encode_request("GET", "/v1/accounts", {"Connection": "close"})
        )
    )
    assert accounts[0] == 200 and token not in accounts[1]


# -- the parser against h11 ----------------------------------------------------------------------

_HEADER_NAMES = st.sampled_from(
    ["Host", "Accept", "accept-encoding", "X-Thing", "Connection", "Content-Length", "User-Agent"]
)
_HEADER_VALUES = st.text(
    alphabet=st.characters(min_codepoint=0, max_codepoint=0x7F), max_size=20
).map(lambda s: s.encode("latin-1"))


@settings(max_examples=300, deadline=None)
@given(
    method=st.sampled_from([b"GET", b"POST", b"DELETE", b"G ET", b""]),
    target=st.sampled_from([b"/v1/tokens/alice", b"/healthz?x=1", b"/a b", b"*", b"/\x7f"]),
    version=st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.2", b"http/1.1"]),
    headers=st.lists(st.tuples(_HEADER_NAMES, _HEADER_VALUES), max_size=4),
)
def test_parser_accepts_only_what_h11_accepts(
    method: bytes, target: bytes, version: bytes, headers: list[tuple[str, bytes]]
) -> None:
    """Whatever the parser accepts, h11 parses the same way (h11 is the reference;
    the parser may be stricter, never looser)."""
    head = b"\r\n".join(
        [method + b" " + target + b" " + version, b"Host: tokend"]
        + [name.encode() + b": " + value for name, value in headers]
    )
    try:
        ours = parse_head(head)
    except HttpError:
        return
    reference = h11.Connection(h11.SERVER)
    reference.receive_data(head + b"\r\n\r\n")
    event = reference.next_event()
    assert isinstance(event, h11.Request), event
    assert event.method == ours.method
    path, _, query = event.target.partition(b"?")
    assert (path, query or None) == (ours.path, ours.query or None)
    reference_headers = dict(event.headers)
    if b"accept" in reference_headers:
        assert ours.accept == reference_headers[b"accept"]


# -- latency -------------------------------------------------------------------------------------

_ECHO_SERVER = """
import asyncio, sys
class Echo(asyncio.Protocol):
    def connection_made(self, transport): self.transport = transport
    def data_received(self, data): self.transport.write(data)
async def main():
    server = await asyncio.get_running_loop().create_unix_server(Echo, sys.argv[1])
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


def keep_alive_latencies(
    sock: Path, request: bytes, n: int, read: Callable[[RawClient], None]
) -> list[float]:
    client = RawClient(sock)
    samples = []
    try:
        for _ in range(n):
            started = time.perf_counter()
            client.send(request)
            read(client)
            samples.append(time.perf_counter() - started)
    finally:
        client.close()
    return samples


def read_http_lean(client: RawClient) -> None:
    """Read one response as cheaply as a client can (tokend's exact header casing), so
    that the client's own parsing weighs as little as possible in the numbers."""
    buffer = client.buffer
    while True:
        end = buffer.find(b"\r\n\r\n")
        if end >= 0:
            start = buffer.find(b"Content-Length: ", 0, end) + 16
            length = int(buffer[start : buffer.find(b"\r", start)])
            if len(buffer) >= end + 4 + length:
                break
        buffer += client.sock.recv(65536)
    assert buffer.startswith(b"HTTP/1.1 200 ")
    client.buffer = buffer[end + 4 + length :]


def test_report_keep_alive_latency(fresh_idp: IdP, tokend_factory: Any, short_dir: Path) -> None:
    """Prints p50/p99 of 2000 keep-alive GET /v1/tokens/x on one raw connection, next
    to a plain asyncio echo server measured the same way (informational only)."""
    # Long-lived tokens: no refresh runs while the numbers are taken.
    fresh_idp.configure(access_token_ttl=3600)
    sock = short_dir / "tokend.sock"
    config = socket_config(fresh_idp, sock)
    config["log"]["level"] = "info"
    add_account(config, fresh_idp, "x")
    start(tokend_factory(config), sock)
    wait_for_token(sock, "x")
    request = encode_request("GET", "/v1/tokens/x")

    echo_sock = short_dir / "echo.sock"
    echo = subprocess.Popen(
        [sys.executable, "-c", _ECHO_SERVER, str(echo_sock)], stdout=subprocess.PIPE, text=True
    )

    def read_echo(client: RawClient) -> None:
        while len(client.buffer) < len(request):
            client.buffer += client.sock.recv(65536)
        client.buffer = client.buffer[len(request) :]

    try:
        assert echo.stdout is not None and echo.stdout.readline().strip() == "ready"
        # Warm both up, then alternate so that both see the same machine load.
        keep_alive_latencies(sock, request, 300, read_http_lean)
        keep_alive_latencies(echo_sock, request, 300, read_echo)
        ours: list[float] = []
        baseline: list[float] = []
        for _ in range(4):
            ours += keep_alive_latencies(sock, request, 500, read_http_lean)
            baseline += keep_alive_latencies(echo_sock, request, 500, read_echo)
    finally:
        echo.send_signal(signal.SIGTERM)
        echo.wait(10)
    p50, p99 = percentile(ours, 0.5), percentile(ours, 0.99)
    e50, e99 = percentile(baseline, 0.5), percentile(baseline, 0.99)
    print(
        f"\nkeep-alive GET /v1/tokens/x x2000: p50 {p50 * 1e6:.1f} us, p99 {p99 * 1e6:.1f} us,"
        f" mean {statistics.fmean(ours) * 1e6:.1f} us"
        f"\nasyncio echo server, same client:  p50 {e50 * 1e6:.1f} us, p99 {e99 * 1e6:.1f} us"
        f"\nratio p50 {p50 / e50:.2f}x"
    )


def test_live_metrics_parse_and_carry_the_documented_names(
    fresh_idp: IdP, tokend_factory: Any, short_dir: Path
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    sock = short_dir / "m.sock"
    config = socket_config(fresh_idp, sock)
    seed = add_account(config, fresh_idp, "alice")
    tokend = tokend_factory(config).start()
    wait_until(sock.exists, what="the socket")
    token = wait_for_token(sock, "alice")["access_token"]
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), timeout=10) as client:
        body = client.get("http://tokend/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(body)}
    expected = {
        "tokend_refresh": "counter",
        "tokend_refresh_duration_seconds": "histogram",
        "tokend_accounts": "gauge",
        "tokend_token_min_remaining_seconds": "gauge",
        "tokend_token_remaining_seconds": "histogram",
        "tokend_circuit_state": "gauge",
        "tokend_store_commit_duration_seconds": "histogram",
        "tokend_socket_requests": "counter",
        "tokend_build_info": "gauge",
    }
    for name, kind in expected.items():
        assert name in families and families[name].type == kind, name
    success = [
        s
        for s in families["tokend_refresh"].samples
        if s.labels == {"provider": "idp", "outcome": "success"} and s.name.endswith("_total")
    ]
    assert success and success[0].value >= 1
    valid = [s for s in families["tokend_accounts"].samples if s.labels.get("state") == "valid"]
    assert valid and valid[0].value == 1
    # Bounded cardinality: no account name, and never a secret.
    assert "alice" not in body and token not in body and seed not in body
    assert tokend.stop() == 0
