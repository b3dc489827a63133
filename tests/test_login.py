"""tokend login: signing in once against the real test IdP, with its sign-in pages
driven over HTTP as a browser would, and the refresh token becoming the account's seed."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio
import httpx
import pytest
import yaml

from tests.conftest import wait_until
from tests.idp_harness import DEVICE_CODE_GRANT, LOGIN_SECRET, IdP, sign_in
from tokend.config import ProviderConfig
from tokend.oauth import ProviderClient, TokenResponse
from tokend.oauth._authorize import (
    AuthorizationError,
    PollAgain,
    authorization_request,
    code_challenge_s256,
    code_from_redirect,
    device_poll_step,
    parse_device_authorization,
)
from tokend.oauth._http import RawResponse
from tokend.oauth._outcome import FailureKind, TokenFailure
from tokend.revoke import revocation_problem

REPO = Path(__file__).resolve().parent.parent


def login_config(idp: IdP, **account: Any) -> dict[str, Any]:
    return {
        "state": {"path": "./state/tokend.db"},
        "serve": {"socket": None, "token_dir": "./tokens", "metrics_listen": None},
        "providers": {
            "idp": {
                "issuer": idp.issuer,
                "client_id": "login-client",
                "client_secret": LOGIN_SECRET,
                "timeout": "5s",
            }
        },
        "accounts": {"alice": {"provider": "idp", **account}},
    }


class Login:
    """`tokend login` running as a subprocess, its stderr read line by line."""

    def __init__(self, workdir: Path, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "BROWSER")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tokend", "login", "alice", "-c", "config.yaml", *args],
            cwd=workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**env, "PYTHONUNBUFFERED": "1"},
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for(self, pattern: str) -> re.Match[str]:
        def found() -> re.Match[str] | None:
            assert self.proc.poll() is None or self.lines, "tokend login exited"
            return re.search(pattern, "".join(self.lines))

        return wait_until(found, 20, what=f"{pattern!r} in {self.lines}")

    def finish(self) -> tuple[int, str]:
        code = self.proc.wait(30)
        self._reader.join(5)
        return code, "".join(self.lines)


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path


def write_config(workdir: Path, config: dict[str, Any]) -> None:
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def stored_refresh_token(workdir: Path, account: str = "alice") -> str | None:
    with sqlite3.connect(workdir / "state" / "tokend.db") as db:
        row = db.execute(
            "SELECT refresh_token FROM accounts WHERE account = ?", (account,)
        ).fetchone()
    return row[0] if row else None


def tokend_command(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tokend", *args, "-c", "config.yaml"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=60,
    )


def run_once(workdir: Path) -> subprocess.CompletedProcess[str]:
    return tokend_command(workdir, "run", "--once")


# -- end to end: an empty account to a running one -------------------------------------------


def test_browser_login_from_an_account_without_a_seed(fresh_idp: IdP, workdir: Path) -> None:
    config = login_config(fresh_idp)
    config["providers"]["idp"]["authorize_params"] = {"prompt": "consent"}
    write_config(workdir, config)
    # Before signing in, the account cannot get a token.
    assert run_once(workdir).returncode == 1

    started = time.monotonic()
    login = Login(workdir, "--no-browser")
    url = login.wait_for(r"(http://127\.0\.0\.1:\d+/auth\?\S+)").group(1)
    query = parse_qs(urlsplit(url).query)
    assert query["code_challenge_method"] == ["S256"]
    assert query["response_type"] == ["code"]
    assert query["scope"] == ["openid offline_access"]
    assert query["prompt"] == ["consent"]
    redirect_uri = query["redirect_uri"][0]
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/callback", redirect_uri)

    page = sign_in(url)
    assert page.status_code == 200
    assert "Signed in" in page.text
    code, output = login.finish()
    elapsed = time.monotonic() - started
    assert code == 0, output
    assert "stored the new refresh token" in output

    seed = stored_refresh_token(workdir)
    assert seed
    assert seed not in output
    # The code was redeemed with the client's credentials and PKCE (the IdP checks the
    # verifier against the challenge; a wrong one is invalid_grant).
    grants = [e["grant_type"] for e in fresh_idp.log()]
    assert grants == ["authorization_code"]

    result = run_once(workdir)
    assert result.returncode == 0, result.stderr
    assert seed not in result.stderr
    print(f"browser login: {elapsed:.2f} s")


def test_device_login_rewrites_the_seed_file(fresh_idp: IdP, workdir: Path) -> None:
    fresh_idp.configure(device_interval=1)
    seed_file = workdir / "alice.token"
    seed_file.write_text("a-dead-refresh-token\n")
    seed_file.chmod(0o640)
    write_config(workdir, login_config(fresh_idp, refresh_token_file="alice.token"))

    started = time.monotonic()
    login = Login(workdir, "--device")
    match = login.wait_for(r"open (http://\S+) and enter the code (\S+)")
    page = sign_in(match.group(1), user_code=match.group(2))
    assert page.status_code == 200
    code, output = login.finish()
    elapsed = time.monotonic() - started
    assert code == 0, output

    seed = seed_file.read_text().strip()
    assert seed != "a-dead-refresh-token"
    assert stat.S_IMODE(seed_file.stat().st_mode) == 0o600
    assert seed not in output
    assert stored_refresh_token(workdir) == seed
    polls = [e for e in fresh_idp.log() if e["grant_type"].endswith(":device_code")]
    assert polls[-1]["status"] == 200

    # The file and the store agree: the daemon starts from the new chain.
    result = run_once(workdir)
    assert result.returncode == 0, result.stderr
    assert stored_refresh_token(workdir) != seed  # rotated by the refresh
    print(f"device login: {elapsed:.2f} s, {len(polls)} polls")


def test_login_refuses_unknown_accounts_and_other_grants(fresh_idp: IdP, workdir: Path) -> None:
    config = login_config(fresh_idp)
    config["accounts"]["svc"] = {"provider": "idp", "grant": "client_credentials"}
    write_config(workdir, config)
    for account, needle in (("nobody", "no account 'nobody'"), ("svc", "needs no sign-in")):
        result = subprocess.run(
            [sys.executable, "-m", "tokend", "login", account, "-c", "config.yaml"],
            cwd=workdir,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 2
        assert needle in result.stderr


# -- the device grant's polling, against the real IdP with faults -------------------------------


def provider_config(idp: IdP) -> ProviderConfig:
    return ProviderConfig.model_validate(
        {"issuer": idp.issuer, "client_id": "login-client", "client_secret": LOGIN_SECRET}
    )


def test_device_polling_honours_pending_and_slow_down(fresh_idp: IdP) -> None:
    from tokend.login import device_login

    fresh_idp.configure(device_interval=2)
    waits: list[float] = []
    shown: list[str] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 3:
            # The person finishes signing in after the third wait.
            match = re.search(r"open (\S+) and enter the code (\S+)", shown[0])
            assert match is not None
            await anyio.to_thread.run_sync(
                lambda: sign_in(match.group(1), user_code=match.group(2))
            )

    async def main() -> TokenResponse:
        fresh_idp.fault("oauth_error", error="slow_down", grant_type=DEVICE_CODE_GRANT, count=1)
        async with ProviderClient("idp", provider_config(fresh_idp)) as client:
            return await device_login(
                client, "openid offline_access", show=shown.append, sleep=sleep
            )

    token = anyio.run(main)
    assert token.refresh_token
    # slow_down adds 5 s to this and every later interval (RFC 8628 3.5); a pending
    # answer keeps the interval.
    assert waits == [2, 7, 7]
    log = fresh_idp.log()
    assert [e["fault"] for e in log] == ["oauth_error", None, None]
    assert [e["status"] for e in log] == [400, 400, 200]
    assert log[1]["error"] == "authorization_pending"


@pytest.mark.parametrize(
    ("error", "message"),
    [
        ("expired_token", "the code expired"),
        ("access_denied", "declined"),
    ],
)
def test_device_polling_stops_on_denial_and_expiry(
    fresh_idp: IdP, error: str, message: str
) -> None:
    from tokend.login import device_login

    fresh_idp.configure(device_interval=1)
    fresh_idp.fault(
        "oauth_error", error=error, grant_type="urn:ietf:params:oauth:grant-type:device_code"
    )

    async def no_wait(seconds: float) -> None:
        pass

    async def main() -> None:
        async with ProviderClient("idp", provider_config(fresh_idp)) as client:
            await device_login(client, "openid", show=lambda text: None, sleep=no_wait)

    with pytest.raises(AuthorizationError, match=message):
        anyio.run(main)
    assert len(fresh_idp.log()) == 1


# -- the pieces ------------------------------------------------------------------------------------


def test_pkce_s256_matches_rfc_7636_appendix_b() -> None:
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    assert code_challenge_s256(verifier) == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


def test_authorization_request_and_redirect_checks() -> None:
    request = authorization_request(
        "https://idp.example/authorize?tenant=x",
        client_id="app",
        redirect_uri="http://127.0.0.1:5000/callback",
        scope="openid offline_access",
        extra={"state": "attacker", "access_type": "offline"},
    )
    query = parse_qs(urlsplit(request.url).query)
    assert query["tenant"] == ["x"]
    assert query["access_type"] == ["offline"]
    assert query["state"] == [request.state]
    assert query["code_challenge"] == [code_challenge_s256(request.code_verifier)]
    assert len(request.code_verifier) >= 43
    assert request.code_verifier not in request.url

    state = request.state
    assert code_from_redirect(f"code=abc&state={state}", state) == "abc"
    assert (
        code_from_redirect(
            f"code=abc&state={state}&iss=https://idp.example/", state, "https://idp.example"
        )
        == "abc"
    )
    with pytest.raises(AuthorizationError, match="different state"):
        code_from_redirect("code=abc&state=other", state)
    with pytest.raises(AuthorizationError, match="another issuer"):
        code_from_redirect(
            f"code=abc&state={state}&iss=https://evil.example", state, "https://idp.example"
        )
    with pytest.raises(AuthorizationError, match=r"refused: access_denied: no$"):
        code_from_redirect(f"error=access_denied&error_description=no&state={state}", state)
    with pytest.raises(AuthorizationError, match="no authorization code"):
        code_from_redirect(f"state={state}", state)


def test_device_authorization_response_parsing() -> None:
    body = (
        b'{"device_code":"d","user_code":"ABCD-EFGH","verification_uri":"https://idp.example/device",'
        b'"expires_in":"900","interval":86400}'
    )
    device = parse_device_authorization(200, body)
    assert (device.user_code, device.expires_in, device.interval) == ("ABCD-EFGH", 900, 60)
    defaults = parse_device_authorization(
        200, b'{"device_code":"d","user_code":"U","verification_uri":"https://idp.example/d"}'
    )
    assert (defaults.expires_in, defaults.interval) == (600, 5)
    with pytest.raises(AuthorizationError, match="HTTP 400: unauthorized_client"):
        parse_device_authorization(400, b'{"error":"unauthorized_client"}')
    with pytest.raises(AuthorizationError, match="verification_uri"):
        parse_device_authorization(
            200, b'{"device_code":"d","user_code":"U","verification_uri":"javascript:alert(1)"}'
        )


def test_device_poll_step_backs_off_on_transient_failures() -> None:
    outage = TokenFailure(FailureKind.TRANSIENT, "http_503", status=503)
    assert device_poll_step(outage, 5) == PollAgain(10)
    limited = TokenFailure(FailureKind.RATE_LIMITED, "http_429", retry_after=30)
    assert device_poll_step(limited, 5) == PollAgain(30)
    with pytest.raises(AuthorizationError, match="invalid_client"):
        device_poll_step(TokenFailure(FailureKind.PROVIDER_PERMANENT, "invalid_client"), 5)


# -- tokend revoke -------------------------------------------------------------------------------


def revoke(workdir: Path) -> subprocess.CompletedProcess[str]:
    return tokend_command(workdir, "revoke", "alice")


def test_revoke_ends_the_grant_at_the_idp(fresh_idp: IdP, workdir: Path) -> None:
    write_config(workdir, login_config(fresh_idp, refresh_token=fresh_idp.seed("login-client")))
    assert run_once(workdir).returncode == 0
    held = stored_refresh_token(workdir)
    assert held

    result = revoke(workdir)
    assert result.returncode == 0, result.stderr
    assert "revoked at the provider" in result.stderr
    assert held not in result.stderr + result.stdout
    assert stored_refresh_token(workdir) is None

    # The IdP no longer honours the token tokend held...
    refused = httpx.post(
        fresh_idp.token_endpoint,
        data={"grant_type": "refresh_token", "refresh_token": held},
        auth=("login-client", LOGIN_SECRET),
    )
    assert refused.status_code == 400
    assert refused.json()["error"] == "invalid_grant"
    # ...and tokend does not fall back to the configured seed.
    assert run_once(workdir).returncode == 1
    assert stored_refresh_token(workdir) is None


def test_revoke_while_the_daemon_runs_ends_the_grant_there(
    fresh_idp: IdP, tokend_factory: Any
) -> None:
    from tests.test_socket_api import RawClient

    short = Path(tempfile.mkdtemp(prefix="td"))
    try:
        sock = short / "tokend.sock"
        config = login_config(fresh_idp, refresh_token=fresh_idp.seed("login-client"))
        config["serve"]["socket"] = str(sock)
        tokend = tokend_factory(config).start()
        tokend.wait_event("refresh", account="alice", outcome="success")
        held = stored_refresh_token(tokend.workdir)
        assert held
        fresh_idp.clear_log()

        result = revoke(tokend.workdir)
        assert result.returncode == 0, result.stderr
        assert "revoked at the provider" in result.stderr
        assert held not in result.stderr + result.stdout + tokend.log_text()
        revoked = tokend.wait_event("account_revoked", account="alice")
        assert revoked[0]["source"] == "revoke"

        # The daemon hands out nothing, its files show the expired version, and the
        # account says what to do.
        with contextlib.closing(RawClient(sock)) as client:
            assert client.request("GET", "/v1/tokens/alice").status == 503
            accounts = client.request("GET", "/v1/accounts").json()["accounts"]
            assert accounts[0]["state"] == "needs_reauth"
            assert "tokend login" in accounts[0]["last_error"]
            assert client.request("GET", "/v1/accounts/alice/revoke").status == 405
            assert client.request("POST", "/v1/accounts/nobody/revoke").status == 404
        shown = json.loads((tokend.workdir / "tokens" / "alice" / "token.json").read_text())
        assert (shown["access_token"], shown["expired"]) == (None, True)
        assert stored_refresh_token(tokend.workdir) is None
        # The IdP saw the revocation (two: refresh then access token) and no refresh.
        assert [e for e in fresh_idp.log() if e["grant_type"] == "refresh_token"] == []
        refused = httpx.post(
            fresh_idp.token_endpoint,
            data={"grant_type": "refresh_token", "refresh_token": held},
            auth=("login-client", LOGIN_SECRET),
        )
        assert refused.json()["error"] == "invalid_grant"

        # A restart keeps it waiting for a sign-in, and a second revoke has nothing to do.
        assert tokend.stop() == 0
        refreshes = len(tokend.events("refresh", account="alice"))
        tokend.start()
        tokend.wait_event("socket_listening", count=2)
        again = revoke(tokend.workdir)
        assert again.returncode == 0, again.stderr
        assert "nothing to revoke" in again.stderr
        assert len(tokend.events("refresh", account="alice")) == refreshes
        assert tokend.stop() == 0
    finally:
        shutil.rmtree(short, ignore_errors=True)


def test_revocation_answers() -> None:
    def answer(status: int, body: bytes) -> RawResponse:
        return RawResponse(status, httpx.Headers(), body, False)

    assert revocation_problem(answer(200, b"")) is None
    assert "unsupported_token_type" in (
        revocation_problem(answer(400, b'{"error":"unsupported_token_type"}')) or ""
    )
    assert revocation_problem(answer(503, b"<html>")) == (
        "the revocation endpoint answered HTTP 503; nothing was changed"
    )


# -- with the daemon running: the seed goes over the socket ------------------------------------


def put_seed(sock: Path, account: str, body: bytes, uid: int | None = None) -> tuple[int, bytes]:
    from tests.test_socket_api import RawClient, encode_request, request_as, status_and_body

    raw = encode_request(
        "PUT",
        f"/v1/accounts/{account}/seed",
        {"Content-Type": "application/json", "Content-Length": str(len(body))},
    )
    if uid is not None:
        closing = raw[:-2] + b"Connection: close\r\n\r\n"
        return status_and_body(request_as(uid, uid, sock, closing + body))
    client = RawClient(sock)
    try:
        client.send(raw[: len(raw) // 2])  # the head in pieces, then the body apart
        client.send(raw[len(raw) // 2 :])
        client.send(body)
        response = client.read_response()
    finally:
        client.close()
    return response.status, response.body


def test_login_hands_the_seed_to_the_running_daemon(
    fresh_idp: IdP, tokend_factory: Any, workdir: Path
) -> None:
    from tests.test_socket_api import RawClient

    short = Path(tempfile.mkdtemp(prefix="td"))
    try:
        sock = short / "tokend.sock"
        config = login_config(fresh_idp, refresh_token_file="alice.token")
        config["serve"]["socket"] = str(sock)
        tokend = tokend_factory(config)
        (tokend.workdir / "alice.token").write_text("a-dead-refresh-token\n")
        tokend.start()
        tokend.wait_event("refresh", account="alice", reason="invalid_grant")

        login = Login(tokend.workdir, "--no-browser")
        url = login.wait_for(r"(http://127\.0\.0\.1:\d+/auth\?\S+)").group(1)
        assert sign_in(url).status_code == 200
        code, output = login.finish()
        assert code == 0, output
        assert "the running tokend took the new refresh token; the account is valid" in output

        seed_file = tokend.workdir / "alice.token"
        seed = seed_file.read_text().strip()
        assert seed != "a-dead-refresh-token"
        assert stat.S_IMODE(seed_file.stat().st_mode) == 0o600
        assert seed not in output and seed not in tokend.log_text()
        client = RawClient(sock)
        accounts = client.request("GET", "/v1/accounts").json()["accounts"]
        assert (accounts[0]["state"], accounts[0]["last_error"]) == ("valid", None)
        assert client.request("GET", "/v1/tokens/alice").status == 200
        client.close()

        # File and store agree: a reload changes nothing, a restart continues the chain.
        tokend.signal(signal.SIGHUP)
        tokend.wait_event("reloaded")
        assert not tokend.events("seed_replaced", account="alice")[1:]
        assert tokend.stop() == 0
        tokend.start()
        tokend.wait_event("refresh", account="alice", outcome="success", count=3)
        assert not tokend.events("seed_changed")

        # Only the daemon's own user (or root) may set a seed; bad requests are refused.
        body = b'{"refresh_token": "x"}'
        if os.geteuid() == 0:
            short.chmod(0o755)
            sock.chmod(0o666)
            assert put_seed(sock, "alice", body, uid=65534) == (403, b'{"error":"forbidden"}')
        assert put_seed(sock, "nobody", body)[0] == 404
        assert put_seed(sock, "alice", b'{"token": 1}')[0] == 400
        assert put_seed(sock, "alice", b"not json")[0] == 400
        with contextlib.closing(RawClient(sock)) as client:
            assert client.request("GET", "/v1/accounts/alice/seed").status == 405
        assert tokend.stop() == 0
    finally:
        shutil.rmtree(short, ignore_errors=True)


def test_removing_an_account_revokes_its_refresh_token_when_asked(
    fresh_idp: IdP, tokend_factory: Any
) -> None:
    config = login_config(fresh_idp, refresh_token=fresh_idp.seed("login-client"))
    config["providers"]["idp"]["revoke_on_remove"] = True
    config["accounts"]["bob"] = {
        "provider": "idp",
        "refresh_token": fresh_idp.seed("login-client"),
        "revoke_on_remove": False,
    }
    tokend = tokend_factory(config).start()
    for name in ("alice", "bob"):
        tokend.wait_event("refresh", account=name, outcome="success")
    held = {name: stored_refresh_token(tokend.workdir, name) for name in ("alice", "bob")}

    config["accounts"] = {}
    tokend.write_config(config)
    tokend.signal(signal.SIGHUP)
    tokend.wait_event("reloaded")
    assert tokend.events("account_revoked", account="alice")
    assert not tokend.events("account_revoked", account="bob")
    assert stored_refresh_token(tokend.workdir, "alice") is None

    def refresh(token: str | None) -> int:
        assert token
        return httpx.post(
            fresh_idp.token_endpoint,
            data={"grant_type": "refresh_token", "refresh_token": token},
            auth=("login-client", LOGIN_SECRET),
        ).status_code

    assert refresh(held["alice"]) == 400  # revoked at the IdP
    assert refresh(held["bob"]) == 200  # its own setting keeps it
    assert tokend.stop() == 0
