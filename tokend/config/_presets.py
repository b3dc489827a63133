"""Provider presets: what the identity providers users meet most need from tokend.

A preset fills in provider settings the operator left out; anything set explicitly
wins. Each value names its public source. Settings a preset leaves alone are the ones
where the provider behaves as tokend assumes by default (no reuse grace, refresh
tokens for ``openid offline_access``), so a preset there only documents that.
"""

from __future__ import annotations

from typing import Literal

PresetName = Literal["okta", "auth0", "entra", "google", "keycloak", "salesforce", "xero", "hydra"]

PRESETS: dict[str, dict[str, object]] = {
    # Okta, refresh token rotation: "the previous token remains valid for the configured
    # amount of time" (grace period), 30 s unless changed: Okta Apps API,
    # settings.oauthClient.refresh_token.leeway, default 30
    # (developer.okta.com/docs/guides/refresh-tokens/main/#refresh-token-rotation).
    "okta": {"reuse_grace": 30.0},
    # Auth0, refresh token rotation "Reuse Interval" (leeway): 0 s by default
    # (auth0.com/docs/secure/tokens/refresh-tokens/configure-refresh-token-rotation;
    # Management API client refresh_token.leeway, default 0).
    "auth0": {"reuse_grace": 0.0},
    # Microsoft Entra ID: refresh tokens are issued for the offline_access scope
    # (learn.microsoft.com/entra/identity-platform/v2-oauth2-auth-code-flow), which the
    # default login scope asks for; they live 90 days outside single-page apps
    # (learn.microsoft.com/entra/identity-platform/refresh-tokens). The defaults fit.
    "entra": {},
    # Google: no refresh token unless the authorization request says
    # access_type=offline, and only at the first consent unless prompt=consent
    # (developers.google.com/identity/protocols/oauth2/web-server#offline;
    # developers.google.com/identity/openid-connect/openid-connect#access-type-param).
    # Refresh tokens are not rotated.
    "google": {
        "authorize_params": {"access_type": "offline", "prompt": "consent"},
        "login_scope": "openid",
    },
    # Keycloak: offline tokens for the offline_access scope; refresh tokens are reusable
    # unless the realm's "Revoke Refresh Token" is on, with "Refresh Token Max Reuse" 0
    # (keycloak.org/docs/latest/server_admin/#_offline-access,
    # #_timeouts). The defaults fit.
    "keycloak": {},
    # Salesforce: the refresh_token (or offline_access) scope grants a refresh token
    # (help.salesforce.com, "OAuth Tokens and Scopes"); refresh tokens are not rotated
    # unless the connected app enables it.
    "salesforce": {"login_scope": "openid refresh_token"},
    # Xero: "you can retry refreshing the old token for a grace period of 30 minutes"
    # after a lost response (developer.xero.com/documentation/guides/oauth2/auth-flow,
    # "Refreshing access and refresh tokens").
    "xero": {"reuse_grace": 1800.0},
    # Ory Hydra: a rotated refresh token is invalid at once unless
    # oauth2.grant.refresh_token.rotation_grace_period is set (0 by default;
    # ory.sh/docs/hydra/guides/graceful-token-refresh).
    "hydra": {"reuse_grace": 0.0},
}
