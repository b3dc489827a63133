"""The configuration schema: what a tokend config file may say.

It reads like the job: where state lives (``state``), how tokens are served
(``serve``), whom to ask (``providers``) and for whom (``accounts``). Every model
forbids unknown keys so a typo is an error, not a silently ignored setting.
Secrets are ``SecretStr`` so they never show in a repr, a log or an error.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from tokend._ids import resolve_id
from tokend.config._presets import PRESETS, PresetName
from tokend.template import Template

NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: object) -> float:
    """``90``, ``"90"``, ``"90s"``, ``"5m"``, ``"1h"``, ``"250ms"``, ``"1d"`` -> seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 90, 90s, 5m or 1h")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.fullmatch(value)):
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    else:
        raise ValueError("expected a duration like 90, 90s, 5m or 1h")
    if not math.isfinite(seconds):
        # YAML reads .inf and .nan as floats; neither is a usable wait.
        raise ValueError("expected a finite duration like 90, 90s, 5m or 1h")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def _check_name(value: str) -> str:
    # The message leaves the value out: a key's path already shows it, and the
    # ``provider`` field must not echo whatever was pasted into it.
    if not NAME_PATTERN.fullmatch(value) or value in {".", ".."}:
        raise ValueError(
            "not a valid name: use 1-64 of A-Z a-z 0-9 . _ - and not '.' or '..' "
            "(names become file names)"
        )
    return value


def unknown_provider_message(name: str, defined: Iterable[str]) -> str:
    """What to say about an account whose ``provider`` names no defined provider."""
    names = sorted(defined)
    return f"unknown provider {name!r} (defined: {', '.join(names) if names else 'none'})"


def _not_empty(value: SecretStr | None) -> SecretStr | None:
    # An empty secret is nearly always an interpolated variable that was set to "".
    if value is not None and not value.get_secret_value():
        raise ValueError("is empty (check the environment variable it comes from, if any)")
    return value


def _parse_mode(value: object) -> int:
    # Quote modes in YAML ("0640"): a bare 0640 is read as octal by YAML 1.1 and
    # arrives here as an int, which is taken as the numeric mode it already is.
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0o7777:
        return value
    if isinstance(value, str) and re.fullmatch(r"0?o?[0-7]{3,4}", value):
        return int(value.replace("o", ""), 8)
    raise ValueError('expected a file mode such as "0640"')


# What editors are told (tokend check --schema): the forms the validators accept.
_DURATION_SCHEMA = {
    "anyOf": [
        {"type": "number", "minimum": 0},
        {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*(ms|s|m|h|d)?\s*$"},
    ],
    "description": "seconds, or a duration such as 90s, 5m, 1h, 250ms",
}
_MODE_SCHEMA = {
    "anyOf": [
        {"type": "string", "pattern": "^0?o?[0-7]{3,4}$"},
        {"type": "integer", "minimum": 0, "maximum": 0o7777},
    ],
    "description": 'a file mode, quoted: "0640"',
}

Duration = Annotated[float, BeforeValidator(parse_duration), WithJsonSchema(_DURATION_SCHEMA)]
Name = Annotated[str, AfterValidator(_check_name)]
FileMode = Annotated[int, BeforeValidator(_parse_mode), WithJsonSchema(_MODE_SCHEMA)]


class _Model(BaseModel):
    # Frozen, so a default sub-model (``refresh: RefreshPolicyConfig = ...()``) is one
    # instance shared by every model that leaves it out: pydantic copies only
    # unhashable defaults.
    model_config = ConfigDict(extra="forbid", frozen=True)


class StateTLSConfig(_Model):
    """TLS towards etcd: the CA that signed its certificates, a client certificate."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    @model_validator(mode="after")
    def _cert_with_key(self) -> StateTLSConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (a client certificate)")
        return self


class StateConfig(_Model):
    """Where durable account state lives."""

    backend: Literal["sqlite", "etcd"] = "sqlite"
    path: Path = Path("./var/tokend.db")
    # AES-GCM key for the tokens at rest (32 bytes, raw or base64). Without it, the
    # key may come from $TOKEND_STATE_KEY or the systemd credential tokend-state-key
    # (backend etcd needs one of the three).
    encryption_key_file: Path | None = None
    # backend: etcd (replicas sharing accounts).
    endpoints: tuple[str, ...] = ()
    prefix: str = "/tokend/"
    tls: StateTLSConfig | None = None
    username: str | None = None
    # Without it, the password may come from $TOKEND_ETCD_PASSWORD or the systemd
    # credential tokend-etcd-password.
    password_file: Path | None = None
    # A replica that stops renewing its lease loses its accounts after this long.
    lease_ttl: Duration = 5.0
    # Per request to one etcd member, and per call across all of them.
    request_timeout: Duration = 0.5
    call_timeout: Duration = 5.0

    @field_validator("endpoints")
    @classmethod
    def _urls(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for url in value:
            if not re.fullmatch(r"https?://[^\s/]+/?", url):
                raise ValueError("each endpoint is a URL like http://10.0.0.1:2379")
        return value

    @model_validator(mode="after")
    def _etcd_complete(self) -> StateConfig:
        if self.backend != "etcd":
            return self
        if not self.endpoints:
            raise ValueError("backend etcd needs endpoints (the cluster's client URLs)")
        if self.password_file is not None and self.username is None:
            raise ValueError("password_file needs username (the etcd user it is for)")
        if not self.prefix.startswith("/") or not self.prefix.endswith("/"):
            raise ValueError("prefix starts and ends with '/' (like /tokend/)")
        if not 2 <= self.lease_ttl <= 300:
            raise ValueError("lease_ttl is between 2s and 300s")
        if not 0 < self.request_timeout <= self.call_timeout:
            raise ValueError("request_timeout is positive and at most call_timeout")
        return self


class ServeConfig(_Model):
    """How tokens are handed out."""

    socket: Path | None = Path("./run/tokend.sock")
    socket_mode: FileMode = 0o660
    token_dir: Path | None = Path("./run/tokens")
    token_file_mode: FileMode = 0o640
    # Owner and group of token files (name or number); default: the daemon's.
    token_file_owner: str | int | None = None
    token_file_group: str | int | None = None

    @field_validator("token_file_owner")
    @classmethod
    def _known_owner(cls, value: str | int | None) -> str | int | None:
        resolve_id(value, "user", "token_file_owner")
        return value

    @field_validator("token_file_group")
    @classmethod
    def _known_group(cls, value: str | int | None) -> str | int | None:
        resolve_id(value, "group", "token_file_group")
        return value

    metrics_listen: str | None = "127.0.0.1:9464"
    # Per-account series (expiry timestamp, state) cost a label per account: opt in.
    per_account_metrics: bool = False
    # Bounded wait for in-flight refreshes to finish and commit on SIGTERM.
    drain_timeout: Duration = 10.0
    # Socket API limits: a bad or slow client must not starve the others.
    max_connections: int = Field(default=256, ge=1, le=65536)
    idle_timeout: Duration = Field(default=30.0, gt=0)
    max_header_bytes: int = Field(default=8192, ge=1024, le=1_048_576)
    # Longest a request may wait for a refresh (?min_valid, forced refresh).
    request_wait_max: Duration = Field(default=10.0, gt=0)
    # A forced refresh (POST .../refresh) of one account at most this often.
    force_refresh_interval: Duration = 10.0
    # Connections waiting for token changes at once (long-polls, event streams);
    # fewer than max_connections, so token reads always find room. Default: half.
    max_waiters: int | None = Field(default=None, ge=1, le=65535)

    @property
    def waiters_limit(self) -> int:
        if self.max_waiters is not None:
            return self.max_waiters
        return max(1, self.max_connections // 2)

    @model_validator(mode="after")
    def _waiters_leave_room(self) -> ServeConfig:
        if self.max_waiters is not None and self.max_waiters >= self.max_connections:
            raise ValueError(
                f"max_waiters ({self.max_waiters}) must be less than max_connections "
                f"({self.max_connections}): waiting connections must leave room for reads"
            )
        return self


class RefreshPolicyConfig(_Model):
    """When to refresh, as fractions of a token's lifetime. Every field may be set per
    provider and overridden per account."""

    # Refresh at this fraction of the lifetime...
    at_fraction: float | None = Field(default=None, gt=0, lt=1)
    # ...give or take this fraction of the lifetime, at random...
    jitter_fraction: float | None = Field(default=None, ge=0, lt=0.5)
    # ...but never later than expiry - max(min_margin, margin_fraction * lifetime).
    min_margin: Duration | None = None
    margin_fraction: float | None = Field(default=None, ge=0, lt=1)
    # Lifetime assumed when the IdP's response carries no usable expires_in.
    default_lifetime: Duration | None = Field(default=None, gt=0)


class BackoffConfig(_Model):
    """Retry delays after a failed refresh: exponential with full jitter."""

    initial: Duration = Field(default=1.0, gt=0)
    max: Duration = Field(default=300.0, gt=0)


class BreakerConfig(_Model):
    """The provider's circuit breaker."""

    # Consecutive transient failures across the provider's accounts that open it.
    failure_threshold: int = Field(default=5, ge=1)
    cooldown_initial: Duration = Field(default=30.0, gt=0)
    cooldown_max: Duration = Field(default=1800.0, gt=0)


class RateLimitConfig(_Model):
    """Token requests per second to one provider (a token bucket)."""

    rate: float = Field(default=10.0, gt=0)
    burst: int = Field(default=20, ge=1)


class ProviderConfig(_Model):
    """An identity provider and this client's credentials at it."""

    # Settings for a well-known IdP (config/_presets.py); explicit settings win.
    preset: PresetName | None = None
    issuer: str | None = None
    token_endpoint: str | None = None
    # For `tokend login` and `tokend revoke`; from discovery when an issuer is set.
    authorization_endpoint: str | None = None
    device_authorization_endpoint: str | None = None
    revocation_endpoint: str | None = None
    client_id: str
    client_secret: SecretStr | None = None
    client_secret_file: Path | None = None
    auth_method: Literal[
        "client_secret_basic",
        "client_secret_post",
        "private_key_jwt",
        "tls_client_auth",
        "self_signed_tls_client_auth",
        "none",
    ] = "client_secret_basic"
    private_key_file: Path | None = None
    # client_secret_basic: "form" form-encodes the id and secret before base64 (RFC 6749
    # 2.3.1); "raw" sends them as they are, for servers that do not decode them.
    basic_auth_encoding: Literal["form", "raw"] = "form"
    # A client certificate (PEM) and its key, presented on every TLS connection to the
    # IdP: client authentication for the tls_client_auth methods (RFC 8705), and what
    # certificate-bound access tokens are bound to with any method.
    tls_client_cert_file: Path | None = None
    tls_client_key_file: Path | None = None
    # CA certificates (PEM) to verify the IdP's TLS certificate with, instead of the
    # system's.
    tls_ca_file: Path | None = None
    # Signing algorithm for private_key_jwt; default from the key type (EC P-256 -> ES256).
    signing_alg: Literal["ES256", "RS256"] | None = None
    user_agent: str | None = None
    # Zero would fail every request at once.
    timeout: Duration = Field(default=10.0, gt=0)
    # Extra form parameters sent with every token request (e.g. audience, resource).
    extra_params: dict[str, str] = Field(default_factory=dict)
    # `tokend login`: extra authorization request parameters, and the scope to ask for
    # when the account names none (default "openid offline_access").
    authorize_params: dict[str, str] = Field(default_factory=dict)
    login_scope: str | None = None
    refresh: RefreshPolicyConfig = RefreshPolicyConfig()
    max_concurrency: int = Field(default=4, ge=1, le=1024)
    rate_limit: RateLimitConfig = RateLimitConfig()
    backoff: BackoffConfig = BackoffConfig()
    breaker: BreakerConfig = BreakerConfig()
    # Revoke an account's refresh token at the IdP (RFC 7009) when the account is
    # removed from the config; an account's own setting wins.
    revoke_on_remove: bool = False
    # How long the IdP accepts a just-rotated refresh token again (Okta 30 s, Cognito
    # up to 60 s, Auth0 and oidc-provider 0): after a lost response, tokend retries the
    # same token once, at once, inside this window.
    reuse_grace: Duration = 0.0
    # How long the IdP keeps an unused refresh token alive, and how long any refresh
    # token of a sign-in lives however often it is used (None: not known). tokend
    # refreshes an idle account before the first runs out, and shows when the second
    # (or the IdP's own refresh_expires_in) will call for a new sign-in, warning
    # reauth_warning ahead.
    refresh_token_max_idle: Duration | None = Field(default=None, gt=0)
    refresh_token_max_age: Duration | None = Field(default=None, gt=0)
    reauth_warning: Duration = 14 * 86400.0

    # Per field so the error points at the key; the URL itself is not echoed because
    # it may carry credentials (https://user:pass@host).
    @field_validator(
        "issuer",
        "token_endpoint",
        "authorization_endpoint",
        "device_authorization_endpoint",
        "revocation_endpoint",
    )
    @classmethod
    def _check_url(cls, url: str | None) -> str | None:
        if url is not None and not re.match(r"https?://", url):
            raise ValueError("expected an http(s) URL such as https://idp.example.com")
        return url

    _check_secret = field_validator("client_secret")(_not_empty)

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: object) -> object:
        # Only what the operator left out: an explicit setting always wins.
        if isinstance(data, dict):
            name = data.get("preset")
            preset = PRESETS.get(name) if isinstance(name, str) else None
            if preset:
                return {**preset, **data}
        return data

    @model_validator(mode="after")
    def _check(self) -> ProviderConfig:
        if (self.issuer is None) == (self.token_endpoint is None):
            raise ValueError("set exactly one of issuer (OIDC discovery) or token_endpoint")
        if self.client_secret is not None and self.client_secret_file is not None:
            raise ValueError("set client_secret or client_secret_file, not both")
        has_secret = self.client_secret is not None or self.client_secret_file is not None
        uses_secret = self.auth_method in ("client_secret_basic", "client_secret_post")
        if uses_secret and not has_secret:
            raise ValueError(
                f"auth_method {self.auth_method} needs client_secret or client_secret_file"
            )
        # A setting that the chosen method never uses is as likely a mistake as a typo.
        if has_secret and not uses_secret:
            raise ValueError(
                f"auth_method {self.auth_method} does not use a client secret: remove "
                "client_secret/client_secret_file or use client_secret_basic/client_secret_post"
            )
        if self.auth_method == "private_key_jwt" and self.private_key_file is None:
            raise ValueError("auth_method private_key_jwt needs private_key_file")
        if self.auth_method != "private_key_jwt" and self.private_key_file is not None:
            raise ValueError("private_key_file is only used with auth_method private_key_jwt")
        if (self.tls_client_cert_file is None) != (self.tls_client_key_file is None):
            raise ValueError("set tls_client_cert_file and tls_client_key_file together")
        if self.auth_method.endswith("tls_client_auth") and self.tls_client_cert_file is None:
            raise ValueError(
                f"auth_method {self.auth_method} needs tls_client_cert_file and tls_client_key_file"
            )
        if self.auth_method != "private_key_jwt" and self.signing_alg is not None:
            raise ValueError("signing_alg is only used with auth_method private_key_jwt")
        return self


VAULT_SCHEME = "vault://"
_VAULT_PART = re.compile(r"[A-Za-z0-9._@+=-]+")


@dataclass(frozen=True, slots=True)
class VaultRef:
    """A KV v2 secret field: ``vault://MOUNT/PATH#FIELD``."""

    mount: str
    path: str
    field: str

    def __str__(self) -> str:
        return f"{VAULT_SCHEME}{self.mount}/{self.path}#{self.field}"

    @property
    def where(self) -> str:
        """The secret as an operator names it (``bao kv get -mount=M PATH``)."""
        return f"{self.mount}/{self.path}"

    @classmethod
    def parse(cls, text: str) -> VaultRef:
        """Raises ValueError saying what is wrong (the reference is never echoed: a
        secret pasted with the prefix by mistake must not be printed)."""
        rest = text.removeprefix(VAULT_SCHEME)
        where, sep, field = rest.partition("#")
        if not sep or not field:
            raise ValueError(
                "a vault seed names a field: vault://MOUNT/PATH#FIELD, "
                "e.g. vault://secret/tokend/alice#refresh_token"
            )
        mount, _, path = where.partition("/")
        parts = path.split("/")
        if not mount or not path or not all(_VAULT_PART.fullmatch(p) for p in [mount, *parts]):
            raise ValueError(
                "a vault seed is vault://MOUNT/PATH#FIELD with a KV v2 mount, a path of "
                "one or more segments (A-Z a-z 0-9 . _ - @ + =) and a field name"
            )
        if not _VAULT_PART.fullmatch(field):
            raise ValueError("the field after '#' may use A-Z a-z 0-9 . _ - @ + = only")
        return cls(mount, path, field)


VAULT_MISSING = "a vault:// seed needs a top-level 'vault:' block (address, auth)"


class VaultAuthConfig(_Model):
    """How tokend logs in to the vault. ``kubernetes`` is the ``jwt`` login call on the
    kubernetes auth mount, with the pod's service account token as the JWT."""

    method: Literal["token", "approle", "jwt", "kubernetes"]
    # token
    token: SecretStr | None = None
    token_file: Path | None = None
    # approle
    role_id: str | None = None
    secret_id: SecretStr | None = None
    secret_id_file: Path | None = None
    # jwt / kubernetes
    role: str | None = None
    jwt_file: Path | None = None
    # The auth method's mount (default: the method's name).
    mount: str | None = None

    _check_secrets = field_validator("token", "secret_id")(_not_empty)

    @model_validator(mode="after")
    def _check(self) -> VaultAuthConfig:
        uses = {
            "token": {"token", "token_file"},
            "approle": {"role_id", "secret_id", "secret_id_file", "mount"},
            "jwt": {"role", "jwt_file", "mount"},
            "kubernetes": {"role", "jwt_file", "mount"},
        }[self.method]
        stray = sorted(k for k in self.model_fields_set - {"method"} if k not in uses)
        if stray:
            raise ValueError(f"method {self.method} does not use: {', '.join(stray)}")
        if self.method == "token" and (self.token is None) == (self.token_file is None):
            raise ValueError("method token needs exactly one of token or token_file")
        if self.method == "approle":
            if not self.role_id:
                raise ValueError("method approle needs role_id")
            if (self.secret_id is None) == (self.secret_id_file is None):
                raise ValueError("method approle needs exactly one of secret_id or secret_id_file")
        if self.method == "jwt" and (not self.role or self.jwt_file is None):
            raise ValueError("method jwt needs role and jwt_file")
        if self.method == "kubernetes" and not self.role:
            raise ValueError("method kubernetes needs role")
        if self.mount is not None and not _VAULT_PART.fullmatch(self.mount.strip("/")):
            raise ValueError("mount is an auth mount path such as approle or jwt")
        return self

    @property
    def mount_path(self) -> str:
        return (self.mount or self.method).strip("/")


class VaultConfig(_Model):
    """The vault (OpenBao or HashiCorp Vault) holding ``vault://`` seeds."""

    address: str
    namespace: str | None = None
    # PEM CA bundle that signs the vault's certificate (default: the system's).
    ca_file: Path | None = None
    timeout: Duration = Field(default=10.0, gt=0)
    # How often each secret's metadata version is checked for a new seed.
    poll_interval: Duration = Field(default=30.0, gt=0)
    auth: VaultAuthConfig

    @field_validator("address")
    @classmethod
    def _check_address(cls, url: str) -> str:
        if not re.match(r"https?://[^/]", url):
            raise ValueError("expected an http(s) URL such as https://vault.example.com:8200")
        return url.rstrip("/")


class AllowConfig(_Model):
    """Peers (by SO_PEERCRED) allowed to read this account's token over the socket."""

    uids: list[int] = Field(default_factory=list)
    gids: list[int] = Field(default_factory=list)


class OutputConfig(_Model):
    """An extra file per account rendered from a template, e.g.
    ``{file: auth-header, template: "Authorization: Bearer {access_token}"}``.
    Placeholders: access_token, token_type, expires_at, expires_in, scope, account."""

    file: Name
    template: str
    mode: FileMode | None = None

    @field_validator("file")
    @classmethod
    def _not_hidden(cls, file: str) -> str:
        # Names starting with ".." are the publisher's own (..data, version dirs).
        if file.startswith(".."):
            raise ValueError("output file names cannot start with '..'")
        return file

    @field_validator("template")
    @classmethod
    def _valid_template(cls, template: str) -> str:
        Template(template)  # raises ValueError saying what is wrong
        return template


class OnChangeConfig(_Model):
    """Tell an application that a new token was published."""

    # Signal the process whose pid is in this file...
    pid_file: Path | None = None
    signal: str = "SIGHUP"
    # ...and/or run this command (argv list, no shell), bounded in time.
    command: list[str] | None = None
    timeout: Duration = Field(default=10.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> OnChangeConfig:
        if self.pid_file is None and not self.command:
            raise ValueError("set pid_file or command (or both)")
        import signal as _signal

        if not hasattr(_signal, self.signal) or not self.signal.startswith("SIG"):
            raise ValueError(f"unknown signal {self.signal!r} (e.g. SIGHUP, SIGUSR1)")
        return self


class AccountConfig(_Model):
    """One account whose access token tokend keeps fresh."""

    provider: Name
    grant: Literal["refresh_token", "client_credentials"] = "refresh_token"
    # A seed, or vault://MOUNT/PATH#FIELD: the seed is that field of a KV v2 secret.
    refresh_token: SecretStr | None = None
    refresh_token_file: Path | None = None
    scope: str | None = None
    # One shared instance for every account that sets nothing here (the models are
    # frozen): a copy each costs ~500 bytes, 50 MB at 100,000 accounts.
    refresh: RefreshPolicyConfig = RefreshPolicyConfig()
    # Readiness waits for required accounts only.
    required: bool = True
    # Who may read this account's token over the socket (default: anyone who can
    # connect, which serve.socket_mode already limits).
    allow: AllowConfig | None = None
    # A tuple: one empty default for every account without outputs, and the model
    # stays hashable (identical accounts then share one object, see _load).
    outputs: tuple[OutputConfig, ...] = ()
    on_change: OnChangeConfig | None = None
    # Write rotated refresh tokens back to the vault:// seed (check-and-set); default on.
    write_back: bool | None = None
    # Revoke the refresh token when the account is removed (default: the provider's).
    revoke_on_remove: bool | None = None

    @field_validator("outputs")
    @classmethod
    def _distinct_outputs(cls, outputs: tuple[OutputConfig, ...]) -> tuple[OutputConfig, ...]:
        names = [o.file for o in outputs]
        clashes = sorted({n for n in names if names.count(n) > 1 or n in ("token", "token.json")})
        if clashes:
            raise ValueError(
                "output file names must be distinct and not 'token' or 'token.json': "
                + ", ".join(clashes)
            )
        return outputs

    _check_seed = field_validator("refresh_token")(_not_empty)

    @field_validator("refresh_token")
    @classmethod
    def _check_vault_ref(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and value.get_secret_value().startswith(VAULT_SCHEME):
            VaultRef.parse(value.get_secret_value())
        return value

    @property
    def vault_ref(self) -> VaultRef | None:
        """The vault secret holding the seed, if the seed is a ``vault://`` reference."""
        seed = self.refresh_token
        if seed is None or not seed.get_secret_value().startswith(VAULT_SCHEME):
            return None
        return VaultRef.parse(seed.get_secret_value())

    @property
    def writes_back(self) -> bool:
        return self.vault_ref is not None and self.write_back is not False

    @model_validator(mode="after")
    def _check(self) -> AccountConfig:
        has_seed = self.refresh_token is not None or self.refresh_token_file is not None
        if self.refresh_token is not None and self.refresh_token_file is not None:
            raise ValueError("set refresh_token or refresh_token_file, not both")
        # A refresh_token account without a seed waits (needs_reauth) for `tokend login`.
        if self.grant == "client_credentials" and has_seed:
            raise ValueError("grant client_credentials takes no refresh token")
        if self.write_back is not None and self.vault_ref is None:
            raise ValueError("write_back applies to vault:// seeds only")
        return self


class LogConfig(_Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"


class Config(_Model):
    """A whole tokend config file."""

    state: StateConfig = StateConfig()
    serve: ServeConfig = ServeConfig()
    log: LogConfig = LogConfig()
    # Refresh defaults for every provider and account.
    refresh: RefreshPolicyConfig = RefreshPolicyConfig()
    # Concurrent refreshes across all providers.
    max_concurrency: int = Field(default=64, ge=1, le=100_000)
    vault: VaultConfig | None = None
    providers: dict[Name, ProviderConfig] = Field(default_factory=dict)
    accounts: dict[Name, AccountConfig] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> Config:
        # The loader checks this itself, per account and alongside every other error
        # (this validator only runs once all fields are valid); it recognises this
        # error by its type and drops it rather than report it twice.
        for name, account in self.accounts.items():
            if account.provider not in self.providers:
                raise PydanticCustomError(
                    "unknown_provider",
                    "account {account}: {message}",
                    {
                        "account": name,
                        "message": unknown_provider_message(account.provider, self.providers),
                    },
                )
            if self.vault is None and account.vault_ref is not None:
                raise PydanticCustomError(
                    "vault_missing",
                    "account {account}: {message}",
                    {"account": name, "message": VAULT_MISSING},
                )
        return self
