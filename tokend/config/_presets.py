"""Provider presets: what the identity providers users meet most need from tokend.

A preset fills in provider settings the operator left out; anything set explicitly
wins (``refresh_token_max_age: null`` too). Each value names its public source.
Settings a preset leaves alone are the ones where the provider behaves as tokend
assumes by default (no reuse grace, refresh tokens for ``openid offline_access``), or
where no default could be confirmed from the provider's documentation: a lifetime
tokend does not know is one it does not guess.
"""

from __future__ import annotations

from typing import Literal

DAY = 86400.0

PresetName = Literal["okta", "auth0", "entra", "google", "keycloak", "salesforce", "xero", "hydra"]

PRESETS: dict[str, dict[str, object]] = {
    # Okta, refresh token rotation: "the previous token remains valid for the configured
    # amount of time" (grace period), 30 s unless changed: Okta Apps API,
    # settings.oauthClient.refresh_token.leeway, default 30
    # (developer.okta.com/docs/guides/refresh-tokens/main/#refresh-token-rotation).
    # Refresh-token lifetime, org authorization server: "always 90 days, and there is no
    # idle refresh token time"; "when the refresh token is used and a new refresh token
    # is provided, the expiration time will remain the same as the previous token"
    # (support.okta.com, "Refresh Token Expiration Behavior"): an age limit. A custom
    # authorization server takes both limits from its access policy (10 minutes to
    # 5 years, or unlimited, and an idle window): set refresh_token_max_age and
    # refresh_token_max_idle to the policy's (null for unlimited).
    "okta": {"reuse_grace": 30.0, "refresh_token_max_age": 90 * DAY},
    # Auth0, refresh token rotation "Reuse Interval" (leeway): 0 s by default
    # (auth0.com/docs/secure/tokens/refresh-tokens/configure-refresh-token-rotation;
    # Management API client refresh_token.leeway, default 0).
    # With rotation, the absolute lifetime is 2,592,000 s (30 days) by default and "does
    # not extend when tokens are rotated" (auth0.com/docs/secure/tokens/refresh-tokens/
    # configure-refresh-token-rotation and .../configure-refresh-token-expiration). The
    # inactivity lifetime's default could not be confirmed there: left unset (set
    # refresh_token_max_idle to the application's "Inactivity Lifetime").
    "auth0": {"reuse_grace": 0.0, "refresh_token_max_age": 30 * DAY},
    # Microsoft Entra ID: refresh tokens are issued for the offline_access scope
    # (learn.microsoft.com/entra/identity-platform/v2-oauth2-auth-code-flow), which the
    # default login scope asks for; they live 90 days outside single-page apps
    # (learn.microsoft.com/entra/identity-platform/refresh-tokens, "Token lifetime"), and
    # "replace themselves with a fresh token upon every use": unused for 90 days, the
    # chain dies. The lifetime "can't be configured".
    "entra": {"refresh_token_max_idle": 90 * DAY},
    # Google: no refresh token unless the authorization request says
    # access_type=offline, and only at the first consent unless prompt=consent
    # (developers.google.com/identity/protocols/oauth2/web-server#offline;
    # developers.google.com/identity/openid-connect/openid-connect#access-type-param).
    # Refresh tokens are not rotated. One stops working when "the refresh token has not
    # been used for six months" (developers.google.com/identity/protocols/oauth2,
    # "Refresh token expiration"): 180 days, the shorter reading. Apps in testing mode
    # get tokens expiring in 7 days, sent as refresh_token_expires_in, which tokend reads.
    "google": {
        "authorize_params": {"access_type": "offline", "prompt": "consent"},
        "login_scope": "openid",
        "refresh_token_max_idle": 180 * DAY,
    },
    # Keycloak: offline tokens for the offline_access scope; refresh tokens are reusable
    # unless the realm's "Revoke Refresh Token" is on, with "Refresh Token Max Reuse" 0
    # (keycloak.org/docs/latest/server_admin/#_offline-access,
    # #_timeouts). The defaults fit. Lifetimes are the realm's (SSO Session Idle and Max,
    # Offline Session Idle) and every token response says what is left of them in
    # refresh_expires_in, which tokend reads: nothing to preset.
    "keycloak": {},
    # Salesforce: the refresh_token (or offline_access) scope grants a refresh token
    # (help.salesforce.com, "OAuth Tokens and Scopes"); refresh tokens are not rotated
    # unless the connected app enables it. How long they live is the connected app's
    # refresh token policy, set per org; no one default could be confirmed: none preset.
    "salesforce": {"login_scope": "openid refresh_token"},
    # Xero: "you can retry refreshing the old token for a grace period of 30 minutes"
    # after a lost response (developer.xero.com/documentation/guides/oauth2/auth-flow,
    # "Refreshing access and refresh tokens"). "Unused refresh tokens expire after 60
    # days" (developer.xero.com/faq/oauth2, "What is the expiration for a refresh token?").
    "xero": {"reuse_grace": 1800.0, "refresh_token_max_idle": 60 * DAY},
    # Ory Hydra: a rotated refresh token is invalid at once unless
    # oauth2.grant.refresh_token.rotation_grace_period is set (0 by default;
    # ory.sh/docs/hydra/guides/graceful-token-refresh). How long refresh tokens live is
    # the server's ttl.refresh_token; its default could not be confirmed from Ory's
    # documentation: left unset (set refresh_token_max_idle to it).
    "hydra": {"reuse_grace": 0.0},
}
