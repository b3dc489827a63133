"""A small client for the vault's HTTP API (OpenBao and HashiCorp Vault speak the same).

Only the calls tokend needs, each listed in the README so an operator can grant exactly
those: KV v2 read (``GET MOUNT/data/PATH``), version check (``GET MOUNT/metadata/PATH``),
check-and-set write (``POST MOUNT/data/PATH`` with ``options.cas``), login (AppRole, JWT,
Kubernetes), ``auth/token/lookup-self`` and ``auth/token/renew-self``, and, only to
explain a failed read, ``sys/internal/ui/mounts/MOUNT/PATH``.

Every failure is a :class:`VaultError` whose message is one actionable line naming the
account and the secret, never a value: vault answers are parsed for their ``errors`` list
and shape only, and the token never leaves the request headers.
"""

from __future__ import annotations

import enum
import json
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import anyio
import httpx

from tokend._version import __version__
from tokend.config import VaultConfig, VaultRef, read_secret_file
from tokend.logs import get_logger, register_secret

__all__ = ["KvSecret", "VaultClient", "VaultError", "VaultErrorKind"]

_log = get_logger()

# A KV v2 answer holds a few small fields; anything larger is not one.
_MAX_BODY: Final = 1 << 20
# Where a pod's service account token is mounted (method kubernetes, no jwt_file).
K8S_SA_TOKEN: Final = "/var/run/secrets/kubernetes.io/serviceaccount/token"
# Renew at this fraction of the token's lease; a renewal granting less than this
# fraction of the login's lease has met the token's max TTL: log in again instead.
_RENEW_AT: Final = 2 / 3
_RENEW_SHORTFALL: Final = 0.5
# Retry delays of a failed login or renewal (the data calls retry on their own).
_LOGIN_RETRY_MIN: Final = 1.0
_LOGIN_RETRY_MAX: Final = 60.0


class VaultErrorKind(enum.StrEnum):
    UNREACHABLE = "unreachable"  # connection failed, timed out, or a 5xx
    SEALED = "sealed"
    AUTH = "auth"  # login refused, or the token is expired or revoked
    PERMISSION = "permission_denied"  # the token's policy lacks the capability
    MISSING_SECRET = "missing_secret"
    MISSING_FIELD = "missing_field"
    WRONG_MOUNT = "wrong_mount"  # KV v1, not KV, or no such mount
    CAS_CONFLICT = "cas_conflict"  # someone else wrote the secret since it was read
    BAD_ANSWER = "bad_answer"  # not the JSON the API documents

    @property
    def transient(self) -> bool:
        """Worth retrying soon without anyone changing anything."""
        return self in (VaultErrorKind.UNREACHABLE, VaultErrorKind.SEALED)


class VaultError(Exception):
    """One actionable line; never a secret."""

    def __init__(self, kind: VaultErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind

    @property
    def transient(self) -> bool:
        return self.kind.transient


@dataclass(frozen=True, slots=True)
class KvSecret:
    """One version of a KV v2 secret."""

    ref: VaultRef
    version: int
    data: Mapping[str, Any] = field(repr=False)

    def value(self, account: str) -> str:
        """The referenced field: a non-empty string, else a MISSING_FIELD error."""
        value = self.data.get(self.ref.field)
        if not isinstance(value, str) or not value.strip():
            found = "is missing" if value is None else "is not a non-empty string"
            raise VaultError(
                VaultErrorKind.MISSING_FIELD,
                f"account {account}: vault secret {self.ref.where} (version {self.version}): "
                f"field {self.ref.field!r} {found}; fields present: "
                f"{', '.join(sorted(self.data)) or 'none'}",
            )
        return value.strip()


@dataclass(slots=True)
class _Answer:
    status: int
    body: Any  # parsed JSON, or None

    @property
    def errors(self) -> list[str]:
        errors = self.body.get("errors") if isinstance(self.body, dict) else None
        return [e for e in errors if isinstance(e, str)] if isinstance(errors, list) else []


class VaultClient:
    """Talks to one vault with one token, kept fresh by :meth:`maintain_token`."""

    def __init__(
        self, config: VaultConfig, *, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self.config = config
        headers = {"User-Agent": f"tokend/{__version__}", "X-Vault-Request": "true"}
        if config.namespace:
            headers["X-Vault-Namespace"] = config.namespace
        verify: ssl.SSLContext | bool = True
        if config.ca_file is not None:
            verify = ssl.create_default_context(cafile=str(config.ca_file))
        self._http = httpx.AsyncClient(
            base_url=config.address + "/v1/",
            headers=headers,
            timeout=httpx.Timeout(config.timeout),
            verify=verify,
            transport=transport,
            follow_redirects=False,
        )
        self._token: str | None = None
        # Monotonic time the token's lease ends (None: it does not expire).
        self._expires: float | None = None
        self._lease: float | None = None
        self._renewable = False
        self._login_lock = anyio.Lock()
        # Set when a call found the token refused: the maintenance loop logs in again.
        self._refused = anyio.Event()
        self.requests = 0  # every HTTP request made (for the benchmarks and tests)
        self.logins = 0
        self.renewals = 0

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- KV v2 ---------------------------------------------------------------------------

    async def read(self, ref: VaultRef, account: str) -> KvSecret:
        """The newest version of ``ref``'s secret."""
        answer = await self._call("GET", f"{ref.mount}/data/{ref.path}", account, ref, "read")
        if answer.status == 404:
            raise await self._explain_missing(ref, account, answer)
        self._check(answer, ref, account, "read")
        data = _dig(answer.body, "data", "data")
        version = _dig(answer.body, "data", "metadata", "version")
        if not isinstance(data, dict) or not isinstance(version, int):
            raise self._bad_answer(ref, account, "read")
        return KvSecret(ref, version, data)

    async def current_version(self, ref: VaultRef, account: str) -> int:
        """The secret's newest version number, without reading its data."""
        answer = await self._call(
            "GET", f"{ref.mount}/metadata/{ref.path}", account, ref, "read the metadata of"
        )
        if answer.status == 404:
            raise await self._explain_missing(ref, account, answer)
        self._check(answer, ref, account, "read the metadata of")
        version = _dig(answer.body, "data", "current_version")
        if not isinstance(version, int):
            raise self._bad_answer(ref, account, "read the metadata of")
        return version

    async def write(self, ref: VaultRef, account: str, data: Mapping[str, Any], cas: int) -> int:
        """Write a new version if the newest is still ``cas``; returns the new version.
        Raises CAS_CONFLICT if someone else wrote first (nothing was written)."""
        body = {"options": {"cas": cas}, "data": dict(data)}
        # cas 0 creates the secret (a first sign-in); any other version updates it.
        verb = "create" if cas == 0 else "write"
        answer = await self._call("POST", f"{ref.mount}/data/{ref.path}", account, ref, verb, body)
        if answer.status == 400 and any("check-and-set" in e for e in answer.errors):
            raise VaultError(
                VaultErrorKind.CAS_CONFLICT,
                f"account {account}: vault secret {ref.where}: written by someone else "
                f"since version {cas} was read",
            )
        self._check(answer, ref, account, "write")
        version = _dig(answer.body, "data", "version")
        if not isinstance(version, int):
            raise self._bad_answer(ref, account, "write")
        return version

    # -- the token -----------------------------------------------------------------------

    async def ensure_token(self) -> None:
        """Log in if there is no token yet (once, for every caller waiting)."""
        if self._token is None:
            await self.login()

    async def login(self, *, stale: str | None = None) -> None:
        """Get a new token by the configured method. ``stale``: the token a caller saw
        refused; if another caller replaced it meanwhile, nothing is done."""
        async with self._login_lock:
            if stale is not None and self._token != stale:
                return
            await self._login_locked()

    async def _login_locked(self) -> None:
        auth = self.config.auth
        where = f"vault login ({auth.method})"
        if auth.method == "token":
            token = self._read_secret(auth.token, auth.token_file, where)
            register_secret(token)
            self._token = token
            await self._lookup_self(where)
        else:
            payload: dict[str, str]
            if auth.method == "approle":
                secret_id = self._read_secret(auth.secret_id, auth.secret_id_file, where)
                payload = {"role_id": auth.role_id or "", "secret_id": secret_id}
            else:
                jwt_path = auth.jwt_file or Path(K8S_SA_TOKEN)
                payload = {"role": auth.role or "", "jwt": self._read_secret(None, jwt_path, where)}
            answer = await self._raw("POST", f"auth/{auth.mount_path}/login", where, payload)
            if answer.status in (400, 401, 403):
                raise VaultError(
                    VaultErrorKind.AUTH,
                    f"{where} on auth/{auth.mount_path} refused ({answer.status}: "
                    f"{_summary(answer)}): check the role and its credentials",
                )
            self._check_status(answer, where)
            token = _dig(answer.body, "auth", "client_token")
            if not isinstance(token, str) or not token:
                raise VaultError(VaultErrorKind.BAD_ANSWER, f"{where}: the answer holds no token")
            register_secret(token)
            self._token = token
            self._set_lease(
                _dig(answer.body, "auth", "lease_duration"), _dig(answer.body, "auth", "renewable")
            )
            self._lease = self._lease_now()
        self.logins += 1
        self._refused = anyio.Event()
        _log.info(
            "vault_login",
            method=auth.method,
            ttl_s=None if self._lease is None else round(self._lease),
        )

    async def _lookup_self(self, where: str) -> None:
        answer = await self._raw("GET", "auth/token/lookup-self", where)
        if answer.status in (401, 403):
            raise VaultError(
                VaultErrorKind.AUTH,
                f"{where}: the vault token is expired, revoked or not a token; "
                "put a valid one in the token file",
            )
        self._check_status(answer, where)
        self._set_lease(_dig(answer.body, "data", "ttl"), _dig(answer.body, "data", "renewable"))
        self._lease = self._lease_now()

    def _set_lease(self, ttl: object, renewable: object) -> None:
        if isinstance(ttl, int) and ttl > 0:
            self._expires = time.monotonic() + ttl
        else:
            self._expires = None  # a token without a TTL (root, periodic with no ttl)
        self._renewable = renewable is True

    def _lease_now(self) -> float | None:
        return None if self._expires is None else max(0.0, self._expires - time.monotonic())

    async def renew(self) -> bool:
        """Extend the token's lease. False if the vault refused (log in again)."""
        where = "vault token renewal"
        answer = await self._raw("POST", "auth/token/renew-self", where, {})
        if answer.status in (400, 401, 403):
            _log.warning("vault_renew_refused", status=answer.status, reason=_summary(answer))
            return False
        self._check_status(answer, where)
        lease = _dig(answer.body, "auth", "lease_duration")
        self._set_lease(lease, _dig(answer.body, "auth", "renewable"))
        self.renewals += 1
        granted = self._lease_now()
        _log.debug("vault_token_renewed", ttl_s=None if granted is None else round(granted))
        if granted is not None and self._lease and granted < self._lease * _RENEW_SHORTFALL:
            # The token's max TTL caps it: the next step is a new login.
            self._renewable = False
        return True

    async def maintain_token(self) -> None:
        """Run forever: log in, renew before expiry, log in again when renewal is
        refused or the max TTL nears, or when a call found the token refused."""
        failures = 0
        while True:
            try:
                if self._token is None:
                    await self.login()
                wait = self._next_step_in()
                with anyio.move_on_after(wait if wait is not None else float("inf")):
                    await self._refused.wait()
                renewed = False
                if not self._refused.is_set() and self._token is not None and self._renewable:
                    renewed = await self.renew()
                if not renewed:
                    await self.login()
                failures = 0
            except VaultError as exc:
                failures += 1
                delay = min(_LOGIN_RETRY_MAX, _LOGIN_RETRY_MIN * 2 ** min(failures, 10))
                _log.error("vault_auth_failed", error=str(exc), retry_in_s=delay)
                await anyio.sleep(delay)

    def _next_step_in(self) -> float | None:
        if self._expires is None:
            return None
        left = self._expires - time.monotonic()
        lease = self._lease or left
        return max(0.0, left - lease * (1 - _RENEW_AT))

    def _read_secret(self, inline: Any, path: Any, where: str) -> str:
        if inline is not None:
            value: str = inline.get_secret_value()
            register_secret(value)
            return value
        try:
            value = read_secret_file(path)
            register_secret(value)
            return value
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            message = f"{where}: cannot read {path}: {reason}"
            raise VaultError(VaultErrorKind.AUTH, message) from None

    # -- plumbing ------------------------------------------------------------------------

    async def _call(
        self,
        method: str,
        path: str,
        account: str,
        ref: VaultRef,
        verb: str,
        body: Any = None,
    ) -> _Answer:
        """A call with the token; a refused token gets one new login and one retry."""
        await self.ensure_token()
        where = f"account {account}: vault secret {ref.where}"
        used = self._token
        answer = await self._raw(method, path, where, body)
        auth = self.config.auth
        can_login_again = auth.method != "token" or auth.token_file is not None
        if answer.status == 403 and can_login_again:
            # The token may have expired or been revoked: a new one, then once more.
            await self.login(stale=used)
            answer = await self._raw(method, path, where, body)
        if answer.status == 403:
            lookup = await self._raw("GET", "auth/token/lookup-self", where)
            if lookup.status in (401, 403):
                self._refused.set()
                raise VaultError(
                    VaultErrorKind.AUTH,
                    f"{where}: the vault token is expired or revoked "
                    f"(tokend logs in again; check vault.auth)",
                )
            raise VaultError(
                VaultErrorKind.PERMISSION,
                f"{where}: permission denied to {verb} {path}: the token's policy needs "
                f"'{_capability(method, verb)}' on {path}",
            )
        return answer

    async def _raw(self, method: str, path: str, where: str, body: Any = None) -> _Answer:
        headers = {"X-Vault-Token": self._token} if self._token else {}
        self.requests += 1
        try:
            with anyio.fail_after(self.config.timeout):
                async with self._http.stream(method, path, json=body, headers=headers) as response:
                    raw = bytearray()
                    async for chunk in response.aiter_bytes():
                        raw += chunk
                        if len(raw) > _MAX_BODY:
                            raise VaultError(
                                VaultErrorKind.BAD_ANSWER,
                                f"{where}: the vault's answer is larger than {_MAX_BODY} bytes",
                            )
                    status = response.status_code
        except TimeoutError:
            raise VaultError(
                VaultErrorKind.UNREACHABLE,
                f"{where}: no answer from {self.config.address} within "
                f"{self.config.timeout:g} s (vault.timeout)",
            ) from None
        except httpx.HTTPError as exc:
            raise VaultError(
                VaultErrorKind.UNREACHABLE,
                f"{where}: cannot reach {self.config.address}: {type(exc).__name__}"
                f"{': ' + _short(exc) if _short(exc) else ''}",
            ) from None
        parsed: Any = None
        if raw:
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = None
        answer = _Answer(status, parsed)
        if status == 503 and any("sealed" in e.lower() for e in answer.errors):
            raise VaultError(
                VaultErrorKind.SEALED,
                f"{where}: the vault at {self.config.address} is sealed; unseal it "
                "(tokend retries)",
            )
        return answer

    def _check(self, answer: _Answer, ref: VaultRef, account: str, verb: str) -> None:
        self._check_status(answer, f"account {account}: vault secret {ref.where}: {verb}")

    def _check_status(self, answer: _Answer, where: str) -> None:
        if answer.status >= 500:
            raise VaultError(
                VaultErrorKind.UNREACHABLE,
                f"{where}: the vault answered {answer.status} ({_summary(answer)})",
            )
        if not 200 <= answer.status < 300:
            raise VaultError(
                VaultErrorKind.BAD_ANSWER,
                f"{where}: the vault answered {answer.status} ({_summary(answer)})",
            )
        if not isinstance(answer.body, dict):
            raise VaultError(VaultErrorKind.BAD_ANSWER, f"{where}: the answer is not JSON")

    def _bad_answer(self, ref: VaultRef, account: str, verb: str) -> VaultError:
        return VaultError(
            VaultErrorKind.BAD_ANSWER,
            f"account {account}: vault secret {ref.where}: {verb}: the answer is not a "
            f"KV v2 answer (is {ref.mount} a KV v2 mount?)",
        )

    async def _explain_missing(self, ref: VaultRef, account: str, answer: _Answer) -> VaultError:
        where = f"account {account}: vault secret {ref.where}"
        metadata = _dig(answer.body, "data", "metadata")
        if isinstance(metadata, dict) and (
            metadata.get("destroyed") is True or metadata.get("deletion_time")
        ):
            return VaultError(
                VaultErrorKind.MISSING_SECRET,
                f"{where}: its newest version ({metadata.get('version')}) is deleted; "
                "write the refresh token again (bao kv put) or undelete it",
            )
        # A 404 also comes from a KV v1 mount (it has no data/ prefix) or no mount at all:
        # ask the vault what the mount is, to say which.
        mount = await self._raw("GET", f"sys/internal/ui/mounts/{ref.mount}/{ref.path}", where)
        kind = _dig(mount.body, "data", "type")
        version = _dig(mount.body, "data", "options", "version")
        if mount.status == 200 and isinstance(kind, str):
            if kind not in ("kv", "generic"):
                return VaultError(
                    VaultErrorKind.WRONG_MOUNT,
                    f"{where}: {ref.mount} is a {kind} mount, not KV v2",
                )
            if str(version) != "2":
                return VaultError(
                    VaultErrorKind.WRONG_MOUNT,
                    f"{where}: {ref.mount} is a KV version 1 mount; tokend needs KV v2 "
                    f"(bao kv enable-versioning {ref.mount})",
                )
        elif mount.status in (400, 404):
            return VaultError(
                VaultErrorKind.WRONG_MOUNT,
                f"{where}: no secrets engine is mounted at {ref.mount}/",
            )
        return VaultError(
            VaultErrorKind.MISSING_SECRET,
            f"{where}: no such secret; write it: bao kv put -mount={ref.mount} {ref.path} "
            f"{ref.field}=...",
        )


def _dig(body: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(body, dict):
            return None
        body = body.get(key)
    return body


def _summary(answer: _Answer) -> str:
    # The vault's own error strings name paths and reasons, never secret values.
    errors = [e for e in answer.errors if e][:2]
    text = "; ".join(e.replace("\n", " ")[:200] for e in errors)
    return text or "no error text"


def _short(exc: Exception) -> str:
    return str(exc).replace("\n", " ")[:200]


def _capability(method: str, verb: str) -> str:
    if verb == "create":
        return "create"
    if method == "POST":
        return "update"  # a check-and-set write of an existing secret
    return "read"
