"""Reading token endpoint answers and building client credentials: pure functions, no I/O."""

from __future__ import annotations

import base64
import json
import time
from datetime import UTC, datetime
from email.utils import format_datetime

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from tokend.oauth import FailureKind, TokenFailure, TokenResponse
from tokend.oauth._auth import (
    JWT_BEARER_ASSERTION,
    ClientAuth,
    SigningKey,
    basic_authorization,
    client_assertion,
)
from tokend.oauth._discovery import DiscoveryError, discovery_url, token_endpoint_from_metadata
from tokend.oauth._parse import (
    MAX_DESCRIPTION_CHARS,
    MAX_RETRY_AFTER_SECONDS,
    classify_response,
    classify_transport_error,
    clean_text,
    html_title,
    parse_expires_in,
    parse_retry_after,
    redaction_variants,
)

NOW = 1_700_000_000.0
JSON = {"Content-Type": "application/json"}
REFRESH_TOKEN = "rt-Zq8xW2vN5mK9pL3sT7yB1cD4"
CLIENT_SECRET = "cs-Hj6Ff0Gg2Rr8Ee4Ww1Qq9Tt5"


def respond(
    status: int,
    body: object = None,
    headers: dict[str, str] | None = None,
    *,
    raw: bytes | None = None,
    truncated: bool = False,
    secrets: tuple[str, ...] = (),
) -> TokenResponse | TokenFailure:
    content = raw if raw is not None else json.dumps(body).encode()
    return classify_response(
        status,
        headers if headers is not None else JSON,
        content,
        now=NOW,
        truncated=truncated,
        secrets=secrets,
    )


def failure(outcome: TokenResponse | TokenFailure) -> TokenFailure:
    assert isinstance(outcome, TokenFailure), outcome
    return outcome


def token(outcome: TokenResponse | TokenFailure) -> TokenResponse:
    assert isinstance(outcome, TokenResponse), outcome
    return outcome


# --- Retry-After ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        ("  7 ", 7.0),
        ("0", 0.0),
        ("1.5", 1.5),
        ("-5", 0.0),
        ("99999", MAX_RETRY_AFTER_SECONDS),
        ("999999999999", MAX_RETRY_AFTER_SECONDS),
        ("soon", None),
        ("", None),
        ("12abc", None),
        ("\u0663", None),
        (None, None),
    ],
)
def test_retry_after_delta_seconds(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, NOW) == expected


def test_retry_after_http_date_is_relative_to_now() -> None:
    in_90s = format_datetime(datetime.fromtimestamp(NOW + 90, UTC), usegmt=True)
    assert parse_retry_after(in_90s, NOW) == pytest.approx(90.0)


def test_retry_after_http_date_in_the_past_is_zero() -> None:
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", NOW) == 0.0


def test_retry_after_http_date_far_ahead_is_capped() -> None:
    assert parse_retry_after("Fri, 01 Jan 2100 00:00:00 GMT", NOW) == MAX_RETRY_AFTER_SECONDS


def test_retry_after_http_date_without_zone_is_utc() -> None:
    when = datetime.fromtimestamp(NOW + 60, UTC).strftime("%a, %d %b %Y %H:%M:%S -0000")
    assert parse_retry_after(when, NOW) == pytest.approx(60.0)


@given(st.text(max_size=80), st.floats(min_value=0, max_value=4e9))
def test_retry_after_is_bounded_or_none(value: str, now: float) -> None:
    seconds = parse_retry_after(value, now)
    assert seconds is None or 0.0 <= seconds <= MAX_RETRY_AFTER_SECONDS


@given(st.datetimes(timezones=st.just(UTC)), st.floats(min_value=0, max_value=4e9))
def test_retry_after_any_http_date_is_bounded(when: datetime, now: float) -> None:
    seconds = parse_retry_after(format_datetime(when, usegmt=True), now)
    assert seconds is None or 0.0 <= seconds <= MAX_RETRY_AFTER_SECONDS


# --- token responses -----------------------------------------------------------------


def test_full_token_response() -> None:
    body = {
        "access_token": "at-1",
        "token_type": "Bearer",
        "expires_in": 3600,
        "refresh_token": "rt-2",
        "scope": "read write",
    }
    parsed = token(respond(200, body))
    assert parsed == TokenResponse("at-1", "Bearer", 3600.0, "rt-2", "read write")


def test_minimal_token_response_gets_defaults() -> None:
    parsed = token(respond(200, {"access_token": "at-1"}))
    assert parsed == TokenResponse("at-1", "Bearer", None, None, None)


@pytest.mark.parametrize(
    ("token_type", "expected"),
    [
        ("bearer", "Bearer"),
        ("BEARER", "Bearer"),
        (" Bearer ", "Bearer"),
        ("DPoP", "DPoP"),
        ("", "Bearer"),
        (None, "Bearer"),
        (7, "Bearer"),
    ],
)
def test_token_type_is_normalised(token_type: object, expected: str) -> None:
    assert token(respond(200, {"access_token": "a", "token_type": token_type})).token_type == (
        expected
    )


@pytest.mark.parametrize(
    ("expires_in", "expected"),
    [
        (3600, 3600.0),
        (59.5, 59.5),
        ("3600", 3600.0),
        (" 60 ", 60.0),
        ("1.25", 1.25),
        (0, None),
        (-10, None),
        ("-10", None),
        ("soon", None),
        ("", None),
        (None, None),
        (True, None),
        ([3600], None),
        (float("inf"), None),
        (float("nan"), None),
    ],
)
def test_expires_in(expires_in: object, expected: float | None) -> None:
    assert parse_expires_in(expires_in) == expected


@pytest.mark.parametrize("number", [b"1e400", b"1" + b"0" * 400])
def test_expires_in_from_a_huge_json_number_is_none(number: bytes) -> None:
    parsed = token(respond(200, raw=b'{"access_token": "a", "expires_in": ' + number + b"}"))
    assert parsed.expires_in is None


@pytest.mark.parametrize("refresh_token", ["", None, 12, ["x"]])
def test_missing_or_empty_refresh_token_keeps_the_old_one(refresh_token: object) -> None:
    parsed = token(respond(200, {"access_token": "a", "refresh_token": refresh_token}))
    assert parsed.refresh_token is None


@pytest.mark.parametrize(
    ("scope", "expected"),
    [("read", "read"), ("", None), (None, None), (["read", "write"], "read write"), (5, None)],
)
def test_scope(scope: object, expected: str | None) -> None:
    assert token(respond(200, {"access_token": "a", "scope": scope})).scope == expected


def test_secrets_are_not_in_token_response_repr() -> None:
    parsed = token(respond(200, {"access_token": "at-secret", "refresh_token": "rt-secret"}))
    assert "at-secret" not in repr(parsed)
    assert "rt-secret" not in repr(parsed)


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"access_token": ""},
        {"access_token": "  "},
        {"access_token": 42},
        {"access_token": None},
        {"access_token": "a\nb"},
        {"token_type": "Bearer"},
    ],
)
def test_2xx_without_usable_access_token(body: object) -> None:
    outcome = failure(respond(200, body))
    assert (outcome.kind, outcome.reason, outcome.status) == (
        FailureKind.TRANSIENT,
        "invalid_token_response",
        200,
    )


@pytest.mark.parametrize(
    "raw", [b"", b"<html>ok</html>", b"[1, 2]", b'"token"', b"\xff\xfe\x00", b"{", b"null"]
)
def test_2xx_that_is_not_a_json_object(raw: bytes) -> None:
    outcome = failure(respond(200, raw=raw))
    assert (outcome.kind, outcome.reason) == (FailureKind.TRANSIENT, "invalid_json")


def test_2xx_truncated_is_too_large() -> None:
    outcome = failure(respond(200, {"access_token": "a"}, truncated=True))
    assert (outcome.kind, outcome.reason) == (FailureKind.TRANSIENT, "response_too_large")


def test_deeply_nested_json_does_not_raise() -> None:
    outcome = failure(respond(200, raw=b"[" * 256 * 1024))
    assert outcome.reason == "invalid_json"


def test_2xx_carrying_an_rfc_error_is_classified_by_the_code() -> None:
    outcome = failure(respond(200, {"error": "invalid_grant", "error_description": "gone"}))
    assert (outcome.kind, outcome.reason, outcome.description) == (
        FailureKind.ACCOUNT_PERMANENT,
        "invalid_grant",
        "gone",
    )


def test_2xx_carrying_an_unknown_error_is_an_invalid_response() -> None:
    outcome = failure(respond(200, {"error": "bad_refresh_token"}))
    assert (outcome.kind, outcome.reason) == (FailureKind.TRANSIENT, "invalid_token_response")


# --- error responses -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code", "kind"),
    [
        (400, "invalid_grant", FailureKind.ACCOUNT_PERMANENT),
        (400, "invalid_scope", FailureKind.ACCOUNT_PERMANENT),
        (401, "invalid_grant", FailureKind.ACCOUNT_PERMANENT),
        (400, "invalid_client", FailureKind.PROVIDER_PERMANENT),
        (401, "invalid_client", FailureKind.PROVIDER_PERMANENT),
        (400, "unauthorized_client", FailureKind.PROVIDER_PERMANENT),
        (400, "invalid_request", FailureKind.PROVIDER_PERMANENT),
        (400, "unsupported_grant_type", FailureKind.PROVIDER_PERMANENT),
        (400, "something_new", FailureKind.PROVIDER_PERMANENT),
        (400, "temporarily_unavailable", FailureKind.TRANSIENT),
        (400, "server_error", FailureKind.TRANSIENT),
        (400, "slow_down", FailureKind.RATE_LIMITED),
    ],
)
def test_rfc6749_error_codes(status: int, code: str, kind: FailureKind) -> None:
    outcome = failure(respond(status, {"error": code, "error_description": "why"}))
    assert (outcome.kind, outcome.reason, outcome.status, outcome.description) == (
        kind,
        code,
        status,
        "why",
    )
    assert outcome.request_sent


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, FailureKind.PROVIDER_PERMANENT),
        (401, FailureKind.PROVIDER_PERMANENT),
        (404, FailureKind.PROVIDER_PERMANENT),
        (405, FailureKind.PROVIDER_PERMANENT),
        (302, FailureKind.PROVIDER_PERMANENT),
        (408, FailureKind.TRANSIENT),
        (500, FailureKind.TRANSIENT),
        (502, FailureKind.TRANSIENT),
        (503, FailureKind.TRANSIENT),
        (504, FailureKind.TRANSIENT),
        (429, FailureKind.RATE_LIMITED),
        (403, FailureKind.BLOCKED),
    ],
)
def test_statuses_without_a_body(status: int, kind: FailureKind) -> None:
    outcome = failure(respond(status, raw=b"", headers={}))
    assert (outcome.kind, outcome.reason, outcome.status) == (kind, f"http_{status}", status)


def test_5xx_is_transient_whatever_the_body_claims() -> None:
    outcome = failure(respond(500, {"error": "invalid_grant", "error_description": "oops"}))
    assert (outcome.kind, outcome.reason, outcome.description) == (
        FailureKind.TRANSIENT,
        "http_500",
        "oops",
    )


def test_429_is_rate_limited_with_retry_after() -> None:
    outcome = failure(respond(429, {"error": "too_many_requests"}, {"Retry-After": "30"}))
    assert (outcome.kind, outcome.reason, outcome.retry_after) == (
        FailureKind.RATE_LIMITED,
        "http_429",
        30.0,
    )


def test_503_with_retry_after_is_rate_limited() -> None:
    outcome = failure(respond(503, raw=b"busy", headers={"retry-after": "12"}))
    assert (outcome.kind, outcome.retry_after) == (FailureKind.RATE_LIMITED, 12.0)


def test_503_with_unreadable_retry_after_is_transient() -> None:
    outcome = failure(respond(503, raw=b"busy", headers={"Retry-After": "later"}))
    assert (outcome.kind, outcome.retry_after) == (FailureKind.TRANSIENT, None)


def test_retry_after_is_kept_on_any_failure_status() -> None:
    outcome = failure(respond(500, raw=b"", headers={"RETRY-AFTER": "5"}))
    assert (outcome.kind, outcome.retry_after) == (FailureKind.TRANSIENT, 5.0)


BLOCK_PAGE = b"""<!DOCTYPE html>
<html><head><meta charset="utf-8">
<TITLE>Attention Required! &amp;
   Cloudflare</TITLE></head><body>Sorry, you have been blocked</body></html>"""


def test_403_html_is_a_block_page_with_its_title() -> None:
    outcome = failure(respond(403, raw=BLOCK_PAGE, headers={"Content-Type": "text/html"}))
    assert (outcome.kind, outcome.reason, outcome.description) == (
        FailureKind.BLOCKED,
        "html_block_page",
        "Attention Required! & Cloudflare",
    )


def test_html_is_recognised_without_a_content_type() -> None:
    outcome = failure(respond(403, raw=b"\xef\xbb\xbf  <html><body>no</body></html>", headers={}))
    assert (outcome.reason, outcome.description) == ("html_block_page", None)


def test_403_json_keeps_the_rfc_code() -> None:
    outcome = failure(respond(403, {"error": "access_denied"}))
    assert (outcome.kind, outcome.reason) == (FailureKind.BLOCKED, "access_denied")


def test_403_truncated_html_is_still_a_block_page() -> None:
    outcome = failure(respond(403, raw=BLOCK_PAGE[:60], truncated=True, headers={}))
    assert outcome.reason == "html_block_page"


def test_html_5xx_is_transient_with_the_title() -> None:
    outcome = failure(respond(502, raw=b"<html><title>502 Bad Gateway</title></html>", headers={}))
    assert (outcome.kind, outcome.reason, outcome.description) == (
        FailureKind.TRANSIENT,
        "http_502",
        "502 Bad Gateway",
    )


def test_pathological_title_markup_is_fast() -> None:
    started = time.monotonic()
    html_title(b"<title>" * 37_000)
    respond(403, raw=b"<html>" + b"<title " * 37_000, headers={}, truncated=True)
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize("code", ["bad code", "x" * 65, "", "é", 42, ["invalid_grant"]])
def test_malformed_error_code(code: object) -> None:
    outcome = failure(respond(400, {"error": code}))
    assert (outcome.kind, outcome.reason) == (FailureKind.PROVIDER_PERMANENT, "invalid_error_code")


def test_description_is_cleaned_and_truncated() -> None:
    text = "line one\r\nline\ttwo\x00\x1b[31m\u202e" + "x" * 500
    outcome = failure(respond(400, {"error": "invalid_request", "error_description": text}))
    assert outcome.description is not None
    assert outcome.description.startswith("line one line two[31m")
    assert len(outcome.description) == MAX_DESCRIPTION_CHARS
    assert all(ch.isprintable() for ch in outcome.description)


@pytest.mark.parametrize("description", [None, 12, "", "   \x00 "])
def test_unusable_description_is_none(description: object) -> None:
    outcome = failure(respond(400, {"error": "invalid_grant", "error_description": description}))
    assert outcome.description is None


# --- secrets ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "echo",
    [
        REFRESH_TOKEN,
        CLIENT_SECRET,
        # form- and percent-encoded echoes of a secret with special characters
        "s3cr%3Aet%2F%2B%26%25%3D",
        # a secret split by a control character the cleaner removes
        REFRESH_TOKEN[:10] + "\x00" + REFRESH_TOKEN[10:],
    ],
)
def test_echoed_secrets_are_redacted(echo: str) -> None:
    secrets = (REFRESH_TOKEN, CLIENT_SECRET, "s3cr:et/+&%=")
    text = f"token {echo} is not valid for this client " + "y" * 150
    outcome = failure(
        respond(400, {"error": "invalid_grant", "error_description": text}, secrets=secrets)
    )
    assert outcome.description is not None
    assert outcome.description.startswith("token [redacted] is not valid")
    for secret in redaction_variants(secrets):
        assert secret not in repr(outcome)
        assert secret not in outcome.summary()


def test_secret_near_the_truncation_point_leaves_no_prefix() -> None:
    text = "z" * (MAX_DESCRIPTION_CHARS - 5) + REFRESH_TOKEN
    cleaned = clean_text(text, (REFRESH_TOKEN,))
    assert cleaned is not None
    assert REFRESH_TOKEN[:5] not in cleaned


def test_secret_as_error_code_is_replaced() -> None:
    outcome = failure(respond(400, {"error": REFRESH_TOKEN}, secrets=(REFRESH_TOKEN,)))
    assert outcome.reason == "invalid_error_code"


def test_secret_in_html_title_is_redacted() -> None:
    page = f"<html><title>denied {REFRESH_TOKEN}</title></html>".encode()
    outcome = failure(respond(403, raw=page, headers={}, secrets=(REFRESH_TOKEN,)))
    assert outcome.description == "denied [redacted]"


# --- properties -------------------------------------------------------------------------

statuses = st.integers(min_value=100, max_value=999)
header_maps = st.dictionaries(
    st.sampled_from(["Retry-After", "retry-after", "Content-Type", "X-Other"]),
    st.text(max_size=40),
    max_size=3,
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3)
    ),
    max_leaves=8,
)
token_bodies = st.fixed_dictionaries(
    {},
    optional={
        "access_token": json_values,
        "token_type": json_values,
        "expires_in": json_values,
        "refresh_token": json_values,
        "scope": json_values,
        "error": st.sampled_from(["invalid_grant", "invalid_client", "x y"]) | json_values,
        "error_description": json_values,
    },
).map(lambda body: json.dumps(body).encode())
secret_text = st.text(
    alphabet="ABCDEFGHJKLMNPQRSTUVWXYZabcdefghjkmnpqrstuvwxyz23456789-_", min_size=16, max_size=40
)


def check_failure_bounds(outcome: TokenFailure) -> None:
    assert isinstance(outcome.kind, FailureKind)
    assert 1 <= len(outcome.reason) <= 64
    assert outcome.description is None or len(outcome.description) <= MAX_DESCRIPTION_CHARS
    assert outcome.retry_after is None or 0.0 <= outcome.retry_after <= MAX_RETRY_AFTER_SECONDS


@settings(max_examples=300)
@given(statuses, header_maps, st.binary(max_size=2048) | token_bodies, st.booleans())
def test_any_response_is_classified_without_raising(
    status: int, headers: dict[str, str], body: bytes, truncated: bool
) -> None:
    outcome = classify_response(status, headers, body, now=NOW, truncated=truncated)
    if isinstance(outcome, TokenFailure):
        check_failure_bounds(outcome)
    else:
        assert 200 <= status < 300
        assert outcome.access_token


@settings(max_examples=200)
@given(statuses, secret_text, st.text(max_size=60), st.text(max_size=60))
def test_an_echoed_secret_never_reaches_the_failure(
    status: int, secret: str, before: str, after: str
) -> None:
    body = json.dumps({"error": "invalid_grant", "error_description": before + secret + after})
    outcome = classify_response(status, JSON, body.encode(), now=NOW, secrets=(secret,))
    assert isinstance(outcome, TokenFailure)
    assert secret not in repr(outcome)
    assert secret not in outcome.summary()


# --- transport errors -----------------------------------------------------------------

REQUEST = httpx.Request("POST", "https://idp.example/token")


@pytest.mark.parametrize(
    ("exc", "reason", "sent"),
    [
        (
            httpx.ConnectError("[Errno 111] Connection refused", request=REQUEST),
            "connect_error",
            False,
        ),
        (httpx.ConnectTimeout("timed out", request=REQUEST), "timeout", False),
        (httpx.PoolTimeout("timed out", request=REQUEST), "timeout", False),
        (httpx.ReadTimeout("timed out", request=REQUEST), "timeout", True),
        (httpx.WriteTimeout("timed out", request=REQUEST), "timeout", True),
        (httpx.ReadError("reset by peer", request=REQUEST), "connection_lost", True),
        (httpx.WriteError("broken pipe", request=REQUEST), "connection_lost", True),
        (
            httpx.RemoteProtocolError("Server disconnected", request=REQUEST),
            "connection_lost",
            True,
        ),
        (TimeoutError(), "timeout", True),
        (OSError("weird"), "network_error", True),
    ],
)
def test_transport_errors(exc: Exception, reason: str, sent: bool) -> None:
    outcome = classify_transport_error(exc)
    assert (outcome.kind, outcome.reason, outcome.request_sent, outcome.status) == (
        FailureKind.TRANSIENT,
        reason,
        sent,
        None,
    )


def test_total_deadline_before_the_request_was_sent() -> None:
    outcome = classify_transport_error(TimeoutError(), request_sent=False)
    assert (outcome.reason, outcome.request_sent) == ("timeout", False)


def test_local_protocol_error_message_is_never_shown() -> None:
    exc = httpx.LocalProtocolError("Illegal header value b'Basic c2VjcmV0'")
    outcome = classify_transport_error(exc)
    assert outcome.kind is FailureKind.PROVIDER_PERMANENT
    assert "c2VjcmV0" not in repr(outcome)


def test_transport_error_text_is_scrubbed() -> None:
    outcome = classify_transport_error(OSError(f"bad {CLIENT_SECRET}"), secrets=(CLIENT_SECRET,))
    assert CLIENT_SECRET not in repr(outcome)


# --- client authentication -----------------------------------------------------------


def test_basic_authorization_form_encodes_before_base64() -> None:
    header = basic_authorization("cc client", "s3cr:et/+&%=")
    assert header.startswith("Basic ")
    decoded = base64.b64decode(header.removeprefix("Basic ")).decode()
    assert decoded == "cc+client:s3cr%3Aet%2F%2B%26%25%3D"
    # For servers that do not decode (basic_auth_encoding: raw): as is.
    raw = basic_authorization("cc client", "s3cr:et/+&%=", form_encode=False)
    assert base64.b64decode(raw.removeprefix("Basic ")).decode() == "cc client:s3cr:et/+&%="


def test_basic_credentials() -> None:
    auth = ClientAuth("client_secret_basic", "basic-client", client_secret=CLIENT_SECRET)
    credentials = auth.credentials("https://idp.example/token", NOW)
    assert credentials.form == {}
    assert credentials.headers == {
        "Authorization": basic_authorization("basic-client", CLIENT_SECRET)
    }
    assert CLIENT_SECRET in credentials.secrets
    assert CLIENT_SECRET not in repr(auth) + repr(credentials)


def test_post_credentials() -> None:
    auth = ClientAuth("client_secret_post", "post-client", client_secret=CLIENT_SECRET)
    credentials = auth.credentials("https://idp.example/token", NOW)
    assert credentials.headers == {}
    assert credentials.form == {"client_id": "post-client", "client_secret": CLIENT_SECRET}


def test_none_credentials() -> None:
    credentials = ClientAuth("none", "public-client").credentials("https://x/token", NOW)
    assert (credentials.headers, credentials.form, credentials.secrets) == (
        {},
        {"client_id": "public-client"},
        (),
    )


@pytest.mark.parametrize("algorithm", ["ES256", "RS256"])
def test_client_assertion_claims(algorithm: str) -> None:
    private: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = (
        ec.generate_private_key(ec.SECP256R1())
        if algorithm == "ES256"
        else rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    key = SigningKey(private, "ES256" if algorithm == "ES256" else "RS256", "kid-1")
    auth = ClientAuth("private_key_jwt", "jwt-client", signing_key=key)
    now = time.time()
    first = auth.credentials("https://idp.example/token", now)
    second = auth.credentials("https://idp.example/token", now)
    assert first.form["client_id"] == "jwt-client"
    assert first.form["client_assertion_type"] == JWT_BEARER_ASSERTION
    assertion = first.form["client_assertion"]
    assert assertion in first.secrets
    assert jwt.get_unverified_header(assertion)["kid"] == "kid-1"
    claims = jwt.decode(
        assertion,
        private.public_key(),
        algorithms=[algorithm],
        audience="https://idp.example/token",
        issuer="jwt-client",
    )
    assert claims["sub"] == "jwt-client"
    assert claims["exp"] - claims["iat"] == 60
    assert claims["iat"] == int(now)
    other = jwt.decode(second.form["client_assertion"], options={"verify_signature": False})
    assert claims["jti"] != other["jti"]


def test_client_assertion_without_kid_has_no_kid_header() -> None:
    key = SigningKey(ec.generate_private_key(ec.SECP256R1()), "ES256")
    assertion = client_assertion("c", "https://x/token", key, NOW)
    assert "kid" not in jwt.get_unverified_header(assertion)
    assert "key=" not in repr(key)


# --- discovery documents ---------------------------------------------------------------


def test_discovery_url() -> None:
    assert discovery_url("https://idp.example/realms/a/") == (
        "https://idp.example/realms/a/.well-known/openid-configuration"
    )


def test_token_endpoint_from_metadata() -> None:
    body = json.dumps({"issuer": "https://idp.example", "token_endpoint": "https://idp.example/t"})
    assert token_endpoint_from_metadata(body.encode(), "https://idp.example") == (
        "https://idp.example/t"
    )


def test_http_issuer_may_have_an_http_token_endpoint() -> None:
    body = json.dumps({"token_endpoint": "http://127.0.0.1:9/token"}).encode()
    assert token_endpoint_from_metadata(body, "http://127.0.0.1:9") == "http://127.0.0.1:9/token"


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b"{}",
        b'{"token_endpoint": 5}',
        b'{"token_endpoint": ""}',
        # credentials may not be downgraded to plain HTTP
        b'{"token_endpoint": "http://idp.example/token"}',
        b'{"token_endpoint": "file:///etc/passwd"}',
        b'{"token_endpoint": "https://"}',
    ],
)
def test_unusable_metadata(body: bytes) -> None:
    with pytest.raises(DiscoveryError, match=r"https://idp\.example"):
        token_endpoint_from_metadata(body, "https://idp.example")


@pytest.mark.parametrize(
    ("fields", "expected", "noted"),
    [
        ({"refresh_expires_in": 1800}, 1800.0, False),  # Keycloak
        ({"refresh_token_expires_in": "15897600"}, 15897600.0, False),  # GitHub apps
        ({"refresh_expires_in": 0}, None, False),  # Keycloak offline token: no expiry
        ({"refresh_expires_in": "0"}, None, False),
        ({"refresh_expires_in": -5}, None, True),
        ({"refresh_expires_in": "soon"}, None, True),
        ({"refresh_expires_in": True}, None, True),
        ({"refresh_expires_in": [60]}, None, True),
        ({"refresh_expires_in": 1e12}, None, True),  # beyond ten years: noise
        ({"refresh_token_expires_in": 60, "refresh_expires_in": 90}, 60.0, False),
        ({}, None, False),
    ],
)
def test_refresh_token_lifetime_is_read_defensively(
    fields: dict[str, object], expected: float | None, noted: bool
) -> None:
    parsed = token(respond(200, {"access_token": "a", "expires_in": 60, **fields}))
    assert parsed.refresh_expires_in == expected
    assert parsed.access_token == "a" and parsed.expires_in == 60.0
    assert any("expires_in" in note and "ignored" in note for note in parsed.notes) == noted


def test_a_huge_refresh_lifetime_json_number_is_ignored() -> None:
    raw = b'{"access_token": "a", "refresh_expires_in": 1' + b"0" * 400 + b"}"
    parsed = token(respond(200, raw=raw))
    assert parsed.refresh_expires_in is None and parsed.access_token == "a"
