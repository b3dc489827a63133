"""What a token request came to: a token response, or a classified failure.

The classification is the contract between the OAuth layer (which knows HTTP and
RFC 6749) and the policy (which decides what to do next, knowing neither).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class FailureKind(enum.StrEnum):
    # Network error, timeout, 5xx, a 2xx that is not a usable token response.
    TRANSIENT = "transient"
    # 429, or 503 with Retry-After.
    RATE_LIMITED = "rate_limited"
    # 400 invalid_grant / invalid_scope: this account's refresh token or grant is dead.
    ACCOUNT_PERMANENT = "account_permanent"
    # 401 invalid_client, unauthorized_client: this client's credentials are refused.
    PROVIDER_PERMANENT = "provider_permanent"
    # 403: often a web firewall's HTML block page; a cooldown, not a death.
    BLOCKED = "blocked"


@dataclass(frozen=True, slots=True)
class TokenResponse:
    """A successful token endpoint response, parsed tolerantly."""

    access_token: str = field(repr=False)
    token_type: str
    # None when the response had no usable expires_in.
    expires_in: float | None
    # None when the IdP did not rotate (keep the old refresh token).
    refresh_token: str | None = field(default=None, repr=False)
    scope: str | None = None
    # Seconds the refresh token lives, as the IdP says (Keycloak ``refresh_expires_in``,
    # GitHub and Google ``refresh_token_expires_in``); None when it says nothing usable.
    refresh_expires_in: float | None = None
    # What was adjusted to make the answer usable (an expires_in clamped, say), for
    # the log; never a secret.
    notes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class TokenFailure:
    """A failed token request. Every text field is free of secrets and bounded in size."""

    kind: FailureKind
    # A short machine-friendly cause: the RFC 6749 error code, "http_503", "timeout",
    # "connect_error", "html_block_page", "invalid_json", ...
    reason: str
    status: int | None = None
    description: str | None = None
    # Seconds the IdP asked us to wait (Retry-After), already converted and capped.
    retry_after: float | None = None
    # False when the request certainly never reached the IdP (connection refused,
    # DNS failure): the refresh token was not spent.
    request_sent: bool = True
    # A 2xx refused for another field (the access token, its type, its scope) may
    # still carry a usable refresh token: the IdP has rotated, so it is the chain now.
    rotated_refresh_token: str | None = field(default=None, repr=False)

    def summary(self) -> str:
        parts = [self.kind.value, self.reason]
        if self.status is not None:
            parts.append(f"HTTP {self.status}")
        text = ": ".join(parts[:2]) + (f" ({parts[2]})" if len(parts) > 2 else "")
        if self.description:
            text += f": {self.description}"
        return text


Outcome = TokenResponse | TokenFailure
