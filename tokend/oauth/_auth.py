"""Client authentication at the token endpoint (RFC 6749 2.3.1, OIDC Core 9, RFC 7523).

Secrets are read once, at startup, and failures to read them are reported in terms an
operator can act on: which provider, which file, what is wrong with it. No message
here ever quotes a secret or key material.
"""

from __future__ import annotations

import base64
import json
import secrets
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, cast
from urllib.parse import quote_plus

import certifi

from tokend.config import ProviderConfig

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

# jwt and cryptography are imported only where private_key_jwt needs them: they cost
# every tokend ~45 ms of start time and ~10 MB of memory otherwise.

AuthMethod = Literal[
    "client_secret_basic",
    "client_secret_post",
    "private_key_jwt",
    "tls_client_auth",
    "self_signed_tls_client_auth",
    "none",
]
SigningAlg = Literal["ES256", "RS256"]

JWT_BEARER_ASSERTION = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# Short enough that a leaked assertion is soon useless, long enough for clock skew.
ASSERTION_LIFETIME_SECONDS = 60
MIN_RSA_KEY_BITS = 2048


class ProviderSetupError(Exception):
    """A provider's credentials cannot be loaded; the message says what to fix."""


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A private key for private_key_jwt, with the algorithm and key id to use."""

    key: PrivateKey = field(repr=False)
    algorithm: SigningAlg
    key_id: str | None = None
    # The key file's secret text (PEM base64 lines, private JWK members), for the
    # log redactor.
    material: tuple[str, ...] = field(default=(), repr=False)


@dataclass(frozen=True, slots=True)
class ClientCredentials:
    """What one token request carries to authenticate the client."""

    headers: dict[str, str] = field(repr=False)
    form: dict[str, str] = field(repr=False)
    # Values an IdP could echo back, to be scrubbed from its error texts.
    secrets: tuple[str, ...] = field(repr=False)


def basic_authorization(client_id: str, client_secret: str, *, form_encode: bool = True) -> str:
    """The Authorization header value for client_secret_basic.

    RFC 6749 2.3.1 form-encodes each part before base64; skipping that breaks any
    secret containing ":", "+", "%" or "&" at a server that decodes. ``form_encode``
    False sends them as they are, for servers that do not decode.
    """
    if form_encode:
        user_pass = f"{quote_plus(client_id)}:{quote_plus(client_secret)}"
    else:
        user_pass = f"{client_id}:{client_secret}"
    return "Basic " + base64.b64encode(user_pass.encode()).decode("ascii")


def client_assertion(client_id: str, audience: str, key: SigningKey, now: float) -> str:
    """A signed RFC 7523 client assertion for one token request."""
    issued_at = int(now)
    claims = {
        "iss": client_id,
        "sub": client_id,
        "aud": audience,
        "jti": secrets.token_urlsafe(24),
        "iat": issued_at,
        "exp": issued_at + ASSERTION_LIFETIME_SECONDS,
    }
    headers = {"kid": key.key_id} if key.key_id else None
    import jwt

    return jwt.encode(claims, key.key, algorithm=key.algorithm, headers=headers)


class ClientAuth:
    """Turns a provider's configured client authentication into request credentials."""

    __slots__ = ("_client_id", "_client_secret", "_form_encode", "_method", "_signing_key")

    def __init__(
        self,
        method: AuthMethod,
        client_id: str,
        *,
        client_secret: str | None = None,
        signing_key: SigningKey | None = None,
        form_encode_basic: bool = True,
    ) -> None:
        if method in ("client_secret_basic", "client_secret_post") and not client_secret:
            raise ValueError(f"{method} needs a client secret")
        if method == "private_key_jwt" and signing_key is None:
            raise ValueError("private_key_jwt needs a signing key")
        self._method = method
        self._client_id = client_id
        self._client_secret = client_secret
        self._signing_key = signing_key
        self._form_encode = form_encode_basic

    @classmethod
    def from_config(cls, provider: str, config: ProviderConfig) -> ClientAuth:
        """Load the credentials ``config`` names; raises ProviderSetupError."""
        method = config.auth_method
        client_secret = None
        signing_key = None
        if method in ("client_secret_basic", "client_secret_post"):
            client_secret = load_client_secret(provider, config)
        elif method == "private_key_jwt":
            if config.private_key_file is None:
                raise ProviderSetupError(
                    f"provider {provider!r}: auth_method private_key_jwt needs private_key_file"
                )
            signing_key = load_signing_key(provider, config.private_key_file, config.signing_alg)
        return cls(
            method,
            config.client_id,
            client_secret=client_secret,
            signing_key=signing_key,
            form_encode_basic=config.basic_auth_encoding == "form",
        )

    @property
    def method(self) -> AuthMethod:
        return self._method

    @property
    def secrets(self) -> tuple[str, ...]:
        """Long-lived secrets an IdP could echo (per-request ones come with credentials)."""
        return (self._client_secret,) if self._client_secret else ()

    @property
    def redaction_values(self) -> tuple[str, ...]:
        """Everything long-lived that must never reach a log: the client secret, the
        Basic credential made from it, and the signing key's text."""
        values: list[str] = []
        if self._client_secret:
            values.append(self._client_secret)
            if self._method == "client_secret_basic":
                values.append(basic_authorization(self._client_id, self._client_secret)[6:])
        if self._signing_key is not None:
            values.extend(self._signing_key.material)
        return tuple(values)

    def credentials(self, token_endpoint: str, now: float) -> ClientCredentials:
        """Headers and form fields that authenticate one request to ``token_endpoint``."""
        if self._method == "client_secret_basic":
            assert self._client_secret is not None
            header = basic_authorization(
                self._client_id, self._client_secret, form_encode=self._form_encode
            )
            return ClientCredentials(
                {"Authorization": header}, {}, (self._client_secret, header.split(" ", 1)[1])
            )
        if self._method == "client_secret_post":
            assert self._client_secret is not None
            form = {"client_id": self._client_id, "client_secret": self._client_secret}
            return ClientCredentials({}, form, (self._client_secret,))
        if self._method == "private_key_jwt":
            assert self._signing_key is not None
            assertion = client_assertion(self._client_id, token_endpoint, self._signing_key, now)
            form = {
                "client_id": self._client_id,
                "client_assertion_type": JWT_BEARER_ASSERTION,
                "client_assertion": assertion,
            }
            return ClientCredentials({}, form, (assertion,))
        # none, and the tls_client_auth methods (the TLS connection carries the
        # certificate that authenticates; RFC 8705 2 still names the client).
        return ClientCredentials({}, {"client_id": self._client_id}, ())

    def __repr__(self) -> str:
        return f"ClientAuth(method={self._method!r}, client_id={self._client_id!r})"


def tls_context(provider: str, config: ProviderConfig) -> ssl.SSLContext | None:
    """The TLS context for connections to the IdP when the provider has a client
    certificate or its own CA file (else None: httpx's default verification).
    Raises ProviderSetupError saying which file is wrong."""
    cert, key, ca = config.tls_client_cert_file, config.tls_client_key_file, config.tls_ca_file
    if cert is None and ca is None:
        return None
    where = f"provider {provider!r}"
    try:
        # Without a CA file, the same CA bundle httpx verifies with by default.
        context = ssl.create_default_context(cafile=str(ca) if ca is not None else certifi.where())
    except (OSError, ssl.SSLError) as exc:
        raise ProviderSetupError(
            f"{where}: tls_ca_file {str(ca)!r} holds no usable CA certificate ({_ssl_reason(exc)})"
        ) from None
    if cert is not None:
        assert key is not None  # the schema sets both or neither
        try:
            context.load_cert_chain(str(cert), str(key))
        except (OSError, ssl.SSLError) as exc:
            raise ProviderSetupError(
                f"{where}: tls_client_cert_file {str(cert)!r} and tls_client_key_file "
                f"{str(key)!r} are not a PEM certificate and its unencrypted private key "
                f"({_ssl_reason(exc)})"
            ) from None
    return context


def _ssl_reason(exc: OSError | ssl.SSLError) -> str:
    # The reason code alone: a library message could quote file content.
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).lower()
    return (exc.strerror or type(exc).__name__).lower()


def load_client_secret(provider: str, config: ProviderConfig) -> str:
    """The client secret from the config or from client_secret_file."""
    if config.client_secret is not None:
        secret = config.client_secret.get_secret_value()
        if not secret:
            raise ProviderSetupError(f"provider {provider!r}: client_secret is empty")
        return secret
    path = config.client_secret_file
    if path is None:
        raise ProviderSetupError(
            f"provider {provider!r}: auth_method {config.auth_method} needs "
            "client_secret or client_secret_file"
        )
    where = f"provider {provider!r}: client_secret_file {str(path)!r}"
    problem: str | None = None
    secret = ""
    try:
        secret = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        problem = "is not UTF-8 text"
    except OSError as exc:
        problem = _os_problem(exc)
    if problem is None:
        # Editors and `echo` add a final newline that is not part of the secret.
        secret = secret.rstrip("\r\n")
        if not secret:
            problem = "is empty; put the client secret in it"
    if problem is not None:
        raise ProviderSetupError(f"{where} {problem}")
    return secret


def load_signing_key(provider: str, path: Path, algorithm: SigningAlg | None) -> SigningKey:
    """The private key for private_key_jwt from a PEM file or a JWK (JSON) file.

    ``algorithm`` defaults from the key type: EC P-256 signs ES256, RSA signs RS256.
    """
    where = f"provider {provider!r}: private_key_file {str(path)!r}"
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ProviderSetupError(f"{where} {_os_problem(exc)}") from None
    parsed = _parse_jwk(raw) if raw.lstrip().startswith(b"{") else _parse_pem(raw)
    if isinstance(parsed, str):
        raise ProviderSetupError(f"{where} {parsed}")
    key, key_id, declared_alg = parsed
    algorithm_or_problem = _choose_algorithm(key, algorithm, declared_alg)
    if algorithm_or_problem not in ("ES256", "RS256"):
        raise ProviderSetupError(f"{where} {algorithm_or_problem}")
    chosen: SigningAlg = "ES256" if algorithm_or_problem == "ES256" else "RS256"
    signing_key = SigningKey(key, chosen, key_id, _key_material(raw))
    # Sign once now, so a key the signer rejects fails at startup, not at 3 a.m.
    signed = True
    try:
        client_assertion("probe", "probe", signing_key, 0.0)
    except Exception:
        signed = False
    if not signed:
        raise ProviderSetupError(f"{where} cannot sign {signing_key.algorithm} assertions")
    return signing_key


# Members of a private JWK that are secret (RFC 7518 6.2.2, 6.3.2, 6.4.1).
_PRIVATE_JWK_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "k")


def _key_material(raw: bytes) -> tuple[str, ...]:
    """The secret text of a key file: a PEM's base64 lines, or a JWK's private members."""
    text = raw.decode("utf-8", errors="replace")
    if text.lstrip().startswith("{"):
        try:
            document = json.loads(text)
        except ValueError:
            return ()
        keys = document.get("keys") if isinstance(document, dict) else None
        found: list[str] = []
        for key in keys if isinstance(keys, list) else [document]:
            if isinstance(key, dict):
                found += [v for m in _PRIVATE_JWK_MEMBERS if isinstance(v := key.get(m), str)]
        return tuple(found)
    lines = (line.strip() for line in text.splitlines())
    return tuple(
        line for line in lines if line and not line.startswith("-----") and ":" not in line
    )


def _os_problem(exc: OSError) -> str:
    reason = exc.strerror or type(exc).__name__
    return f"cannot be read ({reason}); check that it exists and tokend may read it"


_ParsedKey = tuple["PrivateKey", str | None, str | None]


def _is_private_key(key: object) -> bool:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    return isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)


def _parse_pem(raw: bytes) -> _ParsedKey | str:
    # Errors are returned, not raised, so no library exception (whose text could
    # quote key material) is chained to the ProviderSetupError.
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_private_key(raw, password=None)
    except TypeError:
        return "is an encrypted PEM key; tokend needs it unencrypted (protect the file instead)"
    except Exception:
        return "is neither a PEM private key nor a private JWK (JSON)"
    if not _is_private_key(key):
        return "is not an EC P-256 or RSA private key"
    return cast("PrivateKey", key), None, None


def _parse_jwk(raw: bytes) -> _ParsedKey | str:
    try:
        document = json.loads(raw)
    except ValueError:
        return "looks like JSON but does not parse as JSON"
    if isinstance(document, dict) and isinstance(document.get("keys"), list):
        # A JWK Set holding exactly one key is accepted as that key.
        keys = document["keys"]
        if len(keys) != 1:
            return "is a JWK Set with more than one key; give a file with exactly one key"
        document = keys[0]
    if not isinstance(document, dict):
        return "is not a JWK (a JSON object)"
    if "d" not in document:
        return "holds a public JWK; private_key_jwt needs the private key"
    import jwt

    key: object = None
    try:
        key = jwt.PyJWK(document).key
    except Exception:
        key = None
    if not _is_private_key(key):
        return "is not a usable EC P-256 or RSA private JWK"
    key_id = document.get("kid")
    declared_alg = document.get("alg")
    return (
        cast("PrivateKey", key),
        key_id if isinstance(key_id, str) and key_id else None,
        declared_alg if isinstance(declared_alg, str) else None,
    )


def _choose_algorithm(key: PrivateKey, configured: SigningAlg | None, declared: str | None) -> str:
    """The algorithm to sign with ("ES256" or "RS256"), or why there is none."""
    from cryptography.hazmat.primitives.asymmetric import ec

    if isinstance(key, ec.EllipticCurvePrivateKey):
        if key.curve.name != "secp256r1":
            return f"is an EC key on {key.curve.name}; only P-256 (ES256) is supported"
        natural = "ES256"
    else:
        if key.key_size < MIN_RSA_KEY_BITS:
            return f"is a {key.key_size}-bit RSA key; RS256 needs at least {MIN_RSA_KEY_BITS}"
        natural = "RS256"
    chosen = configured or natural
    if chosen != natural:
        kind = "an EC P-256" if natural == "ES256" else "an RSA"
        return f"is {kind} key, which cannot sign {chosen}; set signing_alg: {natural}"
    if declared is not None and declared != chosen:
        return f"declares alg {declared} but tokend signs {chosen} with it"
    return chosen
