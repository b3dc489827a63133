"""Signing in: the pieces of the authorization code grant with PKCE (RFC 6749 4.1,
RFC 7636, RFC 8252 for native apps) and the device authorization grant (RFC 8628)
that involve no I/O.

Nothing here sends a request or reads a clock; the caller does both.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

from tokend.oauth._outcome import FailureKind, Outcome, TokenFailure, TokenResponse
from tokend.oauth._parse import clean_error_code, clean_text, decode_json_object, parse_expires_in

DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
# RFC 8628 3.2: the interval to use when the server names none; 3.5: slow_down adds 5 s.
DEFAULT_DEVICE_INTERVAL = 5.0
SLOW_DOWN_STEP = 5.0
# A server asking for more than this between polls is ignored beyond it: a user is
# typing the code while tokend waits.
MAX_DEVICE_INTERVAL = 60.0
# Bounds on how long a device code is waited for, whatever the server says.
DEFAULT_DEVICE_EXPIRES_IN = 600.0
MAX_DEVICE_EXPIRES_IN = 3600.0


class AuthorizationError(Exception):
    """Signing in failed; the message says why (never quoting a secret)."""


# -- PKCE (RFC 7636) -------------------------------------------------------------------


def make_code_verifier() -> str:
    """A fresh code verifier: 43 characters from 32 random bytes (RFC 7636 4.1)."""
    return secrets.token_urlsafe(32)


def code_challenge_s256(verifier: str) -> str:
    """BASE64URL(SHA256(verifier)) without padding (RFC 7636 4.2)."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


@dataclass(frozen=True, slots=True)
class AuthorizationRequest:
    """One authorization request: the URL to open and what the answer must match."""

    url: str
    redirect_uri: str
    state: str = field(repr=False)
    code_verifier: str = field(repr=False)


def authorization_request(
    endpoint: str,
    *,
    client_id: str,
    redirect_uri: str,
    scope: str | None,
    extra: Mapping[str, str] | None = None,
) -> AuthorizationRequest:
    """The URL that starts the authorization code grant with PKCE S256 and a fresh
    ``state`` (CSRF protection for the redirect, RFC 6749 10.12)."""
    verifier = make_code_verifier()
    state = secrets.token_urlsafe(24)
    params = dict(extra or {})
    # Ours last: extra parameters cannot replace what the grant's safety rests on.
    params.update(
        response_type="code",
        client_id=client_id,
        redirect_uri=redirect_uri,
        state=state,
        code_challenge=code_challenge_s256(verifier),
        code_challenge_method="S256",
    )
    if scope:
        params["scope"] = scope
    parts = urlsplit(endpoint)
    query = f"{parts.query}&{urlencode(params)}" if parts.query else urlencode(params)
    url = urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))
    return AuthorizationRequest(url, redirect_uri, state, verifier)


def code_from_redirect(query: str, expected_state: str, expected_issuer: str | None = None) -> str:
    """The authorization code from the redirect's query string; raises
    AuthorizationError for an error answer, a wrong ``state`` or ``iss`` (RFC 9207:
    an answer from another issuer, the mix-up attack), or no code."""
    params = parse_qs(query, keep_blank_values=True)

    def one(name: str) -> str | None:
        values = params.get(name)
        return values[0] if values else None

    if not secrets.compare_digest((one("state") or "").encode(), expected_state.encode()):
        raise AuthorizationError(
            "the redirect carried a different state than this sign-in sent: it belongs to "
            "another sign-in (or a forged request); nothing was accepted"
        )
    issuer = one("iss")
    if (
        issuer is not None
        and expected_issuer is not None
        and issuer.rstrip("/") != expected_issuer.rstrip("/")
    ):
        raise AuthorizationError(
            "the redirect names another issuer than the one this sign-in went to; "
            "nothing was accepted"
        )
    error = one("error")
    if error is not None:
        code = clean_error_code(error) or "error"
        description = clean_text(one("error_description"))
        raise AuthorizationError(
            f"the identity provider refused: {code}" + (f": {description}" if description else "")
        )
    auth_code = one("code")
    if not auth_code:
        raise AuthorizationError("the redirect carried no authorization code")
    return auth_code


# -- the device authorization grant (RFC 8628) --------------------------------------------


@dataclass(frozen=True, slots=True)
class DeviceAuthorization:
    """The device authorization response (RFC 8628 3.2)."""

    device_code: str = field(repr=False)
    user_code: str
    verification_uri: str
    verification_uri_complete: str | None
    expires_in: float
    interval: float


def parse_device_authorization(status: int, body: bytes) -> DeviceAuthorization:
    """The device authorization response; raises AuthorizationError saying what is wrong."""
    document = decode_json_object(body)
    if status != 200 or document is None:
        detail = ""
        if document is not None:
            code = clean_error_code(document.get("error"))
            description = clean_text(document.get("error_description"))
            detail = f": {code}" if code else ""
            detail += f": {description}" if description else ""
        raise AuthorizationError(
            f"the device authorization endpoint answered HTTP {status}{detail}"
            if status != 200 or detail
            else "the device authorization endpoint's answer is not a JSON object"
        )
    device_code = document.get("device_code")
    user_code = clean_text(document.get("user_code"))
    uri = _https_or_loopback(document.get("verification_uri") or document.get("verification_url"))
    if not isinstance(device_code, str) or not device_code or user_code is None or uri is None:
        raise AuthorizationError(
            "the device authorization response lacks device_code, user_code or a usable "
            "verification_uri"
        )
    complete = _https_or_loopback(document.get("verification_uri_complete"))
    expires_in = parse_expires_in(document.get("expires_in")) or DEFAULT_DEVICE_EXPIRES_IN
    interval = parse_expires_in(document.get("interval")) or DEFAULT_DEVICE_INTERVAL
    return DeviceAuthorization(
        device_code=device_code,
        user_code=user_code,
        verification_uri=uri,
        verification_uri_complete=complete,
        expires_in=min(expires_in, MAX_DEVICE_EXPIRES_IN),
        interval=min(interval, MAX_DEVICE_INTERVAL),
    )


def _https_or_loopback(value: object) -> str | None:
    """A URL worth showing a user: https, or http on a loopback address."""
    text = clean_text(value)
    if text is None:
        return None
    parts = urlsplit(text)
    if parts.scheme == "https" and parts.hostname:
        return text
    if parts.scheme == "http" and parts.hostname in ("127.0.0.1", "::1", "localhost"):
        return text
    return None


@dataclass(frozen=True, slots=True)
class PollAgain:
    """Not yet: poll again after ``interval`` seconds."""

    interval: float


def device_poll_step(outcome: Outcome, interval: float) -> TokenResponse | PollAgain:
    """What one poll of the token endpoint (RFC 8628 3.4) means for the next one.

    ``interval`` is the current polling interval. Raises AuthorizationError when
    the sign-in is over without a token (denied, expired, or a failure that waiting
    will not cure)."""
    if isinstance(outcome, TokenResponse):
        return outcome
    reason = outcome.reason
    if reason == "authorization_pending":
        return PollAgain(interval)
    if reason == "slow_down":
        return PollAgain(min(interval + SLOW_DOWN_STEP, MAX_DEVICE_INTERVAL))
    if reason == "access_denied":
        raise AuthorizationError("the sign-in was declined at the identity provider")
    if reason == "expired_token":
        raise AuthorizationError(
            "the code expired before the sign-in was completed; run tokend login again"
        )
    if outcome.kind in (FailureKind.TRANSIENT, FailureKind.RATE_LIMITED):
        # RFC 8628 3.5 asks clients to back off on connection timeouts too.
        wait = max(interval * 2, outcome.retry_after or 0.0)
        return PollAgain(min(wait, MAX_DEVICE_INTERVAL))
    raise AuthorizationError(f"the token endpoint refused the device code: {outcome.summary()}")


def token_with_refresh(outcome: Outcome, what: str) -> TokenResponse:
    """The token response of a sign-in, which must carry a refresh token; raises
    AuthorizationError otherwise."""
    if isinstance(outcome, TokenFailure):
        raise AuthorizationError(f"{what} failed: {outcome.summary()}")
    if outcome.refresh_token is None:
        raise AuthorizationError(
            f"{what} gave an access token but no refresh token: the client may lack the "
            "refresh_token grant, or the request the offline_access scope (or the "
            "provider's equivalent, e.g. access_type=offline)"
        )
    return outcome
