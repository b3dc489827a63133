"""Tests of the test identity provider harness (tests/idp_harness.py).

They also document how to use it: every request below is a plain httpx call
against the real oidc-provider token endpoint, the way tokend talks to an IdP.
"""

from __future__ import annotations

import itertools
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jwt
import pytest

from tests.idp_harness import (
    BASIC_SECRET,
    CC_SECRET,
    POST_SECRET,
    IdP,
    IdPError,
    basic_auth_header,
    default_clients,
    make_test_keys,
)

REFRESH_CLIENTS = ["basic-client", "post-client", "jwt-client", "public-client"]


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict:
    return make_test_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def idp(tmp_path_factory, keys):
    clients = default_clients(keys["ec_public_jwk"], keys["rsa_public_jwk"])
    with IdP(tmp_path_factory.mktemp("idp"), clients=clients) as server:
        yield server


@pytest.fixture(autouse=True)
def clean_idp(idp):
    """No fault, default settings, empty log and stats for every test."""
    idp.reset()
    yield
    idp.reset()


# ---------------------------------------------------------------------------
# client side helpers: one way of authenticating per registered client


def client_assertion(idp: IdP, keys: dict, alg: str) -> str:
    """A private_key_jwt client assertion for jwt-client (RFC 7523)."""
    pem, kid = (
        (keys["ec_pem"], keys["ec_kid"]) if alg == "ES256" else (keys["rsa_pem"], keys["rsa_kid"])
    )
    now = int(time.time())
    claims = {
        "iss": "jwt-client",
        "sub": "jwt-client",
        "aud": idp.token_endpoint,
        "jti": str(uuid.uuid4()),
        "iat": now,
        "exp": now + 60,
    }
    return jwt.encode(claims, Path(pem).read_bytes(), algorithm=alg, headers={"kid": kid})


def authenticate(idp: IdP, keys: dict, client_id: str, alg: str = "ES256") -> tuple[dict, dict]:
    """(headers, form fields) that authenticate ``client_id`` at the token endpoint."""
    if client_id == "basic-client":
        return {"Authorization": basic_auth_header(client_id, BASIC_SECRET)}, {}
    if client_id == "cc-client":
        return {"Authorization": basic_auth_header(client_id, CC_SECRET)}, {}
    if client_id == "post-client":
        return {}, {"client_id": client_id, "client_secret": POST_SECRET}
    if client_id == "jwt-client":
        return {}, {
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": client_assertion(idp, keys, alg),
        }
    if client_id == "public-client":
        return {}, {"client_id": client_id}
    raise ValueError(client_id)


def token_request(
    idp: IdP,
    keys: dict,
    client_id: str,
    form: dict,
    *,
    alg: str = "ES256",
    timeout: float = 10.0,
    headers: dict | None = None,
) -> httpx.Response:
    auth_headers, auth_form = authenticate(idp, keys, client_id, alg)
    return httpx.post(
        idp.token_endpoint,
        data={**form, **auth_form},
        headers={**auth_headers, **(headers or {})},
        timeout=timeout,
    )


def refresh(idp: IdP, keys: dict, client_id: str, refresh_token: str, **kw) -> httpx.Response:
    form = {"grant_type": "refresh_token", "refresh_token": refresh_token}
    if "scope" in kw:
        form["scope"] = kw.pop("scope")
    return token_request(idp, keys, client_id, form, **kw)


def assert_invalid_grant(response: httpx.Response) -> None:
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_grant"


# ---------------------------------------------------------------------------
# basics


def test_discovery_and_issuer(idp):
    assert idp.issuer == f"http://127.0.0.1:{idp.port}"
    assert idp.metadata["issuer"] == idp.issuer
    assert idp.token_endpoint == f"{idp.issuer}/token"
    assert {"refresh_token", "client_credentials"} <= set(idp.metadata["grant_types_supported"])
    assert {"client_secret_basic", "client_secret_post", "private_key_jwt", "none"} <= set(
        idp.metadata["token_endpoint_auth_methods_supported"]
    )
    assert "revocation_endpoint" in idp.metadata
    assert "introspection_endpoint" in idp.metadata


@pytest.mark.parametrize(
    ("client_id", "alg", "auth_method_seen"),
    [
        ("basic-client", None, "basic"),
        ("cc-client", None, "basic"),
        ("post-client", None, "post"),
        ("jwt-client", "ES256", "jwt"),
        ("jwt-client", "RS256", "jwt"),
        ("public-client", None, "none"),
    ],
    ids=["basic", "basic-special-secret", "post", "jwt-es256", "jwt-rs256", "none"],
)
def test_seed_then_refresh_with_every_auth_method(idp, keys, client_id, alg, auth_method_seen):
    scope = "read" if client_id == "cc-client" else "openid offline_access read"
    seeded = idp.seed_grant(client_id, scope=scope, account_id="alice")

    response = refresh(idp, keys, client_id, seeded["refresh_token"], alg=alg or "ES256")

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 5
    assert body["access_token"]
    assert body["scope"] == scope
    assert body["refresh_token"] != seeded["refresh_token"]  # rotated
    assert ("id_token" in body) == ("openid" in scope)

    (entry,) = idp.log()
    assert entry["client_id"] == client_id
    assert entry["auth_method_seen"] == auth_method_seen
    assert entry["grant_type"] == "refresh_token"
    assert entry["grant_id"] == seeded["grant_id"]
    assert entry["refresh_token_sha256"] == IdP.token_sha256(seeded["refresh_token"])
    assert entry["status"] == 200
    assert entry["fault"] is None


def test_basic_auth_secret_must_be_form_encoded(idp, keys):
    """RFC 6749 2.3.1: urlencode id and secret, then base64. A raw secret
    with reserved characters is rejected."""
    import base64

    raw = base64.b64encode(f"cc-client:{CC_SECRET}".encode()).decode()
    response = httpx.post(
        idp.token_endpoint,
        data={"grant_type": "client_credentials"},
        headers={"Authorization": f"Basic {raw}"},
    )
    assert response.status_code in (400, 401)
    assert "access_token" not in response.json()

    encoded = basic_auth_header("cc-client", CC_SECRET)
    assert encoded == "Basic " + base64.b64encode(b"cc-client:s3cr%3Aet%2F%2B%26%25%3D").decode()
    response = httpx.post(
        idp.token_endpoint,
        data={"grant_type": "client_credentials"},
        headers={"Authorization": encoded},
    )
    assert response.status_code == 200, response.text


def test_client_credentials(idp, keys):
    response = token_request(idp, keys, "cc-client", {"grant_type": "client_credentials"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["scope"] == "read write"  # all allowed scopes when none requested
    assert body["expires_in"] == 5
    assert "refresh_token" not in body

    response = token_request(
        idp, keys, "cc-client", {"grant_type": "client_credentials", "scope": "write"}
    )
    assert response.status_code == 200, response.text
    assert response.json()["scope"] == "write"

    # works for other auth methods too
    response = token_request(
        idp, keys, "jwt-client", {"grant_type": "client_credentials", "scope": "read"}
    )
    assert response.status_code == 200, response.text
    assert response.json()["scope"] == "read"


def test_rotation_reuse_of_old_token_revokes_grant(idp, keys):
    seeded = idp.seed_grant("basic-client")
    first = refresh(idp, keys, "basic-client", seeded["refresh_token"])
    assert first.status_code == 200
    rotated = first.json()["refresh_token"]
    assert rotated != seeded["refresh_token"]

    # presenting the already rotated token again is treated as token theft
    assert_invalid_grant(refresh(idp, keys, "basic-client", seeded["refresh_token"]))
    # ... and the whole grant is gone, including the newest token
    assert_invalid_grant(refresh(idp, keys, "basic-client", rotated))

    log = idp.log()
    assert [e["status"] for e in log] == [200, 400, 400]
    assert [e["error"] for e in log] == [None, "invalid_grant", "invalid_grant"]
    assert all(e["grant_id"] == seeded["grant_id"] for e in log)


def test_rotation_off_keeps_refresh_token(idp, keys):
    idp.configure(rotate_refresh_tokens=False)
    token = idp.seed("post-client")
    for _ in range(3):
        response = refresh(idp, keys, "post-client", token)
        assert response.status_code == 200, response.text
        assert response.json()["refresh_token"] == token


def test_refresh_token_is_bound_to_its_client(idp, keys):
    token = idp.seed("basic-client")
    assert_invalid_grant(refresh(idp, keys, "post-client", token))
    # the mismatch does not burn the token for its real client
    assert refresh(idp, keys, "basic-client", token).status_code == 200


def test_scope_narrowing_on_refresh(idp, keys):
    token = idp.seed("basic-client", scope="openid offline_access read write")
    response = refresh(idp, keys, "basic-client", token, scope="read")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["scope"] == "read"
    # the refresh token keeps the full grant
    response = refresh(idp, keys, "basic-client", body["refresh_token"])
    assert response.json()["scope"] == "openid offline_access read write"
    # widening is refused
    token = idp.seed("basic-client", scope="openid offline_access read")
    response = refresh(idp, keys, "basic-client", token, scope="read write")
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_scope"


def test_access_token_ttl_and_introspection(idp, keys):
    idp.configure(access_token_ttl=2)
    response = refresh(idp, keys, "basic-client", idp.seed("basic-client"))
    body = response.json()
    assert body["expires_in"] == 2

    introspection = httpx.post(
        idp.metadata["introspection_endpoint"],
        data={"token": body["access_token"]},
        headers={"Authorization": basic_auth_header("basic-client", BASIC_SECRET)},
    ).json()
    assert introspection["active"] is True
    assert introspection["client_id"] == "basic-client"
    assert introspection["exp"] - introspection["iat"] == 2


def test_revoke_grant(idp, keys):
    seeded = idp.seed_grant("basic-client")
    idp.revoke_grant(seeded["grant_id"])
    assert_invalid_grant(refresh(idp, keys, "basic-client", seeded["refresh_token"]))
    (entry,) = idp.log()
    assert entry["grant_id"] == seeded["grant_id"]  # still known after revocation


def test_storage_is_not_an_lru(idp, keys):
    """oidc-provider's bundled memory adapter evicts after ~1000 entries."""
    first = idp.seed("basic-client")
    with httpx.Client(base_url=idp.issuer) as control:
        for _ in range(600):  # 2 entries (grant + refresh token) each
            control.post("/_test/seed", json={"client_id": "basic-client"}).raise_for_status()
    assert refresh(idp, keys, "basic-client", first).status_code == 200


def test_control_api_rejects_bad_input(idp):
    response = httpx.post(f"{idp.issuer}/_test/fault", json={"mode": "bogus"})
    assert response.status_code == 400
    with pytest.raises(IdPError):
        idp.seed("no-such-client")
    with pytest.raises(ValueError):
        idp.fault("bogus")


# ---------------------------------------------------------------------------
# faults


@pytest.mark.parametrize(
    ("mode", "kw", "status", "content_type", "retry_after"),
    [
        ("status_500", {}, 500, "application/json", None),
        ("status_429", {"retry_after": 7}, 429, "application/json", "7"),
        ("status_503", {"retry_after": 3}, 503, "application/json", "3"),
        ("status_503", {}, 503, "application/json", None),
        ("html_403", {}, 403, "text/html", None),
    ],
    ids=["500", "429", "503-retry-after", "503", "html-403"],
)
def test_status_faults(idp, keys, mode, kw, status, content_type, retry_after):
    token = idp.seed("basic-client")
    idp.fault(mode, **kw)

    response = refresh(idp, keys, "basic-client", token)
    assert response.status_code == status
    assert response.headers["content-type"].startswith(content_type)
    assert response.headers.get("retry-after") == retry_after
    if mode == "status_500":
        assert response.json()["error"] == "server_error"
    if mode == "html_403":
        assert "Sorry, you have been blocked" in response.text

    (entry,) = idp.log()
    assert entry["fault"] == mode
    assert entry["status"] == status
    assert entry["provider_status"] is None  # the provider never saw it

    # the refresh token was not touched
    idp.fault("none")
    assert refresh(idp, keys, "basic-client", token).status_code == 200


def test_fault_delay(idp, keys):
    idp.fault("delay", delay_ms=300)
    started = time.monotonic()
    response = refresh(idp, keys, "basic-client", idp.seed("basic-client"))
    assert time.monotonic() - started >= 0.3
    assert response.status_code == 200
    (entry,) = idp.log()
    assert entry["fault"] == "delay"
    assert entry["t_end"] - entry["t_start"] >= 0.3


def test_fault_hang_until_client_gives_up(idp, keys):
    token = idp.seed("basic-client")
    idp.fault("hang")
    with pytest.raises(httpx.ReadTimeout):
        refresh(idp, keys, "basic-client", token, timeout=0.5)

    # the server notices the client went away; nothing was answered
    (entry,) = idp.wait_for_log(lambda log: log and log[0]["t_end"] is not None)
    assert entry["fault"] == "hang"
    assert entry["status"] is None
    assert idp.stats()["in_flight_total"] == 0

    # the abandoned request was never processed: the token still works
    idp.fault("none")
    assert refresh(idp, keys, "basic-client", token).status_code == 200


def test_fault_hang_released_by_changing_the_fault(idp, keys):
    token = idp.seed("basic-client")
    idp.fault("hang")
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(refresh, idp, keys, "basic-client", token, timeout=10)
        idp.wait_for_log(lambda log: len(log) == 1)
        assert not pending.done()
        idp.fault("none")
        response = pending.result(timeout=10)
    assert response.status_code == 200


def test_fault_reset(idp, keys):
    token = idp.seed("basic-client")
    idp.fault("reset")
    with pytest.raises(httpx.TransportError):
        refresh(idp, keys, "basic-client", token)
    (entry,) = idp.wait_for_log(lambda log: log and log[0]["t_end"] is not None)
    assert entry["fault"] == "reset"
    assert entry["status"] is None

    idp.fault("none")
    assert refresh(idp, keys, "basic-client", token).status_code == 200


def test_fault_lost_after_rotate(idp, keys):
    seeded = idp.seed_grant("basic-client")
    idp.fault("lost_after_rotate")
    with pytest.raises(httpx.TransportError):
        refresh(idp, keys, "basic-client", seeded["refresh_token"])
    (entry,) = idp.wait_for_log(lambda log: log and log[0]["t_end"] is not None)
    assert entry["fault"] == "lost_after_rotate"
    assert entry["provider_status"] == 200  # the IdP did rotate ...
    assert entry["status"] is None  # ... but the client never heard of it

    # the client only has the old token, which is now a rotated one: reuse
    # detection fires and the grant is revoked
    idp.fault("none")
    assert_invalid_grant(refresh(idp, keys, "basic-client", seeded["refresh_token"]))


def test_fault_count(idp, keys):
    token = idp.seed("basic-client")
    idp.fault("status_500", count=2)
    statuses = [refresh(idp, keys, "basic-client", token).status_code for _ in range(3)]
    assert statuses == [500, 500, 200]
    assert [e["fault"] for e in idp.log()] == ["status_500", "status_500", None]


@pytest.mark.parametrize("target", REFRESH_CLIENTS)
def test_fault_client_id_filter(idp, keys, target):
    """The client is recognised from Basic auth, client_id and the client
    assertion's iss alike."""
    tokens = {client_id: idp.seed(client_id) for client_id in REFRESH_CLIENTS}
    idp.fault("status_503", client_id=target)
    statuses = {
        client_id: refresh(idp, keys, client_id, token).status_code
        for client_id, token in tokens.items()
    }
    assert statuses == {
        client_id: 503 if client_id == target else 200 for client_id in REFRESH_CLIENTS
    }


def test_fault_user_agent_filter(idp, keys):
    """Emulates a web firewall that blocks a library's default User-Agent."""
    token = idp.seed("basic-client")
    idp.fault("html_403", user_agent_contains="python-httpx")
    blocked = refresh(idp, keys, "basic-client", token)
    assert blocked.status_code == 403
    assert blocked.headers["content-type"].startswith("text/html")

    allowed = refresh(idp, keys, "basic-client", token, headers={"User-Agent": "tokend/0.1"})
    assert allowed.status_code == 200
    assert [e["user_agent"].split("/")[0] for e in idp.log()] == ["python-httpx", "tokend"]


# ---------------------------------------------------------------------------
# reuse grace window


def test_reuse_grace_window(idp, keys):
    idp.configure(reuse_grace_seconds=1)
    seeded = idp.seed_grant("basic-client")
    old = seeded["refresh_token"]
    first = refresh(idp, keys, "basic-client", old)
    assert first.status_code == 200
    current = first.json()["refresh_token"]

    # within the window the previous token is answered as if valid
    again = refresh(idp, keys, "basic-client", old)
    assert again.status_code == 200, again.text
    assert again.json()["refresh_token"] not in (old, current)
    assert idp.log()[-1]["grace_reuse"] is True
    # it is still bound to its client
    assert_invalid_grant(refresh(idp, keys, "post-client", old))

    # once the window has passed, reuse is detected and the grant revoked
    deadline = time.monotonic() + 5
    while (response := refresh(idp, keys, "basic-client", old)).status_code == 200:
        assert time.monotonic() < deadline, "grace window never closed"
        time.sleep(0.1)
    assert_invalid_grant(response)
    log = idp.log()
    rotation, failure = log[0], log[-1]
    assert failure["t_end"] - rotation["t_start"] >= 1.0
    assert all(e["grace_reuse"] for e in log[1:-1] if e["client_id"] == "basic-client")
    assert_invalid_grant(refresh(idp, keys, "basic-client", current))


# ---------------------------------------------------------------------------
# log and stats


def test_log_and_stats_count_concurrent_refreshes(idp, keys):
    """Hold requests with the hang fault to observe them in flight together."""
    idp.configure(rotate_refresh_tokens=False)
    a = idp.seed_grant("basic-client", account_id="alice")
    b = idp.seed_grant("post-client", account_id="bob")
    idp.fault("hang")
    with ThreadPoolExecutor(4) as pool:
        futures = [
            pool.submit(refresh, idp, keys, "basic-client", a["refresh_token"]) for _ in range(3)
        ]
        futures.append(pool.submit(refresh, idp, keys, "post-client", b["refresh_token"]))
        idp.wait_for_log(lambda log: len(log) == 4)

        stats = idp.stats()
        assert stats["in_flight_total"] == 4
        assert stats["max_concurrent_total"] == 4
        assert stats["max_concurrent_per_grant"] == {a["grant_id"]: 3, b["grant_id"]: 1}
        assert all(e["t_end"] is None and e["status"] is None for e in idp.log())

        idp.fault("none")
        assert [f.result(timeout=10).status_code for f in futures] == [200] * 4

    log = idp.wait_for_log(lambda log: all(e["t_end"] is not None for e in log))
    assert [e["t_start"] for e in log] == sorted(e["t_start"] for e in log)
    assert all(e["status"] == 200 and e["fault"] == "hang" for e in log)
    assert sorted(e["grant_id"] for e in log) == sorted([a["grant_id"]] * 3 + [b["grant_id"]])
    assert idp.stats()["requests"] == 4


def test_stats_sequential_refreshes_never_overlap(idp, keys):
    seeded = idp.seed_grant("basic-client")
    token = seeded["refresh_token"]
    for _ in range(3):
        token = refresh(idp, keys, "basic-client", token).json()["refresh_token"]
    stats = idp.stats()
    assert stats["max_concurrent_per_grant"] == {seeded["grant_id"]: 1}
    assert stats["max_concurrent_total"] == 1
    assert stats["requests"] == 3
    log = idp.log()
    assert all(earlier["t_end"] <= later["t_start"] for earlier, later in itertools.pairwise(log))

    idp.clear_log()
    assert idp.log() == []
