"""Reading a token endpoint's answer: pure functions from (status, headers, body) or a
transport exception to an Outcome.

Nothing here does I/O or keeps state, so every rule can be tested on bytes alone. The
rules are tolerant of what real identity providers send (numeric strings, odd casing,
HTML error pages) and strict about what leaves this module: every text is bounded,
free of control characters and scrubbed of the secrets the caller names.
"""

from __future__ import annotations

import html
import json
import math
import re
import unicodedata
from collections.abc import Iterable, Mapping
from datetime import UTC
from email.utils import parsedate_to_datetime
from urllib.parse import quote, quote_plus

import httpx

from tokend.oauth._outcome import FailureKind, Outcome, TokenFailure, TokenResponse

MAX_BODY_BYTES = 256 * 1024
MAX_DESCRIPTION_CHARS = 200
MAX_RETRY_AFTER_SECONDS = 3600.0
# Longest an access token is believed to live: an expires_in beyond it (1e12, say) is
# taken as this, and the adjustment reported. Past a year, an IdP's number is noise,
# and far enough ahead it is not even a date.
MAX_EXPIRES_IN_SECONDS = 365 * 24 * 3600.0
# Longest a refresh token is believed to live by the IdP's word: beyond ten years a
# number is noise, and a deadline made of it would mislead; it is ignored instead.
MAX_REFRESH_EXPIRES_IN_SECONDS = 10 * 365 * 24 * 3600.0
# Where IdPs say how long the refresh token lives: GitHub apps and Google (testing
# mode) send refresh_token_expires_in, Keycloak refresh_expires_in.
REFRESH_EXPIRES_IN_FIELDS = ("refresh_token_expires_in", "refresh_expires_in")
# Bounds on what is kept of a token response. Real tokens are at most a few KiB
# (large JWTs ~8 KiB); the scope is a handful of words.
MAX_TOKEN_CHARS = 32 * 1024
MAX_TOKEN_TYPE_CHARS = 64
MAX_SCOPE_CHARS = 4096
REDACTED = "[redacted]"
INVALID_ERROR_CODE = "invalid_error_code"

_ERROR_CODE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# RFC 6749 7.1/A.13 type-name, and A.4 scope-token (with the space between tokens).
_TOKEN_TYPE = re.compile(r"[A-Za-z0-9_.-]+", re.ASCII)
_SCOPE = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+(?: [\x21\x23-\x5b\x5d-\x7e]+)*", re.ASCII)
# Tokens go into HTTP headers and files: visible ASCII only (RFC 6750 b64token is a
# subset; some IdPs use other visible characters).
_TOKEN_CHARS = re.compile(r"[\x21-\x7e]+", re.ASCII)
_DELTA_SECONDS = re.compile(r"[+-]?\d{1,12}(?:\.\d{1,9})?", re.ASCII)
_HTML_START = re.compile(rb"\s*(?:<!doctype\s+html|<html|<head|<body|<title)", re.IGNORECASE)
_TITLE_WINDOW_BYTES = 64 * 1024
_WHITESPACE = re.compile(r"\s+")
# Unicode categories that would let an IdP break or spoof a log line: control
# characters, format characters (bidi overrides, zero-width), line/paragraph separators.
_UNPRINTABLE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})

# RFC 6749 5.2 codes that condemn the grant this account holds, and expired_token,
# which some IdPs send instead of invalid_grant for a refresh token past its lifetime.
_ACCOUNT_CODES = frozenset({"invalid_grant", "invalid_scope", "expired_token"})
# Codes that condemn this client's registration or credentials.
_CLIENT_CODES = frozenset({"invalid_client", "unauthorized_client"})
# Codes some IdPs return (with a 400) when they are the ones in trouble.
_TRANSIENT_CODES = frozenset({"server_error", "temporarily_unavailable"})
_RATE_LIMIT_CODES = frozenset({"slow_down"})
# 4xx statuses that say "try again later" rather than "your request is wrong".
_TRANSIENT_4XX = frozenset({408, 409, 425})


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP-date).

    ``now`` is the current unix time, against which a date is measured. The result is
    clamped to [0, 3600]; an unreadable value gives None.
    """
    if value is None:
        return None
    text = value.strip()
    if _DELTA_SECONDS.fullmatch(text):
        return _clamp_wait(float(text))
    try:
        when = parsedate_to_datetime(text)
        if when.tzinfo is None:
            # RFC 5322 "-0000" means UTC with no claim about local time.
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - now
    except (ValueError, TypeError, IndexError, OverflowError):
        return None
    return _clamp_wait(seconds)


def _clamp_wait(seconds: float) -> float | None:
    if math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS)


def redaction_variants(secrets: Iterable[str | None]) -> tuple[str, ...]:
    """Each secret as an IdP might echo it: raw, form-encoded and percent-encoded.

    Longest first, so a longer secret is scrubbed before a shorter one inside it.
    """
    variants: set[str] = set()
    for secret in secrets:
        if secret:
            variants.update({secret, quote_plus(secret, safe=""), quote(secret, safe="")})
    return tuple(sorted(variants, key=len, reverse=True))


def scrub(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every occurrence of every secret replaced by "[redacted]"."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text


def clean_text(value: object, secrets: Iterable[str] = ()) -> str | None:
    """A bounded, printable, secret-free rendering of an IdP-supplied text, or None."""
    if not isinstance(value, str):
        return None
    secrets = tuple(secrets)
    # Scrub before and after removing control characters: a secret may arrive whole,
    # or split by characters that are about to disappear.
    text = scrub(value, secrets)
    text = "".join(
        ch
        for ch in _WHITESPACE.sub(" ", text)
        if unicodedata.category(ch) not in _UNPRINTABLE_CATEGORIES
    )
    text = scrub(text, secrets).strip()
    # Truncate last, so a secret can never be cut to a prefix that escapes the scrub.
    text = text[:MAX_DESCRIPTION_CHARS].rstrip()
    return text or None


def clean_error_code(value: object, secrets: Iterable[str] = ()) -> str | None:
    """The RFC 6749 ``error`` code if it is one, "invalid_error_code" if it is not, or
    None when there is no error code at all."""
    if value is None:
        return None
    if not isinstance(value, str) or not _ERROR_CODE.fullmatch(value):
        return INVALID_ERROR_CODE
    if any(secret and secret in value for secret in secrets):
        return INVALID_ERROR_CODE
    return value


def parse_expires_in(value: object) -> float | None:
    """``expires_in`` as seconds: an int, a float or a numeric string; None when missing,
    unreadable, not finite or not positive. Not bounded: see :func:`parse_token_fields`."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float):
        seconds = value
    elif isinstance(value, int):
        # JSON integers are unbounded; one beyond float range means nothing usable.
        seconds = float(value) if abs(value) < 10**300 else math.inf
    elif isinstance(value, str) and _DELTA_SECONDS.fullmatch(value.strip()):
        seconds = float(value.strip())
    else:
        return None
    if not math.isfinite(seconds) or seconds <= 0:
        return None
    return seconds


class UnusableField(ValueError):
    """A field of a 2xx token response that cannot be used; the message says which and
    why, never quoting the value (it may be a secret)."""


def _parse_token_type(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        return "Bearer"
    # Spaces around it are harmless; any other whitespace is a character too many.
    token_type = value.strip(" ")
    if len(token_type) > MAX_TOKEN_TYPE_CHARS or not _TOKEN_TYPE.fullmatch(token_type):
        # It is written next to the token, in Authorization headers among others: a
        # CR or LF there would let the IdP add headers of its own.
        raise UnusableField(
            "token_type is not a token type name (letters, digits, '-', '.', '_'; "
            f"at most {MAX_TOKEN_TYPE_CHARS})"
        )
    # RFC 6750 says the type is case-insensitive; consumers compare it literally.
    return "Bearer" if token_type.lower() == "bearer" else token_type


def _parse_scope(value: object) -> str | None:
    if isinstance(value, str):
        scope = value.strip(" ")
    elif isinstance(value, list) and all(isinstance(item, str) for item in value):
        # A few IdPs send a JSON array instead of the space-delimited string.
        scope = " ".join(item for item in value if item)
    else:
        return None
    if not scope:
        return None
    if len(scope) > MAX_SCOPE_CHARS or not _SCOPE.fullmatch(scope):
        raise UnusableField(
            "scope is not a list of scope tokens (visible ASCII without '\"' or '\\', "
            f"separated by single spaces; at most {MAX_SCOPE_CHARS} characters)"
        )
    return scope


def _check_token(name: str, value: str) -> str:
    if len(value) > MAX_TOKEN_CHARS:
        raise UnusableField(f"{name} is longer than {MAX_TOKEN_CHARS} characters")
    if not _TOKEN_CHARS.fullmatch(value):
        # A control character or space in a token would break the headers and files
        # of whoever uses it.
        raise UnusableField(f"{name} holds characters other than visible ASCII")
    return value


def parse_token_fields(document: Mapping[str, object]) -> TokenResponse | None:
    """A TokenResponse from a decoded token response, or None without an
    ``access_token``. Raises :class:`UnusableField` for a field present but unusable.

    expires_in beyond :data:`MAX_EXPIRES_IN_SECONDS` is clamped to it, and a present
    but unreadable one is treated as missing; both are reported in ``notes``."""
    access_token = document.get("access_token")
    if not isinstance(access_token, str) or not access_token.strip():
        return None
    _check_token("access_token", access_token)
    refresh_token = document.get("refresh_token")
    if not isinstance(refresh_token, str) or not refresh_token:
        refresh_token = None
    else:
        _check_token("refresh_token", refresh_token)
    token_type = _parse_token_type(document.get("token_type"))
    scope = _parse_scope(document.get("scope"))
    notes: list[str] = []
    raw_expires_in = document.get("expires_in")
    expires_in = parse_expires_in(raw_expires_in)
    if expires_in is None and raw_expires_in is not None:
        notes.append(
            "expires_in is not a positive number of seconds; the provider's "
            "default_lifetime applies"
        )
    elif expires_in is not None and expires_in > MAX_EXPIRES_IN_SECONDS:
        notes.append(
            f"expires_in {expires_in:.6g} s is beyond one year; taken as one year "
            f"({MAX_EXPIRES_IN_SECONDS:.0f} s)"
        )
        expires_in = MAX_EXPIRES_IN_SECONDS
    return TokenResponse(
        access_token=access_token,
        token_type=token_type,
        expires_in=expires_in,
        refresh_token=refresh_token,
        scope=scope,
        refresh_expires_in=_refresh_expires_in(document, notes),
        notes=tuple(notes),
    )


def _usable_refresh_token(document: Mapping[str, object]) -> str | None:
    value = document.get("refresh_token")
    if not isinstance(value, str) or not value:
        return None
    try:
        return _check_token("refresh_token", value)
    except UnusableField:
        return None


def _refresh_expires_in(document: Mapping[str, object], notes: list[str]) -> float | None:
    """The refresh token's lifetime the IdP reports, or None. Never fails the response:
    a value that makes no sense is left out, and why goes into ``notes``. Keycloak
    sends 0 for an offline token that never expires: no lifetime, and no note."""
    for name in REFRESH_EXPIRES_IN_FIELDS:
        raw = document.get(name)
        if raw is None:
            continue
        zero = raw == 0 or (isinstance(raw, str) and raw.strip() == "0")
        if zero and not isinstance(raw, bool):
            return None
        seconds = parse_expires_in(raw)
        if seconds is None:
            notes.append(f"{name} is not a positive number of seconds; ignored")
            return None
        if seconds > MAX_REFRESH_EXPIRES_IN_SECONDS:
            notes.append(f"{name} {seconds:.6g} s is beyond ten years; ignored")
            return None
        return seconds
    return None


def decode_json_object(body: bytes) -> dict[str, object] | None:
    """The body as a JSON object, or None when it is not one."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        # ValueError covers bad JSON, bad UTF-8 and over-long integers; RecursionError
        # covers a body of 256 KiB of "[".
        return None
    return document if isinstance(document, dict) else None


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is not None:
        return value
    for key, candidate in headers.items():
        if key.lower() == name:
            return candidate
    return None


def looks_like_html(headers: Mapping[str, str], body: bytes) -> bool:
    content_type = (_header(headers, "content-type") or "").lower()
    if "html" in content_type:
        return True
    head = body[:1024].removeprefix(b"\xef\xbb\xbf")
    return _HTML_START.match(head) is not None


def html_title(body: bytes) -> str | None:
    """The text of an HTML page's <title>, if it has one."""
    # Plain searches rather than a regex: a lazy ".*?" over 256 KiB of "<title>"
    # repeated would take quadratic time.
    lowered = body[:_TITLE_WINDOW_BYTES].lower()
    start = lowered.find(b"<title")
    if start < 0 or lowered[start + 6 : start + 7] not in (b">", b" ", b"\t", b"\r", b"\n"):
        return None
    opening_end = lowered.find(b">", start)
    closing = lowered.find(b"</title", opening_end)
    if opening_end < 0 or closing < 0:
        return None
    raw = body[opening_end + 1 : closing]
    return html.unescape(raw.decode("utf-8", errors="replace"))


def classify_response(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    now: float,
    truncated: bool = False,
    secrets: Iterable[str] = (),
) -> Outcome:
    """What a token endpoint's HTTP response means.

    ``now`` (unix seconds) anchors a Retry-After date. ``truncated`` says the body was
    cut at the size cap. ``secrets`` are the values sent with the request (refresh
    token, client secret, assertion): any echo of them in the IdP's text is redacted.
    """
    secrets = redaction_variants(secrets)
    document = None if truncated else decode_json_object(body)
    if 200 <= status < 300:
        if truncated:
            return TokenFailure(FailureKind.TRANSIENT, "response_too_large", status=status)
        if document is None:
            return TokenFailure(FailureKind.TRANSIENT, "invalid_json", status=status)
        try:
            token = parse_token_fields(document)
        except UnusableField as exc:
            # Transient with a 2xx status: the IdP may have rotated the refresh token in
            # this answer. If that token is usable, it is kept (the old one is spent);
            # if not, the policy treats the answer as a response that was lost.
            rotated = _usable_refresh_token(document)
            description = str(exc)
            if rotated is not None:
                description += "; the refresh token was kept"
            return TokenFailure(
                FailureKind.TRANSIENT,
                "invalid_token_response",
                status=status,
                description=description,
                rotated_refresh_token=rotated,
            )
        if token is not None:
            return token
        return _classify_success_without_token(status, document, secrets)
    return _classify_error(status, headers, body, document, now=now, secrets=secrets)


def _classify_success_without_token(
    status: int, document: Mapping[str, object], secrets: tuple[str, ...]
) -> TokenFailure:
    # Some IdPs report errors with a 200 and an RFC 6749 error body. Only codes whose
    # meaning is unambiguous are trusted here; anything else is a broken response.
    code = clean_error_code(document.get("error"), secrets)
    description = clean_text(document.get("error_description"), secrets)
    if code is not None and code != INVALID_ERROR_CODE:
        kind = _kind_for_code(code)
        if kind is not None:
            return TokenFailure(kind, code, status=status, description=description)
    return TokenFailure(
        FailureKind.TRANSIENT, "invalid_token_response", status=status, description=description
    )


def _kind_for_code(code: str) -> FailureKind | None:
    if code in _ACCOUNT_CODES:
        return FailureKind.ACCOUNT_PERMANENT
    if code in _CLIENT_CODES:
        return FailureKind.PROVIDER_PERMANENT
    if code in _TRANSIENT_CODES:
        return FailureKind.TRANSIENT
    if code in _RATE_LIMIT_CODES:
        return FailureKind.RATE_LIMITED
    return None


def _classify_error(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    document: Mapping[str, object] | None,
    *,
    now: float,
    secrets: tuple[str, ...],
) -> TokenFailure:
    """A non-2xx response as a TokenFailure. ``document`` is the body as a JSON object,
    when it is one."""
    retry_after = parse_retry_after(_header(headers, "retry-after"), now)
    code: str | None = None
    description: str | None = None
    html_page = False
    if document is not None:
        code = clean_error_code(document.get("error"), secrets)
        description = clean_text(document.get("error_description"), secrets)
    elif looks_like_html(headers, body):
        html_page = True
        description = clean_text(html_title(body), secrets)
    elif 300 <= status < 400 and (location := _header(headers, "location")):
        description = clean_text(f"redirected to {location}", secrets)
    by_status = f"http_{status}"
    reason = code or by_status

    def failure(kind: FailureKind, why: str = reason) -> TokenFailure:
        return TokenFailure(
            kind, why, status=status, description=description, retry_after=retry_after
        )

    # Status first where the status alone decides (and so names the reason): a 5xx is
    # the IdP's trouble whatever its body claims, and a 403 is a firewall's verdict
    # more often than the IdP's.
    if status == 429:
        return failure(FailureKind.RATE_LIMITED, by_status)
    if status == 503 and retry_after is not None:
        return failure(FailureKind.RATE_LIMITED, by_status)
    if status >= 500:
        return failure(FailureKind.TRANSIENT, by_status)
    if status == 403:
        return failure(FailureKind.BLOCKED, "html_block_page" if html_page else reason)
    if code is not None and code != INVALID_ERROR_CODE:
        kind = _kind_for_code(code)
        if kind is not None:
            return failure(kind)
    if status in _TRANSIENT_4XX or status < 300:
        return failure(FailureKind.TRANSIENT)
    # Any other 4xx (invalid_request, unsupported_grant_type, 401, 404, 405, ...) and
    # any redirect (the token endpoint URL is wrong) will not cure itself: the
    # provider's configuration needs fixing.
    return failure(FailureKind.PROVIDER_PERMANENT)


def classify_transport_error(
    exc: BaseException, *, request_sent: bool | None = None, secrets: Iterable[str] = ()
) -> TokenFailure:
    """A failure to get any response at all.

    ``request_sent`` is what the caller observed of the request's progress, None when
    it could not tell; it only matters where the exception type does not decide.
    """
    sent = True if request_sent is None else request_sent
    if isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout):
        return _network_failure("timeout", exc, sent=False, secrets=secrets)
    if isinstance(exc, httpx.TimeoutException | TimeoutError):
        return _network_failure("timeout", exc, sent=sent, secrets=secrets)
    if isinstance(exc, httpx.ConnectError):
        return _network_failure("connect_error", exc, sent=False, secrets=secrets)
    if isinstance(exc, httpx.ProxyError):
        return _network_failure("proxy_error", exc, sent=False, secrets=secrets)
    if isinstance(exc, httpx.ReadError | httpx.WriteError | httpx.RemoteProtocolError):
        return _network_failure("connection_lost", exc, sent=True, secrets=secrets)
    if isinstance(exc, httpx.LocalProtocolError):
        # Its message may quote a header value, the Authorization header included.
        return TokenFailure(
            FailureKind.PROVIDER_PERMANENT,
            "invalid_request_built",
            description=type(exc).__name__,
            request_sent=sent,
        )
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
        return _network_failure(
            "invalid_url", exc, sent=False, secrets=secrets, kind=FailureKind.PROVIDER_PERMANENT
        )
    if isinstance(exc, httpx.DecodingError):
        return _network_failure("invalid_encoding", exc, sent=True, secrets=secrets)
    return _network_failure("network_error", exc, sent=sent, secrets=secrets)


def _network_failure(
    reason: str,
    exc: BaseException,
    *,
    sent: bool,
    secrets: Iterable[str],
    kind: FailureKind = FailureKind.TRANSIENT,
) -> TokenFailure:
    message = str(exc)
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return TokenFailure(
        kind,
        reason,
        description=clean_text(text, redaction_variants(secrets)),
        request_sent=sent,
    )
