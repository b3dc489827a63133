"""Talking to an identity provider, and nothing else: grants, client authentication,
discovery and classified outcomes."""

from tokend.oauth._auth import ProviderSetupError
from tokend.oauth._client import ProviderClient
from tokend.oauth._discovery import DiscoveryError
from tokend.oauth._outcome import FailureKind, Outcome, TokenFailure, TokenResponse

__all__ = [
    "DiscoveryError",
    "FailureKind",
    "Outcome",
    "ProviderClient",
    "ProviderSetupError",
    "TokenFailure",
    "TokenResponse",
]
