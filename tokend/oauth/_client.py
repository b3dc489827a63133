"""ProviderClient: token requests to one identity provider, with classified outcomes."""

from __future__ import annotations

import time
from collections.abc import Mapping
from types import TracebackType

import anyio
import httpx

from tokend.config import ProviderConfig
from tokend.logs import get_logger, register_long_lived_secret
from tokend.oauth._auth import ClientAuth, tls_context
from tokend.oauth._authorize import DEVICE_CODE_GRANT
from tokend.oauth._discovery import Discovery, DiscoveryError
from tokend.oauth._http import DEFAULT_USER_AGENT, RawResponse, RequestProgress, read_capped
from tokend.oauth._outcome import FailureKind, Outcome, TokenFailure, TokenResponse
from tokend.oauth._parse import (
    classify_response,
    classify_transport_error,
    clean_text,
)

_log = get_logger(component="oauth")


class ProviderClient:
    """One identity provider: a keep-alive httpx.AsyncClient, discovery cache, client auth.

    ``refresh`` and ``client_credentials`` never raise for the IdP's or the network's
    failures: they return a TokenFailure saying what kind of failure it was.
    """

    def __init__(
        self,
        name: str,
        config: ProviderConfig,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.name = name
        self._config = config
        # Reads the secret or key file now: a bad file stops startup with ProviderSetupError.
        self._auth = ClientAuth.from_config(name, config)
        for secret in self._auth.redaction_values:
            register_long_lived_secret(secret)
        self._headers = {
            # Some web firewalls block HTTP libraries' default User-Agents outright.
            "User-Agent": config.user_agent or DEFAULT_USER_AGENT,
            "Accept": "application/json",
        }
        context = tls_context(name, config)
        # A client presenting a certificate uses the issuer's mTLS endpoint aliases.
        self._mtls = config.tls_client_cert_file is not None
        self._http = httpx.AsyncClient(
            transport=transport,
            verify=context if context is not None else True,
            timeout=httpx.Timeout(config.timeout),
            # One connection per concurrent refresh, plus one for discovery.
            limits=httpx.Limits(
                max_connections=config.max_concurrency + 1,
                max_keepalive_connections=config.max_concurrency,
            ),
            # A token endpoint that redirects is misconfigured; following a redirect
            # would resend credentials to a URL nobody configured.
            follow_redirects=False,
        )
        self._discovery = (
            None
            if config.issuer is None
            else Discovery(self._http, config.issuer, headers=self._headers, timeout=config.timeout)
        )

    @property
    def client_id(self) -> str:
        return self._config.client_id

    @property
    def timeout(self) -> float:
        """The total time one token request may take."""
        return self._config.timeout

    def __repr__(self) -> str:
        return f"ProviderClient(name={self.name!r}, auth_method={self._auth.method!r})"

    async def __aenter__(self) -> ProviderClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def token_endpoint(self) -> str:
        """The configured token endpoint, or the one the issuer's discovery names."""
        if self._config.token_endpoint is not None:
            return self._config.token_endpoint
        assert self._discovery is not None
        return await self._discovery.token_endpoint(mtls=self._mtls)

    async def endpoint(self, name: str) -> str:
        """``authorization_endpoint``, ``device_authorization_endpoint`` or
        ``revocation_endpoint``: as configured, else from discovery. Raises
        DiscoveryError saying why there is none."""
        configured: str | None = getattr(self._config, name)
        if configured is not None:
            return configured
        if self._discovery is None:
            raise DiscoveryError(
                f"provider {self.name!r} has no issuer to discover {name} from: set {name}"
            )
        return await self._discovery.endpoint(name, mtls=self._mtls)

    async def exchange_code(self, code: str, redirect_uri: str, code_verifier: str) -> Outcome:
        """Redeem an authorization code (RFC 6749 4.1.3) with its PKCE verifier."""
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
            "code_verifier": code_verifier,
        }
        return await self._token_request(form, secrets=(code, code_verifier))

    async def device_authorization(self, scope: str | None) -> RawResponse | TokenFailure:
        """Start the device authorization grant (RFC 8628 3.1): the raw answer."""
        form = {**self._config.extra_params, "client_id": self._config.client_id}
        if scope:
            form["scope"] = scope
        return await self._send_raw("device_authorization_endpoint", form, secrets=())

    async def poll_device_code(self, device_code: str) -> Outcome:
        """One device access token request (RFC 8628 3.4)."""
        form = {"grant_type": DEVICE_CODE_GRANT, "device_code": device_code}
        return await self._token_request(form, secrets=(device_code,))

    async def revoke(self, token: str, token_type_hint: str) -> RawResponse | TokenFailure:
        """Ask the IdP to revoke ``token`` (RFC 7009 2.1): the raw answer."""
        form = {"token": token, "token_type_hint": token_type_hint}
        return await self._send_raw("revocation_endpoint", form, secrets=(token,))

    async def refresh(self, refresh_token: str, scope: str | None = None) -> Outcome:
        """Redeem a refresh token (RFC 6749 6); ``scope`` may narrow the grant."""
        if not refresh_token:
            return TokenFailure(
                FailureKind.ACCOUNT_PERMANENT, "missing_refresh_token", request_sent=False
            )
        form = {"grant_type": "refresh_token", "refresh_token": refresh_token}
        if scope is not None:
            form["scope"] = scope
        return await self._token_request(form, secrets=(refresh_token,))

    async def client_credentials(self, scope: str | None = None) -> Outcome:
        """Obtain a token for the client itself (RFC 6749 4.4)."""
        form = {"grant_type": "client_credentials"}
        if scope is not None:
            form["scope"] = scope
        return await self._token_request(form, secrets=())

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _token_request(self, grant: Mapping[str, str], secrets: tuple[str, ...]) -> Outcome:
        # Extra parameters first, so none can override the grant or the credentials.
        form = {**self._config.extra_params, **grant}
        sent = await self._send("token_endpoint", form, secrets)
        if isinstance(sent, TokenFailure):
            return sent
        raw, secrets = sent
        outcome = classify_response(
            raw.status,
            raw.headers,
            raw.body,
            now=time.time(),
            truncated=raw.truncated,
            secrets=secrets,
        )
        if isinstance(outcome, TokenResponse) and outcome.notes:
            _log.warning("token_response_adjusted", provider=self.name, notes=list(outcome.notes))
        return outcome

    async def _send_raw(
        self, endpoint_name: str, params: Mapping[str, str], secrets: tuple[str, ...]
    ) -> RawResponse | TokenFailure:
        sent = await self._send(endpoint_name, params, secrets)
        return sent if isinstance(sent, TokenFailure) else sent[0]

    async def _send(
        self, endpoint_name: str, params: Mapping[str, str], secrets: tuple[str, ...]
    ) -> tuple[RawResponse, tuple[str, ...]] | TokenFailure:
        """POST ``params`` with client authentication to the named endpoint: the answer
        and every secret the request carried (to scrub from what the IdP echoes)."""
        try:
            if endpoint_name == "token_endpoint":
                endpoint = await self.token_endpoint()
            else:
                endpoint = await self.endpoint(endpoint_name)
        except DiscoveryError as exc:
            return TokenFailure(
                FailureKind.TRANSIENT,
                "discovery_failed",
                description=clean_text(str(exc)),
                request_sent=False,
            )
        credentials = self._auth.credentials(endpoint, time.time())
        form = {**params, **credentials.form}
        headers = {**self._headers, **credentials.headers}
        # Everything sent that an IdP could echo back into an error text.
        secrets = (*secrets, *self._auth.secrets, *credentials.secrets)
        progress = RequestProgress()
        try:
            # httpx's timeouts bound each phase; a server that drips one byte at a time
            # never trips them, so the whole exchange also gets one deadline.
            with anyio.fail_after(self._config.timeout):
                raw = await self._post(endpoint, form, headers, progress)
        except (TimeoutError, httpx.HTTPError, httpx.InvalidURL, OSError) as exc:
            return classify_transport_error(exc, request_sent=progress.sent, secrets=secrets)
        return raw, secrets

    async def _post(
        self,
        url: str,
        form: Mapping[str, str],
        headers: Mapping[str, str],
        progress: RequestProgress,
    ) -> RawResponse:
        async with self._http.stream(
            "POST", url, data=form, headers=headers, extensions=progress.extensions
        ) as response:
            return await read_capped(response)
