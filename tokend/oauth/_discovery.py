"""OpenID Connect discovery of the token endpoint (and the other endpoints sign-in and
revocation use), fetched once and shared."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import anyio
import httpx

from tokend.oauth._http import read_capped
from tokend.oauth._parse import clean_text, decode_json_object

WELL_KNOWN_PATH = "/.well-known/openid-configuration"
_VISIBLE = re.compile(r"[\x21-\x7e]+")


class DiscoveryError(Exception):
    """The issuer's discovery document could not be fetched or has no usable
    token_endpoint."""


def discovery_url(issuer: str) -> str:
    """Where an issuer publishes its metadata (OIDC Discovery 4)."""
    return issuer.rstrip("/") + WELL_KNOWN_PATH


def token_endpoint_from_metadata(body: bytes, issuer: str) -> str:
    """The token_endpoint of a discovery document; raises DiscoveryError."""
    return endpoints_from_metadata(body, issuer).token_endpoint


# Endpoints tokend may use besides the token endpoint: sign-in (RFC 6749 4.1, RFC 8628)
# and revocation (RFC 7009).
OPTIONAL_ENDPOINTS = (
    "authorization_endpoint",
    "device_authorization_endpoint",
    "revocation_endpoint",
)


@dataclass(frozen=True, slots=True)
class Endpoints:
    token_endpoint: str
    # The optional endpoints the document names usably, by metadata name...
    optional: dict[str, str]
    # ...and why the others it names cannot be used (refreshing never needs them).
    problems: dict[str, str]
    # Endpoints for clients that present a certificate (RFC 8705 5), by metadata name.
    mtls_aliases: dict[str, str]


def endpoints_from_metadata(body: bytes, issuer: str) -> Endpoints:
    """The endpoints of a discovery document. Raises DiscoveryError without a usable
    token_endpoint."""
    document = decode_json_object(body)
    if document is None:
        raise DiscoveryError(f"discovery document of {issuer} is not a JSON object")
    endpoint = document.get("token_endpoint")
    if not isinstance(endpoint, str) or not endpoint:
        raise DiscoveryError(f"discovery document of {issuer} has no token_endpoint")
    token_endpoint = _checked_endpoint(endpoint, "token_endpoint", issuer)
    optional: dict[str, str] = {}
    problems: dict[str, str] = {}
    for name in OPTIONAL_ENDPOINTS:
        value = document.get(name)
        if value is None:
            continue
        try:
            if not isinstance(value, str):
                raise DiscoveryError(f"discovery document of {issuer} gives a non-text {name}")
            optional[name] = _checked_endpoint(value, name, issuer)
        except DiscoveryError as exc:
            problems[name] = str(exc)
    aliases: dict[str, str] = {}
    listed = document.get("mtls_endpoint_aliases")
    if isinstance(listed, dict):
        for name in ("token_endpoint", *OPTIONAL_ENDPOINTS):
            value = listed.get(name)
            if isinstance(value, str) and value:
                try:
                    aliases[name] = _checked_endpoint(value, f"mtls {name}", issuer)
                except DiscoveryError as exc:
                    problems[f"mtls {name}"] = str(exc)
    return Endpoints(token_endpoint, optional, problems, aliases)


def _checked_endpoint(endpoint: str, name: str, issuer: str) -> str:
    try:
        parts = urlsplit(endpoint)
        hostname = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError:  # "Invalid IPv6 URL", a port that is not a number
        hostname = None
    # Client credentials go to this URL, so it may not drop TLS the issuer itself uses.
    allowed = ("https", "http") if urlsplit(issuer).scheme == "http" else ("https",)
    # urlsplit quietly drops tabs and line breaks; a URL holding them is not usable.
    if not hostname or parts.scheme not in allowed or not _VISIBLE.fullmatch(endpoint):
        shown = clean_text(endpoint) or "?"
        raise DiscoveryError(f"discovery document of {issuer} gives an unusable {name} {shown!r}")
    return endpoint


class _Fetch:
    """One discovery fetch in progress, which concurrent callers wait on."""

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.error: str | None = None


class Discovery:
    """The endpoints of one issuer: fetched on first use and kept.

    Concurrent callers share one fetch. A failure is reported to everyone waiting on
    that fetch and not kept, so the next caller tries again.
    """

    def __init__(
        self,
        http: httpx.AsyncClient,
        issuer: str,
        *,
        headers: Mapping[str, str],
        timeout: float,
    ) -> None:
        self._http = http
        self._issuer = issuer
        self._headers = dict(headers)
        self._timeout = timeout
        self._endpoints: Endpoints | None = None
        self._pending: _Fetch | None = None

    async def token_endpoint(self, *, mtls: bool = False) -> str:
        """The token endpoint; with ``mtls``, its alias for certificate-presenting
        clients when the issuer names one."""
        endpoints = await self.endpoints()
        alias = endpoints.mtls_aliases.get("token_endpoint") if mtls else None
        return alias or endpoints.token_endpoint

    async def endpoint(self, name: str, *, mtls: bool = False) -> str:
        """An optional endpoint (see OPTIONAL_ENDPOINTS); raises DiscoveryError saying
        why when the issuer names none, or none usable."""
        endpoints = await self.endpoints()
        found = (endpoints.mtls_aliases.get(name) if mtls else None) or endpoints.optional.get(name)
        if found is not None:
            return found
        problem = endpoints.problems.get(name)
        raise DiscoveryError(problem or f"discovery document of {self._issuer} names no {name}")

    async def endpoints(self) -> Endpoints:
        while self._endpoints is None:
            pending = self._pending
            if pending is None:
                return await self._lead_fetch()
            await pending.done.wait()
            if pending.error is not None:
                raise DiscoveryError(pending.error)
            # Otherwise the fetch succeeded, or its caller was cancelled: look again.
        return self._endpoints

    async def _lead_fetch(self) -> Endpoints:
        pending = self._pending = _Fetch()
        try:
            endpoints = await self._fetch()
        except DiscoveryError as exc:
            pending.error = str(exc)
            raise
        else:
            self._endpoints = endpoints
            return endpoints
        finally:
            self._pending = None
            pending.done.set()

    async def _fetch(self) -> Endpoints:
        url = discovery_url(self._issuer)
        try:
            with anyio.fail_after(self._timeout):
                async with self._http.stream("GET", url, headers=self._headers) as response:
                    raw = await read_capped(response)
        except TimeoutError:
            raise DiscoveryError(f"{url}: no answer within {self._timeout:g} s") from None
        except (httpx.HTTPError, httpx.InvalidURL, OSError) as exc:
            detail = clean_text(f"{type(exc).__name__}: {exc}") or type(exc).__name__
            raise DiscoveryError(f"{url}: {detail}") from exc
        if raw.status != 200:
            raise DiscoveryError(f"{url}: HTTP {raw.status}")
        if raw.truncated:
            raise DiscoveryError(f"{url}: the document is larger than {len(raw.body)} bytes")
        return endpoints_from_metadata(raw.body, self._issuer)
