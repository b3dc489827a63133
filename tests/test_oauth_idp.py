"""ProviderClient against the real test IdP (oidc-provider): every client authentication
method, both grants, discovery, the User-Agent, and injected faults mapped to the right
FailureKind. A last section covers what the IdP cannot fake (a slow-drip or oversized
body) with in-memory transports, and startup errors for bad credential files."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import anyio
import anyio.abc
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import SecretStr

from tests.idp_harness import BASIC_SECRET, CC_SECRET, POST_SECRET, IdP
from tokend._version import __version__
from tokend.config import ProviderConfig
from tokend.oauth import (
    DiscoveryError,
    FailureKind,
    Outcome,
    ProviderClient,
    ProviderSetupError,
    TokenFailure,
    TokenResponse,
)

pytestmark = pytest.mark.anyio

ALL_SECRETS = (BASIC_SECRET, POST_SECRET, CC_SECRET)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class RecordingTransport(httpx.AsyncBaseTransport):
    """A real HTTP transport that remembers every request it sends, and can be told to
    fail the next few requests before they leave."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.requests: list[httpx.Request] = []
        self.fail_next = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        self.requests.append(request)
        if self.fail_next:
            self.fail_next -= 1
            raise httpx.ConnectError("injected connect failure", request=request)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()

    def forms(self) -> list[dict[str, list[str]]]:
        return [parse_qs(r.content.decode()) for r in self.requests if r.method == "POST"]


def provider_config(idp: IdP, client_id: str, **settings: Any) -> ProviderConfig:
    if "token_endpoint" not in settings:
        settings.setdefault("issuer", idp.issuer)
    settings.setdefault("timeout", 3.0)
    return ProviderConfig(client_id=client_id, **settings)


def basic(idp: IdP, **settings: Any) -> ProviderConfig:
    return provider_config(idp, "basic-client", client_secret=BASIC_SECRET, **settings)


def accepted(outcome: Outcome) -> TokenResponse:
    assert isinstance(outcome, TokenResponse), outcome
    assert outcome.access_token
    return outcome


def failed(outcome: Outcome, *secrets: str) -> TokenFailure:
    assert isinstance(outcome, TokenFailure), outcome
    for secret in (*secrets, *ALL_SECRETS):
        assert secret not in repr(outcome)
        assert secret not in outcome.summary()
    return outcome


# --- client authentication -------------------------------------------------------------

AuthCase = Callable[[IdP, dict[str, Any]], ProviderConfig]

AUTH_CASES: dict[str, tuple[str, str, AuthCase]] = {
    "client_secret_basic": ("basic-client", "basic", lambda idp, keys: basic(idp)),
    "client_secret_basic, special characters": (
        "cc-client",
        "basic",
        lambda idp, keys: provider_config(idp, "cc-client", client_secret=CC_SECRET),
    ),
    "client_secret_post": (
        "post-client",
        "post",
        lambda idp, keys: provider_config(
            idp, "post-client", client_secret=POST_SECRET, auth_method="client_secret_post"
        ),
    ),
    "private_key_jwt ES256 PEM": (
        "jwt-client",
        "jwt",
        lambda idp, keys: provider_config(
            idp, "jwt-client", auth_method="private_key_jwt", private_key_file=keys["ec_pem"]
        ),
    ),
    "private_key_jwt RS256 PEM": (
        "jwt-client",
        "jwt",
        lambda idp, keys: provider_config(
            idp, "jwt-client", auth_method="private_key_jwt", private_key_file=keys["rsa_pem"]
        ),
    ),
    "private_key_jwt ES256 JWK": (
        "jwt-client",
        "jwt",
        lambda idp, keys: provider_config(
            idp, "jwt-client", auth_method="private_key_jwt", private_key_file=keys["ec_jwk"]
        ),
    ),
    "private_key_jwt RS256 JWK": (
        "jwt-client",
        "jwt",
        lambda idp, keys: provider_config(
            idp, "jwt-client", auth_method="private_key_jwt", private_key_file=keys["rsa_jwk"]
        ),
    ),
    "none": (
        "public-client",
        "none",
        lambda idp, keys: provider_config(idp, "public-client", auth_method="none"),
    ),
}


@pytest.mark.parametrize("case", list(AUTH_CASES))
async def test_every_auth_method_refreshes_and_rotates(
    fresh_idp: IdP, idp_keys: dict[str, Any], case: str
) -> None:
    client_id, seen_as, make_config = AUTH_CASES[case]
    scope = "read" if client_id == "cc-client" else "openid offline_access read"
    seed = fresh_idp.seed(client_id, scope=scope)
    async with ProviderClient("idp", make_config(fresh_idp, idp_keys)) as provider:
        first = accepted(await provider.refresh(seed))
        assert first.token_type == "Bearer"
        assert first.expires_in == 5.0
        assert first.refresh_token and first.refresh_token != seed
        # The rotated token works in turn.
        second = accepted(await provider.refresh(first.refresh_token))
        assert second.refresh_token not in (None, seed, first.refresh_token)
    log = fresh_idp.log()
    assert [(e["client_id"], e["auth_method_seen"], e["status"]) for e in log] == [
        (client_id, seen_as, 200)
    ] * 2


async def test_client_assertion_is_bound_to_the_token_endpoint(
    fresh_idp: IdP, idp_keys: dict[str, Any]
) -> None:
    transport = RecordingTransport()
    config = AUTH_CASES["private_key_jwt ES256 JWK"][2](fresh_idp, idp_keys)
    async with ProviderClient("idp", config, transport=transport) as provider:
        accepted(await provider.refresh(fresh_idp.seed("jwt-client")))
    [form] = transport.forms()
    assertion = form["client_assertion"][0]
    header = jwt.get_unverified_header(assertion)
    assert (header["alg"], header["kid"]) == ("ES256", idp_keys["ec_kid"])
    claims = jwt.decode(assertion, options={"verify_signature": False})
    assert claims["iss"] == claims["sub"] == "jwt-client"
    assert claims["aud"] == fresh_idp.token_endpoint
    assert claims["exp"] - claims["iat"] == 60
    assert form["client_id"] == ["jwt-client"]


async def test_client_secret_file(fresh_idp: IdP, tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(POST_SECRET + "\n")
    config = provider_config(
        fresh_idp, "post-client", client_secret_file=secret_file, auth_method="client_secret_post"
    )
    async with ProviderClient("idp", config) as provider:
        accepted(await provider.refresh(fresh_idp.seed("post-client")))


# --- grants -------------------------------------------------------------------------------


async def test_reusing_a_rotated_refresh_token_is_account_permanent(fresh_idp: IdP) -> None:
    seed = fresh_idp.seed("basic-client")
    async with ProviderClient("idp", basic(fresh_idp)) as provider:
        accepted(await provider.refresh(seed))
        outcome = failed(await provider.refresh(seed), seed)
    assert (outcome.kind, outcome.reason, outcome.status) == (
        FailureKind.ACCOUNT_PERMANENT,
        "invalid_grant",
        400,
    )


async def test_revoked_grant_is_account_permanent(fresh_idp: IdP) -> None:
    grant = fresh_idp.seed_grant("basic-client")
    fresh_idp.revoke_grant(grant["grant_id"])
    async with ProviderClient("idp", basic(fresh_idp)) as provider:
        outcome = failed(await provider.refresh(grant["refresh_token"]), grant["refresh_token"])
    assert (outcome.kind, outcome.reason) == (FailureKind.ACCOUNT_PERMANENT, "invalid_grant")


async def test_scope_narrowing(fresh_idp: IdP) -> None:
    seed = fresh_idp.seed("basic-client", scope="openid offline_access read write")
    async with ProviderClient("idp", basic(fresh_idp)) as provider:
        narrowed = accepted(await provider.refresh(seed, scope="read"))
    assert narrowed.scope == "read"
    [entry] = fresh_idp.log()
    assert entry["grant_type"] == "refresh_token"


async def test_scope_beyond_the_grant_is_account_permanent(fresh_idp: IdP) -> None:
    seed = fresh_idp.seed("basic-client", scope="openid offline_access read")
    async with ProviderClient("idp", basic(fresh_idp)) as provider:
        outcome = failed(await provider.refresh(seed, scope="read write"), seed)
    assert (outcome.kind, outcome.reason) == (FailureKind.ACCOUNT_PERMANENT, "invalid_scope")


async def test_client_credentials(fresh_idp: IdP) -> None:
    config = provider_config(fresh_idp, "cc-client", client_secret=CC_SECRET)
    async with ProviderClient("idp", config) as provider:
        granted = accepted(await provider.client_credentials(scope="read write"))
        assert granted.refresh_token is None
        assert granted.scope == "read write"
        narrowed = accepted(await provider.client_credentials(scope="read"))
        assert narrowed.scope == "read"
    assert [e["grant_type"] for e in fresh_idp.log()] == ["client_credentials"] * 2


async def test_extra_params_are_sent_but_cannot_override_the_grant(fresh_idp: IdP) -> None:
    transport = RecordingTransport()
    config = basic(fresh_idp, extra_params={"grant_type": "password", "tenant": "blue"})
    seed = fresh_idp.seed("basic-client")
    async with ProviderClient("idp", config, transport=transport) as provider:
        accepted(await provider.refresh(seed))
    [form] = transport.forms()
    assert form == {"grant_type": ["refresh_token"], "refresh_token": [seed], "tenant": ["blue"]}


# --- discovery ------------------------------------------------------------------------


async def test_discovery_from_issuer_is_fetched_once_for_concurrent_callers(
    fresh_idp: IdP,
) -> None:
    transport = RecordingTransport()
    endpoints: list[str] = []
    async with ProviderClient("idp", basic(fresh_idp), transport=transport) as provider:

        async def ask() -> None:
            endpoints.append(await provider.token_endpoint())

        async with anyio.create_task_group() as group:
            for _ in range(10):
                group.start_soon(ask)
        accepted(await provider.refresh(fresh_idp.seed("basic-client")))
    assert endpoints == [fresh_idp.token_endpoint] * 10
    assert [(r.method, r.url.path) for r in transport.requests] == [
        ("GET", "/.well-known/openid-configuration"),
        ("POST", httpx.URL(fresh_idp.token_endpoint).path),
    ]


async def test_failed_discovery_is_not_cached(fresh_idp: IdP) -> None:
    transport = RecordingTransport()
    transport.fail_next = 1
    seed = fresh_idp.seed("basic-client")
    async with ProviderClient("idp", basic(fresh_idp), transport=transport) as provider:
        outcome = failed(await provider.refresh(seed), seed)
        assert (outcome.kind, outcome.reason, outcome.request_sent) == (
            FailureKind.TRANSIENT,
            "discovery_failed",
            False,
        )
        accepted(await provider.refresh(seed))


async def test_configured_token_endpoint_skips_discovery(fresh_idp: IdP) -> None:
    transport = RecordingTransport()
    config = provider_config(
        fresh_idp,
        "basic-client",
        client_secret=BASIC_SECRET,
        token_endpoint=fresh_idp.token_endpoint,
    )
    async with ProviderClient("idp", config, transport=transport) as provider:
        accepted(await provider.refresh(fresh_idp.seed("basic-client")))
    assert [r.method for r in transport.requests] == ["POST"]


async def test_discovery_of_an_absent_issuer_raises(free_tcp_port: int) -> None:
    config = ProviderConfig(
        issuer=f"http://127.0.0.1:{free_tcp_port}", client_id="c", auth_method="none"
    )
    async with ProviderClient("idp", config) as provider:
        with pytest.raises(DiscoveryError, match="well-known"):
            await provider.token_endpoint()


# --- User-Agent ---------------------------------------------------------------------------


async def test_default_user_agent(fresh_idp: IdP) -> None:
    async with ProviderClient("idp", basic(fresh_idp)) as provider:
        accepted(await provider.refresh(fresh_idp.seed("basic-client")))
    [entry] = fresh_idp.log()
    assert entry["user_agent"] == f"tokend/{__version__}"


async def test_user_agent_override(fresh_idp: IdP) -> None:
    agent = "acme-sync/2.0 (+ops@example.com)"
    async with ProviderClient("idp", basic(fresh_idp, user_agent=agent)) as provider:
        accepted(await provider.refresh(fresh_idp.seed("basic-client")))
    [entry] = fresh_idp.log()
    assert entry["user_agent"] == agent


# --- faults -------------------------------------------------------------------------------


async def refresh_under_fault(
    idp: IdP, mode: str, *, provider_timeout: float = 3.0, **fault: Any
) -> tuple[TokenFailure, str, float]:
    """Refresh once under a fault; returns the failure, the refresh token and the time
    the request took."""
    seed = idp.seed("basic-client")
    idp.fault(mode, count=1, **fault)
    async with ProviderClient("idp", basic(idp, timeout=provider_timeout)) as provider:
        await provider.token_endpoint()
        started = time.monotonic()
        outcome = await provider.refresh(seed)
        elapsed = time.monotonic() - started
    return failed(outcome, seed), seed, elapsed


async def test_500_is_transient_and_spends_nothing(fresh_idp: IdP) -> None:
    outcome, seed, _ = await refresh_under_fault(fresh_idp, "status_500")
    assert (outcome.kind, outcome.reason, outcome.status, outcome.description) == (
        FailureKind.TRANSIENT,
        "http_500",
        500,
        "injected fault",
    )
    async with ProviderClient("idp", basic(fresh_idp)) as provider:
        accepted(await provider.refresh(seed))


async def test_429_is_rate_limited_with_retry_after(fresh_idp: IdP) -> None:
    outcome, _, _ = await refresh_under_fault(fresh_idp, "status_429", retry_after=7)
    assert (outcome.kind, outcome.status, outcome.retry_after) == (
        FailureKind.RATE_LIMITED,
        429,
        7.0,
    )


async def test_503_with_retry_after_is_rate_limited(fresh_idp: IdP) -> None:
    outcome, _, _ = await refresh_under_fault(fresh_idp, "status_503", retry_after=3)
    assert (outcome.kind, outcome.retry_after) == (FailureKind.RATE_LIMITED, 3.0)


async def test_503_without_retry_after_is_transient(fresh_idp: IdP) -> None:
    outcome, _, _ = await refresh_under_fault(fresh_idp, "status_503")
    assert (outcome.kind, outcome.reason) == (FailureKind.TRANSIENT, "http_503")


async def test_html_403_is_blocked(fresh_idp: IdP) -> None:
    outcome, _, _ = await refresh_under_fault(fresh_idp, "html_403")
    assert (outcome.kind, outcome.reason, outcome.status) == (
        FailureKind.BLOCKED,
        "html_block_page",
        403,
    )


async def test_reset_is_connection_lost(fresh_idp: IdP) -> None:
    outcome, _, _ = await refresh_under_fault(fresh_idp, "reset")
    assert (outcome.kind, outcome.reason, outcome.request_sent) == (
        FailureKind.TRANSIENT,
        "connection_lost",
        True,
    )


async def test_lost_after_rotate_is_connection_lost_and_the_token_is_spent(
    fresh_idp: IdP,
) -> None:
    outcome, seed, _ = await refresh_under_fault(fresh_idp, "lost_after_rotate")
    assert (outcome.kind, outcome.reason, outcome.request_sent) == (
        FailureKind.TRANSIENT,
        "connection_lost",
        True,
    )
    async with ProviderClient("idp", basic(fresh_idp)) as provider:
        spent = failed(await provider.refresh(seed), seed)
    assert spent.reason == "invalid_grant"


async def test_hang_times_out_within_the_deadline(fresh_idp: IdP) -> None:
    outcome, _, elapsed = await refresh_under_fault(fresh_idp, "hang", provider_timeout=1.0)
    assert (outcome.kind, outcome.reason, outcome.request_sent) == (
        FailureKind.TRANSIENT,
        "timeout",
        True,
    )
    assert 0.9 <= elapsed < 2.0


async def test_delay_shorter_than_the_timeout_succeeds(fresh_idp: IdP) -> None:
    seed = fresh_idp.seed("basic-client")
    fresh_idp.fault("delay", delay_ms=300, count=1)
    async with ProviderClient("idp", basic(fresh_idp, timeout=2.0)) as provider:
        accepted(await provider.refresh(seed))


async def test_wrong_secret_is_provider_permanent(fresh_idp: IdP) -> None:
    seed = fresh_idp.seed("basic-client")
    wrong = "not-the-basic-secret"
    config = provider_config(fresh_idp, "basic-client", client_secret=wrong)
    async with ProviderClient("idp", config) as provider:
        outcome = failed(await provider.refresh(seed), seed, wrong)
    assert (outcome.kind, outcome.reason, outcome.status) == (
        FailureKind.PROVIDER_PERMANENT,
        "invalid_client",
        401,
    )


async def test_unknown_client_is_provider_permanent(fresh_idp: IdP) -> None:
    seed = fresh_idp.seed("basic-client")
    config = provider_config(fresh_idp, "ghost-client", client_secret=BASIC_SECRET)
    async with ProviderClient("idp", config) as provider:
        outcome = failed(await provider.refresh(seed), seed)
    assert (outcome.kind, outcome.reason) == (FailureKind.PROVIDER_PERMANENT, "invalid_client")


async def test_connection_refused_is_not_sent(free_tcp_port: int) -> None:
    config = ProviderConfig(
        token_endpoint=f"http://127.0.0.1:{free_tcp_port}/token",
        client_id="basic-client",
        client_secret=SecretStr(BASIC_SECRET),
    )
    async with ProviderClient("idp", config) as provider:
        outcome = failed(await provider.refresh("rt-never-sent"), "rt-never-sent")
    assert (outcome.kind, outcome.reason, outcome.request_sent) == (
        FailureKind.TRANSIENT,
        "connect_error",
        False,
    )


# --- what the IdP cannot fake: in-memory transports --------------------------------------

MEMORY_ENDPOINT = "https://idp.invalid/token"


def memory_config(**settings: Any) -> ProviderConfig:
    return ProviderConfig(
        token_endpoint=MEMORY_ENDPOINT,
        client_id="c",
        client_secret=SecretStr("memory-secret"),
        **settings,
    )


async def drip_slowly(stream: anyio.abc.SocketStream) -> None:
    """Answer an HTTP request with headers at once, then one body byte every 0.1 s."""
    async with stream:
        received = b""
        while b"\r\n\r\n" not in received:
            received += await stream.receive()
        await stream.send(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        )
        for _ in range(1000):
            await anyio.sleep(0.1)
            await stream.send(b" ")


async def test_slow_drip_body_hits_the_total_deadline() -> None:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.listeners[0].extra(anyio.abc.SocketAttribute.local_port)
    config = ProviderConfig(
        token_endpoint=f"http://127.0.0.1:{port}/token",
        client_id="c",
        client_secret=SecretStr("memory-secret"),
        timeout=0.5,
    )
    async with listener, anyio.create_task_group() as server:
        server.start_soon(listener.serve, drip_slowly)
        async with ProviderClient("p", config) as provider:
            started = time.monotonic()
            outcome = failed(await provider.refresh("rt-drip"), "rt-drip", "memory-secret")
            elapsed = time.monotonic() - started
        server.cancel_scope.cancel()
    # Every byte arrives well within httpx's per-read timeout; only the total deadline
    # ends the exchange.
    assert (outcome.kind, outcome.reason, outcome.request_sent) == (
        FailureKind.TRANSIENT,
        "timeout",
        True,
    )
    assert 0.45 <= elapsed < 1.5


@pytest.mark.parametrize(
    ("status", "kind", "reason"),
    [
        (200, FailureKind.TRANSIENT, "response_too_large"),
        (502, FailureKind.TRANSIENT, "http_502"),
        (403, FailureKind.BLOCKED, "html_block_page"),
    ],
)
async def test_oversized_body_is_cut(status: int, kind: FailureKind, reason: str) -> None:
    body = b"<html>" + b"x" * (1024 * 1024)
    transport = httpx.MockTransport(lambda request: httpx.Response(status, content=body))
    async with ProviderClient("p", memory_config(), transport=transport) as provider:
        outcome = failed(await provider.refresh("rt-big"))
    assert (outcome.kind, outcome.reason, outcome.status) == (kind, reason, status)


async def test_echoed_refresh_token_and_secret_are_redacted() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        form = parse_qs(request.content.decode())
        echo = (
            f"refresh token {form['refresh_token'][0]} rejected; "
            f"auth {request.headers['Authorization']}"
        )
        return httpx.Response(400, json={"error": "invalid_grant", "error_description": echo})

    transport = httpx.MockTransport(handler)
    async with ProviderClient("p", memory_config(), transport=transport) as provider:
        outcome = failed(
            await provider.refresh("rt-echoed-0123456789"), "rt-echoed-0123456789", "memory-secret"
        )
    assert outcome.description is not None
    assert outcome.description == "refresh token [redacted] rejected; auth Basic [redacted]"


async def test_request_headers_and_basic_encoding() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"access_token": "at", "expires_in": "60"})

    config = ProviderConfig(
        token_endpoint=MEMORY_ENDPOINT, client_id="a b", client_secret=SecretStr("x:y")
    )
    async with ProviderClient("p", config, transport=httpx.MockTransport(handler)) as provider:
        accepted(await provider.client_credentials())
    [request] = seen
    assert request.headers["Accept"] == "application/json"
    assert request.headers["User-Agent"] == f"tokend/{__version__}"
    assert request.headers["Authorization"] == "Basic YStiOnglM0F5"  # base64("a+b:x%3Ay")
    assert parse_qs(request.content.decode()) == {"grant_type": ["client_credentials"]}


async def test_redirect_is_not_followed() -> None:
    transport = httpx.MockTransport(
        lambda request: httpx.Response(301, headers={"Location": "https://elsewhere/token"})
    )
    async with ProviderClient("p", memory_config(), transport=transport) as provider:
        outcome = failed(await provider.refresh("rt-redirect"))
    assert (outcome.kind, outcome.reason) == (FailureKind.PROVIDER_PERMANENT, "http_301")
    assert outcome.description == "redirected to https://elsewhere/token"


async def test_empty_refresh_token_is_not_sent() -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(500))
    async with ProviderClient("p", memory_config(), transport=transport) as provider:
        outcome = failed(await provider.refresh(""))
    assert (outcome.kind, outcome.reason, outcome.request_sent) == (
        FailureKind.ACCOUNT_PERMANENT,
        "missing_refresh_token",
        False,
    )


DISCOVERY_ISSUER = "https://issuer.invalid"
DISCOVERY_DOCUMENT = {"issuer": DISCOVERY_ISSUER, "token_endpoint": MEMORY_ENDPOINT}


async def test_concurrent_callers_share_a_failed_discovery() -> None:
    fetches: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        fetches.append(request)
        await anyio.sleep(0.1)
        return httpx.Response(500)

    config = ProviderConfig(issuer=DISCOVERY_ISSUER, client_id="c", auth_method="none")
    errors: list[str] = []
    async with ProviderClient("p", config, transport=httpx.MockTransport(handler)) as provider:

        async def ask() -> None:
            try:
                await provider.token_endpoint()
            except DiscoveryError as exc:
                errors.append(str(exc))

        async with anyio.create_task_group() as group:
            for _ in range(5):
                group.start_soon(ask)
        assert len(fetches) == 1
        assert len(errors) == 5 and all("HTTP 500" in e for e in errors)
        # Not cached: the next caller fetches again.
        with pytest.raises(DiscoveryError):
            await provider.token_endpoint()
        assert len(fetches) == 2


async def test_a_cancelled_discovery_leaves_the_fetch_to_a_waiter() -> None:
    fetches: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        fetches.append(request)
        await anyio.sleep(0.2)
        return httpx.Response(200, json=DISCOVERY_DOCUMENT)

    config = ProviderConfig(issuer=DISCOVERY_ISSUER, client_id="c", auth_method="none")
    found: list[str] = []
    async with ProviderClient("p", config, transport=httpx.MockTransport(handler)) as provider:

        async def impatient() -> None:
            with anyio.move_on_after(0.05):
                await provider.token_endpoint()

        async def patient() -> None:
            found.append(await provider.token_endpoint())

        async with anyio.create_task_group() as group:
            group.start_soon(impatient)
            await anyio.sleep(0.01)
            group.start_soon(patient)
    assert found == [MEMORY_ENDPOINT]
    assert len(fetches) == 2


# --- startup errors -----------------------------------------------------------------------


def setup_error(config: ProviderConfig) -> str:
    with pytest.raises(ProviderSetupError) as raised:
        ProviderClient("acme", config)
    message = str(raised.value)
    assert "'acme'" in message
    assert raised.value.__cause__ is None
    return message


def jwt_config(path: Path, **settings: Any) -> ProviderConfig:
    return ProviderConfig(
        token_endpoint=MEMORY_ENDPOINT,
        client_id="c",
        auth_method="private_key_jwt",
        private_key_file=path,
        **settings,
    )


def test_missing_secret_file(tmp_path: Path) -> None:
    path = tmp_path / "absent"
    message = setup_error(
        ProviderConfig(token_endpoint=MEMORY_ENDPOINT, client_id="c", client_secret_file=path)
    )
    assert str(path) in message and "cannot be read" in message


def test_empty_secret_file(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("\n")
    message = setup_error(
        ProviderConfig(token_endpoint=MEMORY_ENDPOINT, client_id="c", client_secret_file=path)
    )
    assert "empty" in message


def test_missing_key_file(tmp_path: Path) -> None:
    message = setup_error(jwt_config(tmp_path / "absent.pem"))
    assert "private_key_file" in message and "cannot be read" in message


def test_encrypted_pem(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    path.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"),
        )
    )
    assert "encrypted" in setup_error(jwt_config(path))


def test_public_jwk_is_refused(tmp_path: Path, idp_keys: dict[str, Any]) -> None:
    path = tmp_path / "public.json"
    path.write_text(json.dumps(idp_keys["ec_public_jwk"]))
    assert "public JWK" in setup_error(jwt_config(path))


def test_signing_alg_must_fit_the_key(idp_keys: dict[str, Any]) -> None:
    message = setup_error(jwt_config(idp_keys["rsa_pem"], signing_alg="ES256"))
    assert "RS256" in message


def test_other_curves_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "p384.pem"
    path.write_bytes(
        ec.generate_private_key(ec.SECP384R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    assert "P-256" in setup_error(jwt_config(path))


def test_garbage_key_file_does_not_quote_its_content(tmp_path: Path) -> None:
    path = tmp_path / "key.json"
    path.write_text(json.dumps({"kty": "EC", "crv": "P-999", "x": "AAAA", "d": "TOPSECRETD"}))
    message = setup_error(jwt_config(path))
    assert "TOPSECRETD" not in message
    path.write_text("-----BEGIN PRIVATE KEY-----\nTOPSECRETD\n-----END PRIVATE KEY-----\n")
    assert "TOPSECRETD" not in setup_error(jwt_config(path))


def test_repr_shows_no_secret() -> None:
    provider = ProviderClient("p", memory_config())
    assert "memory-secret" not in repr(provider)
    assert "client_secret_basic" in repr(provider)


# --- what real IdPs send: quirks through the fault switch ---------------------------------------


@pytest.mark.parametrize(
    ("expires_in", "expected"), [("3600", 3600.0), (None, None), ("soon", None)]
)
async def test_expires_in_as_a_string_or_missing(
    fresh_idp: IdP, expires_in: object, expected: float | None
) -> None:
    seed = fresh_idp.seed("basic-client")
    fresh_idp.fault("token_rewrite", expires_in=expires_in, count=1)
    async with ProviderClient("idp", basic(fresh_idp)) as provider:
        outcome = accepted(await provider.refresh(seed))
    # None: the refresh policy's default_lifetime applies.
    assert outcome.expires_in == expected


async def test_a_refresh_without_a_new_refresh_token_keeps_the_old_one(fresh_idp: IdP) -> None:
    fresh_idp.configure(rotate_refresh_tokens=False)
    seed = fresh_idp.seed("basic-client")
    fresh_idp.fault("token_rewrite", drop_refresh_token=True, count=1)
    async with ProviderClient("idp", basic(fresh_idp)) as provider:
        assert accepted(await provider.refresh(seed)).refresh_token is None
        accepted(await provider.refresh(seed))  # the one tokend keeps still works


@pytest.mark.parametrize(
    ("status", "kind", "reason"),
    [
        (200, FailureKind.TRANSIENT, "invalid_json"),
        (503, FailureKind.TRANSIENT, "http_503"),
        (403, FailureKind.BLOCKED, "html_block_page"),
    ],
)
async def test_html_bodies(fresh_idp: IdP, status: int, kind: FailureKind, reason: str) -> None:
    outcome, seed, _ = await refresh_under_fault(fresh_idp, "html", status=status)
    assert (outcome.kind, outcome.reason, outcome.status) == (kind, reason, status)
    async with ProviderClient("idp", basic(fresh_idp)) as provider:
        accepted(await provider.refresh(seed))  # nothing was spent


@pytest.mark.parametrize("status", [400, 401])
async def test_invalid_client_on_400_or_401(fresh_idp: IdP, status: int) -> None:
    outcome, _, _ = await refresh_under_fault(
        fresh_idp, "oauth_error", error="invalid_client", status=status
    )
    assert (outcome.kind, outcome.reason, outcome.status) == (
        FailureKind.PROVIDER_PERMANENT,
        "invalid_client",
        status,
    )


async def test_expired_token_is_a_dead_grant(fresh_idp: IdP) -> None:
    outcome, _, _ = await refresh_under_fault(fresh_idp, "oauth_error", error="expired_token")
    assert (outcome.kind, outcome.reason) == (FailureKind.ACCOUNT_PERMANENT, "expired_token")
