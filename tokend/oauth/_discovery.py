"""OpenID Connect discovery of the token endpoint, fetched once and shared."""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlsplit

import anyio
import httpx

from tokend.oauth._http import read_capped
from tokend.oauth._parse import clean_text, decode_json_object

WELL_KNOWN_PATH = "/.well-known/openid-configuration"


class DiscoveryError(Exception):
    """The issuer's discovery document could not be fetched or has no usable
    token_endpoint."""


def discovery_url(issuer: str) -> str:
    """Where an issuer publishes its metadata (OIDC Discovery 4)."""
    return issuer.rstrip("/") + WELL_KNOWN_PATH


def token_endpoint_from_metadata(body: bytes, issuer: str) -> str:
    """The token_endpoint of a discovery document; raises DiscoveryError."""
    document = decode_json_object(body)
    if document is None:
        raise DiscoveryError(f"discovery document of {issuer} is not a JSON object")
    endpoint = document.get("token_endpoint")
    if not isinstance(endpoint, str) or not endpoint:
        raise DiscoveryError(f"discovery document of {issuer} has no token_endpoint")
    parts = urlsplit(endpoint)
    # Client credentials go to this URL, so it may not drop TLS the issuer itself uses.
    allowed = ("https", "http") if urlsplit(issuer).scheme == "http" else ("https",)
    if parts.scheme not in allowed or not parts.hostname:
        shown = clean_text(endpoint) or "?"
        raise DiscoveryError(
            f"discovery document of {issuer} gives an unusable token_endpoint {shown!r}"
        )
    return endpoint


class _Fetch:
    """One discovery fetch in progress, which concurrent callers wait on."""

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.error: str | None = None


class Discovery:
    """The token endpoint of one issuer: fetched on first use and kept.

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
        self._endpoint: str | None = None
        self._pending: _Fetch | None = None

    async def token_endpoint(self) -> str:
        while self._endpoint is None:
            pending = self._pending
            if pending is None:
                return await self._lead_fetch()
            await pending.done.wait()
            if pending.error is not None:
                raise DiscoveryError(pending.error)
            # Otherwise the fetch succeeded, or its caller was cancelled: look again.
        return self._endpoint

    async def _lead_fetch(self) -> str:
        pending = self._pending = _Fetch()
        try:
            endpoint = await self._fetch()
        except DiscoveryError as exc:
            pending.error = str(exc)
            raise
        else:
            self._endpoint = endpoint
            return endpoint
        finally:
            self._pending = None
            pending.done.set()

    async def _fetch(self) -> str:
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
        return token_endpoint_from_metadata(raw.body, self._issuer)
