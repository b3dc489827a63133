"""Test identity provider harness.

Runs ``tests/idp/server.mjs`` -- a real `oidc-provider` OAuth 2.0 / OpenID
Connect server -- as a subprocess and drives its control API (``/_test/...``).
Tests and demo scripts use it to get a genuine token endpoint whose behaviour
can be steered: seed refresh tokens without any browser flow, inject faults
(5xx, 429, a firewall's HTML 403, delays, hangs, connection resets, responses
lost after the refresh token was rotated) and inspect every token request the
IdP saw.

Typical use::

    keys = make_test_keys(tmp_path / "keys")
    clients = default_clients(keys["ec_public_jwk"], keys["rsa_public_jwk"])
    with IdP(tmp_path / "idp", clients=clients) as idp:
        refresh_token = idp.seed("basic-client")
        response = httpx.post(
            idp.token_endpoint,
            data={"grant_type": "refresh_token", "refresh_token": refresh_token},
            auth=("basic-client", "basic-secret"),
        )
        idp.fault("status_503", retry_after=2, count=1)
        ...
        assert idp.stats()["max_concurrent_per_grant"][grant_id] == 1

Only the standard library and httpx are used at import time; ``cryptography``
is imported lazily by :func:`make_test_keys`.

The node dependencies (``oidc-provider``) are installed on first use with
``npm ci`` in :data:`IDP_DIR` when ``node_modules`` is missing.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import shutil
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import IO, Any, TextIO

import httpx

#: Directory holding the node server (``server.mjs``, ``package.json``).
IDP_DIR = Path(__file__).parent / "idp"

SERVER_SCRIPT = IDP_DIR / "server.mjs"

#: Fault modes understood by :meth:`IdP.fault`.
FAULT_MODES = (
    "none",
    "status_500",
    "status_429",
    "status_503",
    "html_403",
    "delay",
    "hang",
    "reset",
    "lost_after_rotate",
    "oauth_error",
    "html",
    "token_rewrite",
    "respond_with",
    "override",
)

#: Client secrets used by :func:`default_clients`.
BASIC_SECRET = "basic-secret"
POST_SECRET = "post-secret"
LOGIN_SECRET = "login-secret"
DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
#: Contains characters that must be form-encoded before base64 in HTTP Basic
#: client authentication (RFC 6749 section 2.3.1).
CC_SECRET = "s3cr:et/+&%="

_DEFAULT_SCOPE = "openid offline_access read write profile"


class IdPError(RuntimeError):
    """The test IdP could not be started or a control API call failed."""


# ---------------------------------------------------------------------------
# keys and clients


def _b64url_uint(value: int) -> str:
    length = max(1, (value.bit_length() + 7) // 8)
    return base64.urlsafe_b64encode(value.to_bytes(length, "big")).rstrip(b"=").decode("ascii")


def _b64url_uint_fixed(value: int, length: int) -> str:
    return base64.urlsafe_b64encode(value.to_bytes(length, "big")).rstrip(b"=").decode("ascii")


def jwk_thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 SHA-256 thumbprint of a public EC or RSA JWK (base64url)."""
    if jwk["kty"] == "EC":
        members = {"crv": jwk["crv"], "kty": "EC", "x": jwk["x"], "y": jwk["y"]}
    elif jwk["kty"] == "RSA":
        members = {"e": jwk["e"], "kty": "RSA", "n": jwk["n"]}
    else:
        raise ValueError(f"unsupported kty {jwk['kty']!r}")
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode("utf-8")
    return base64.urlsafe_b64encode(hashlib.sha256(canonical).digest()).rstrip(b"=").decode("ascii")


def make_test_keys(dirpath: Path) -> dict[str, Any]:
    """Generate client signing keys for ``private_key_jwt`` authentication.

    Creates an EC P-256 key and an RSA 2048 key with the ``cryptography``
    package and writes, into ``dirpath`` (created if needed):

    * ``ec.pem`` and ``rsa.pem`` -- unencrypted PKCS#8 private keys,
    * ``ec.jwk.json`` and ``rsa.jwk.json`` -- the private keys as JWKs.

    Every JWK carries ``kid`` (its RFC 7638 thumbprint), ``use: "sig"`` and
    ``alg`` (``ES256`` / ``RS256``).

    Returns ``{"ec_pem": Path, "rsa_pem": Path, "ec_jwk": Path, "rsa_jwk":
    Path, "ec_public_jwk": dict, "rsa_public_jwk": dict, "ec_kid": str,
    "rsa_kid": str}``; the public JWKs are what :func:`default_clients`
    registers for ``jwt-client``.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    dirpath = Path(dirpath)
    dirpath.mkdir(parents=True, exist_ok=True)

    ec_key = ec.generate_private_key(ec.SECP256R1())
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    ec_numbers = ec_key.private_numbers()
    ec_public = {
        "kty": "EC",
        "crv": "P-256",
        "x": _b64url_uint_fixed(ec_numbers.public_numbers.x, 32),
        "y": _b64url_uint_fixed(ec_numbers.public_numbers.y, 32),
    }
    ec_public.update(kid=jwk_thumbprint(ec_public), use="sig", alg="ES256")
    ec_private = {**ec_public, "d": _b64url_uint_fixed(ec_numbers.private_value, 32)}

    rsa_numbers = rsa_key.private_numbers()
    rsa_public = {
        "kty": "RSA",
        "n": _b64url_uint(rsa_numbers.public_numbers.n),
        "e": _b64url_uint(rsa_numbers.public_numbers.e),
    }
    rsa_public.update(kid=jwk_thumbprint(rsa_public), use="sig", alg="RS256")
    rsa_private = {
        **rsa_public,
        "d": _b64url_uint(rsa_numbers.d),
        "p": _b64url_uint(rsa_numbers.p),
        "q": _b64url_uint(rsa_numbers.q),
        "dp": _b64url_uint(rsa_numbers.dmp1),
        "dq": _b64url_uint(rsa_numbers.dmq1),
        "qi": _b64url_uint(rsa_numbers.iqmp),
    }

    def pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    paths = {
        "ec_pem": dirpath / "ec.pem",
        "rsa_pem": dirpath / "rsa.pem",
        "ec_jwk": dirpath / "ec.jwk.json",
        "rsa_jwk": dirpath / "rsa.jwk.json",
    }
    paths["ec_pem"].write_bytes(pem(ec_key))
    paths["rsa_pem"].write_bytes(pem(rsa_key))
    paths["ec_jwk"].write_text(json.dumps(ec_private, indent=2) + "\n")
    paths["rsa_jwk"].write_text(json.dumps(rsa_private, indent=2) + "\n")
    for path in paths.values():
        path.chmod(0o600)

    return {
        **paths,
        "ec_public_jwk": ec_public,
        "rsa_public_jwk": rsa_public,
        "ec_kid": ec_public["kid"],
        "rsa_kid": rsa_public["kid"],
    }


def default_clients(
    ec_public_jwk: dict[str, Any], rsa_public_jwk: dict[str, Any]
) -> list[dict[str, Any]]:
    """The standard client set, one per token endpoint authentication method.

    * ``basic-client`` -- ``client_secret_basic``, secret :data:`BASIC_SECRET`
    * ``post-client`` -- ``client_secret_post``, secret :data:`POST_SECRET`
    * ``jwt-client`` -- ``private_key_jwt`` with both public keys registered
      and no fixed signing alg, so ES256 and RS256 assertions are accepted
    * ``public-client`` -- ``none`` (public client, sends only ``client_id``)
    * ``login-client`` -- a native app (RFC 8252: its loopback redirect URI
      ``http://127.0.0.1/callback`` matches on any port) with
      ``client_secret_basic`` and secret :data:`LOGIN_SECRET`, allowed the
      authorization code, device code and refresh token grants
    * ``cc-client`` -- ``client_secret_basic`` with secret :data:`CC_SECRET`
      (``s3cr:et/+&%=``), which only works when the id and secret are
      form-urlencoded before base64 as RFC 6749 section 2.3.1 requires;
      grant types ``client_credentials`` and ``refresh_token``, scope
      ``read write``

    The first four allow ``refresh_token``, ``authorization_code`` and
    ``client_credentials`` (public-client: no client_credentials) with scope
    ``openid offline_access read write profile``.
    """
    interactive = {
        "grant_types": ["refresh_token", "authorization_code", "client_credentials"],
        "redirect_uris": ["http://127.0.0.1/cb"],
        "response_types": ["code"],
        "scope": _DEFAULT_SCOPE,
    }
    return [
        {
            "client_id": "basic-client",
            "client_secret": BASIC_SECRET,
            "token_endpoint_auth_method": "client_secret_basic",
            **interactive,
        },
        {
            "client_id": "post-client",
            "client_secret": POST_SECRET,
            "token_endpoint_auth_method": "client_secret_post",
            **interactive,
        },
        {
            "client_id": "jwt-client",
            "token_endpoint_auth_method": "private_key_jwt",
            "jwks": {"keys": [dict(ec_public_jwk), dict(rsa_public_jwk)]},
            **interactive,
        },
        {
            "client_id": "public-client",
            "token_endpoint_auth_method": "none",
            **interactive,
            "grant_types": ["refresh_token", "authorization_code"],
        },
        {
            "client_id": "login-client",
            "client_secret": LOGIN_SECRET,
            "token_endpoint_auth_method": "client_secret_basic",
            "application_type": "native",
            "grant_types": ["authorization_code", "refresh_token", DEVICE_CODE_GRANT],
            "redirect_uris": ["http://127.0.0.1/callback"],
            "response_types": ["code"],
            "scope": _DEFAULT_SCOPE,
        },
        {
            "client_id": "cc-client",
            "client_secret": CC_SECRET,
            "token_endpoint_auth_method": "client_secret_basic",
            "grant_types": ["client_credentials", "refresh_token"],
            "redirect_uris": [],
            "response_types": [],
            "scope": "read write",
        },
    ]


# ---------------------------------------------------------------------------
# npm dependencies


def ensure_node_modules(timeout: float = 300) -> None:
    """Install the IdP's node dependencies with ``npm ci`` if missing.

    Safe to call from several processes at once: installs are serialised
    with a lock file in the system temp directory.
    """
    marker = IDP_DIR / "node_modules" / "oidc-provider" / "package.json"
    if marker.exists():
        return
    npm = shutil.which("npm")
    if npm is None:
        raise IdPError("npm not found on PATH; it is needed to install tests/idp dependencies")
    lock_name = (
        "tokend-test-idp-"
        + hashlib.sha256(str(IDP_DIR.resolve()).encode()).hexdigest()[:16]
        + ".lock"
    )
    lock_path = Path(tempfile.gettempdir()) / lock_name
    with open(lock_path, "w") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - non-POSIX
            pass
        if marker.exists():
            return
        result = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=IDP_DIR,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if result.returncode != 0 or not marker.exists():
            raise IdPError(
                f"npm ci in {IDP_DIR} failed with exit code {result.returncode}:\n"
                f"{result.stdout}\n{result.stderr}"
            )


# ---------------------------------------------------------------------------
# the harness


class IdP:
    """A running test identity provider (node subprocess) and its control API.

    Construct, then :meth:`start` (or use as a context manager)::

        with IdP(workdir, clients=clients) as idp:
            idp.token_endpoint  # discovered from /.well-known/openid-configuration

    ``workdir`` receives the server config (``idp-config.json``) and the
    server's combined stdout/stderr (``idp.log``; oidc-provider's
    ``grant.error`` lines there explain unexpected ``invalid_grant``).

    If ``clients`` is None, test keys are generated into ``workdir/keys``
    (see :attr:`keys`) and :func:`default_clients` is used.

    Constructor settings are the server defaults; :meth:`configure` changes
    them at runtime and :meth:`reset` restores them.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        clients: list[dict[str, Any]] | None = None,
        access_token_ttl: int = 5,
        rotate_refresh_tokens: bool = True,
        reuse_grace_seconds: int = 0,
        port: int = 0,
        refresh_token_ttl: int = 86400,
        tls: dict[str, str] | None = None,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        #: ``{"cert", "key", "ca"}`` (PEM file paths): serve HTTPS, asking clients for
        #: a certificate issued by ``ca`` (or any, for self-signed client auth); the
        #: mTLS client methods and certificate-bound access tokens are then on.
        self.tls = tls
        self.keys: dict[str, Any] | None = None
        self._clients = clients
        self.settings: dict[str, Any] = {
            "access_token_ttl": access_token_ttl,
            "refresh_token_ttl": refresh_token_ttl,
            "rotate_refresh_tokens": rotate_refresh_tokens,
            "reuse_grace_seconds": reuse_grace_seconds,
            "device_interval": None,
            "refresh_expires_in": None,
            "refresh_expires_at": None,
        }
        self.requested_port = port
        self.issuer: str = ""
        self.port: int = 0
        self.token_endpoint: str = ""
        #: The discovery document (``/.well-known/openid-configuration``).
        self.metadata: dict[str, Any] = {}
        self.config_path = self.workdir / "idp-config.json"
        self.log_path = self.workdir / "idp.log"
        self._proc: subprocess.Popen[str] | None = None
        self._http: httpx.Client | None = None
        self._threads: list[threading.Thread] = []
        self._log_file: TextIO | None = None
        self._log_lock = threading.Lock()
        self._ready = threading.Event()
        self._ready_line: str | None = None

    # -- lifecycle ---------------------------------------------------------

    @property
    def clients(self) -> list[dict[str, Any]]:
        """Client metadata registered with the IdP."""
        if self._clients is None:
            self.keys = make_test_keys(self.workdir / "keys")
            self._clients = default_clients(self.keys["ec_public_jwk"], self.keys["rsa_public_jwk"])
        return self._clients

    def start(self, timeout: float = 30) -> IdP:
        """Start the server and wait (at most ``timeout`` s) until it is ready.

        Installs node dependencies if needed, writes the config, launches
        ``node server.mjs``, waits for its ``READY`` line, then discovers the
        token endpoint. Returns ``self``. Raises :class:`IdPError` (with the
        tail of the server log) if the server exits or is not ready in time.
        """
        if self._proc is not None:
            raise IdPError("IdP already started")
        node = shutil.which("node")
        if node is None:
            raise IdPError("node not found on PATH")
        ensure_node_modules()
        deadline = time.monotonic() + timeout

        self.workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "port": self.requested_port,
            **self.settings,
            "exit_on_stdin_eof": True,
            "clients": self.clients,
        }
        if self.tls is not None:
            config["tls"] = self.tls
        self.config_path.write_text(json.dumps(config, indent=2) + "\n")

        self._ready.clear()
        self._ready_line = None
        self._log_file = open(self.log_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(
            [node, str(SERVER_SCRIPT), str(self.config_path)],
            cwd=IDP_DIR,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
        )
        self._threads = [
            threading.Thread(target=self._drain, args=(self._proc.stdout, "stdout"), daemon=True),
            threading.Thread(target=self._drain, args=(self._proc.stderr, "stderr"), daemon=True),
        ]
        for thread in self._threads:
            thread.start()

        while not self._ready.wait(0.05):
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self.stop()
                raise IdPError(
                    f"IdP exited with code {code} before it was ready\n{self._log_tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise IdPError(f"IdP not ready within {timeout} s\n{self._log_tail()}")

        try:
            assert self._ready_line is not None
            ready = json.loads(self._ready_line.split(" ", 1)[1])
            self.port = int(ready["port"])
            self.issuer = ready["issuer"]
            self._http = httpx.Client(
                base_url=self.issuer,
                timeout=10.0,
                verify=(
                    ssl.create_default_context(cafile=self.tls["ca"])
                    if self.tls is not None
                    else True
                ),
            )
            response = self._http.get("/.well-known/openid-configuration")
            response.raise_for_status()
            self.metadata = response.json()
            self.token_endpoint = self.metadata["token_endpoint"]
        except Exception:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s). Idempotent."""
        if self._http is not None:
            self._http.close()
            self._http = None
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads = []
        if proc is not None:
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        with self._log_lock:
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None

    @property
    def running(self) -> bool:
        """True while the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> IdP:
        # ``with IdP(...) as idp`` and ``with idp.start():`` both work
        if self._proc is None:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _drain(self, stream: IO[str], name: str) -> None:
        for line in stream:
            if name == "stdout" and not self._ready.is_set() and line.startswith("READY "):
                self._ready_line = line.strip()
                self._ready.set()
            with self._log_lock:
                if self._log_file is not None and not self._log_file.closed:
                    self._log_file.write(f"[{name}] {line}")
                    self._log_file.flush()

    def _log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- control API -------------------------------------------------------

    def _call(self, method: str, path: str, payload: dict[str, Any] | None = None) -> Any:
        if self._http is None:
            raise IdPError("IdP is not running")
        response = self._http.request(method, f"/_test/{path}", json=payload)
        if response.status_code != 200:
            raise IdPError(f"{method} /_test/{path} -> {response.status_code}: {response.text}")
        return response.json()

    def seed_grant(
        self,
        client_id: str,
        scope: str = "openid offline_access read",
        account_id: str = "user",
    ) -> dict[str, Any]:
        """Mint a real Grant and RefreshToken for ``client_id``.

        Returns ``{"refresh_token", "grant_id", "client_id", "account_id",
        "scope"}``. The refresh token works at the token endpoint with the
        normal ``refresh_token`` grant, bound to ``client_id``.
        """
        seeded: dict[str, Any] = self._call(
            "POST", "seed", {"client_id": client_id, "scope": scope, "account_id": account_id}
        )
        return seeded

    def seed(
        self,
        client_id: str,
        scope: str = "openid offline_access read",
        account_id: str = "user",
    ) -> str:
        """Like :meth:`seed_grant` but return only the refresh token."""
        return str(self.seed_grant(client_id, scope, account_id)["refresh_token"])

    def fault(self, mode: str, **kw: Any) -> None:
        """Set the fault applied to token endpoint requests.

        Modes: ``none``; ``status_500`` (JSON ``{"error": "server_error"}``);
        ``status_429`` / ``status_503`` (``retry_after=S`` adds a
        ``Retry-After`` header); ``html_403`` (a web firewall's "Sorry, you
        have been blocked" HTML page); ``delay`` (``delay_ms=N``, then handled
        normally); ``hang`` (no answer until the fault is changed -- then the
        request is handled normally -- or the client disconnects);
        ``reset`` (connection reset without an answer); ``lost_after_rotate``
        (handled normally, so a refresh token IS rotated, then the
        connection is dropped instead of sending the response); ``oauth_error``
        (``error=CODE``, ``status=N``, default 400: an RFC 6749 error body);
        ``html`` (``status=N``, default 200: a maintenance page);
        ``token_rewrite`` (handled normally, then a 200's JSON is changed:
        ``expires_in=VALUE``, None removes it; ``drop_refresh_token=True``);
        ``respond_with`` (``status=N``, default 200, and ``body={...}`` or
        ``raw="..."`` sent as application/json, without asking the provider);
        ``override`` (handled normally, so a refresh token IS rotated, then the
        JSON answer's fields are replaced by ``fields={...}`` and
        ``raw_fields={name: "raw JSON text"}``, e.g. ``{"expires_in": "NaN"}``).

        Faulted requests (other than ``delay``, ``hang`` released and
        ``lost_after_rotate``) never reach oidc-provider.

        Filters (any mode): ``count=N`` (only the next N matching requests,
        then back to ``none``), ``client_id=...`` (client from Basic auth,
        ``client_id`` or the client assertion's ``iss``),
        ``user_agent_contains=...``, ``grant_type=...``. Setting a new fault releases requests
        parked by ``hang``.
        """
        if mode not in FAULT_MODES:
            raise ValueError(f"unknown fault mode {mode!r}; expected one of {FAULT_MODES}")
        self._call("POST", "fault", {"mode": mode, **kw})

    def configure(self, **kw: Any) -> None:
        """Change runtime settings: ``reuse_grace_seconds``,
        ``rotate_refresh_tokens``, ``access_token_ttl``, ``refresh_token_ttl``,
        ``device_interval`` (None: the device authorization response names none),
        ``refresh_expires_in`` (seconds: token responses carry ``refresh_expires_in``
        with it, a sliding lifetime) and ``refresh_expires_at`` (unix seconds: they
        carry the seconds left until then, an absolute one); None sends neither.
        """
        self._call("POST", "config", kw)

    def log(self) -> list[dict[str, Any]]:
        """Every token endpoint request seen (since the last :meth:`clear_log`).

        Each entry: ``t_start``/``t_end`` (unix time; ``t_end`` is None while
        in flight), ``client_id``, ``grant_type``, ``refresh_token_sha256``,
        ``grant_id``, ``status`` (HTTP status sent; None if no response was
        sent), ``fault`` (mode applied or None), ``user_agent``,
        ``auth_method_seen`` (``basic``/``post``/``jwt``/``none``), plus
        ``provider_status`` (status oidc-provider produced, None if it never
        saw the request), ``error`` (OAuth error code it returned) and
        ``grace_reuse`` (True if accepted through the reuse grace window).
        """
        entries: list[dict[str, Any]] = self._call("GET", "log")
        return entries

    def clear_log(self) -> None:
        """Forget all logged token endpoint requests."""
        self._call("DELETE", "log")

    def stats(self) -> dict[str, Any]:
        """Concurrency counters of token endpoint requests.

        ``{"max_concurrent_per_grant": {grant_id: n}, "max_concurrent_total":
        n, "requests": n, "in_flight_total": n}``. A request counts for a
        grant when it presents a refresh token of that grant.
        """
        counters: dict[str, Any] = self._call("GET", "stats")
        return counters

    def reset_stats(self) -> None:
        """Zero the counters of :meth:`stats`."""
        self._call("DELETE", "stats")

    def revoke_grant(self, grant_id: str) -> None:
        """Revoke a grant and all its tokens; its next refresh gets invalid_grant."""
        self._call("POST", "revoke_grant", {"grant_id": grant_id})

    def reset(self) -> None:
        """Back to a clean state between tests: no fault (releasing hung
        requests), constructor settings, empty log, zeroed stats. Seeded
        grants stay valid."""
        self.fault("none")
        self.configure(**self.settings)
        self.clear_log()
        self.reset_stats()

    # -- helpers for tests -------------------------------------------------

    @staticmethod
    def token_sha256(refresh_token: str) -> str:
        """The ``refresh_token_sha256`` value the log uses for a token."""
        return hashlib.sha256(refresh_token.encode("utf-8")).hexdigest()

    def wait_for_log(
        self,
        predicate: Callable[[list[dict[str, Any]]], bool],
        timeout: float = 5.0,
        interval: float = 0.02,
    ) -> list[dict[str, Any]]:
        """Poll :meth:`log` until ``predicate(entries)`` is true.

        Returns the entries; raises ``TimeoutError`` after ``timeout`` s.
        """
        deadline = time.monotonic() + timeout
        while True:
            entries = self.log()
            if predicate(entries):
                return entries
            if time.monotonic() > deadline:
                raise TimeoutError(f"log condition not met within {timeout} s; log: {entries}")
            time.sleep(interval)


def basic_auth_header(client_id: str, client_secret: str) -> str:
    """HTTP Basic client authentication per RFC 6749 section 2.3.1:
    form-urlencode id and secret, join with ``:``, then base64."""
    from urllib.parse import quote_plus

    raw = f"{quote_plus(client_id)}:{quote_plus(client_secret)}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


# ---------------------------------------------------------------------------
# a browser for the sign-in pages


class _Forms(HTMLParser):
    """The forms of a page: action, method and their named inputs' values."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[dict[str, Any]] = []
        self._current: dict[str, Any] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {name: value or "" for name, value in attrs}
        if tag == "form":
            self._current = {
                "action": attributes.get("action", ""),
                "method": attributes.get("method", "get").upper(),
                "fields": {},
            }
            self.forms.append(self._current)
        elif tag == "input" and self._current is not None and "name" in attributes:
            self._current["fields"][attributes["name"]] = attributes.get("value", "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._current = None


def sign_in(
    url: str,
    *,
    login: str = "alice",
    user_code: str | None = None,
    max_steps: int = 20,
    timeout: float = 10.0,
) -> httpx.Response:
    """Do what a person in a browser does with the test IdP's sign-in pages.

    Starting at ``url`` (an authorization URL, or a device verification URI), follow
    redirects and submit each form on the way: the user code (``user_code``), the
    login (any name is accepted; it becomes the account id), the device
    confirmation and the consent. A redirect that leaves the IdP (to an app's
    loopback redirect URI) is followed once more and its response returned; so is the
    first page without a form (the device flow's success page).
    """
    origin = httpx.URL(url)
    with httpx.Client(timeout=timeout, follow_redirects=False) as browser:
        response = browser.get(url)
        for _ in range(max_steps):
            if response.is_redirect:
                target = response.url.join(response.headers["location"])
                if (target.host, target.port) != (origin.host, origin.port):
                    with httpx.Client(timeout=timeout) as other:
                        return other.get(target)
                response = browser.get(target)
                continue
            parser = _Forms()
            parser.feed(response.text)
            forms = [f for f in parser.forms if f["method"] == "POST"]
            if response.status_code != 200 or not forms:
                return response
            form = forms[0]
            fields = dict(form["fields"])
            if "login" in fields:
                fields.update(login=login, password="any")
            if "user_code" in fields and not fields["user_code"]:
                if user_code is None:
                    raise AssertionError("the sign-in asks for a user code; pass user_code=")
                fields["user_code"] = user_code
            response = browser.post(response.url.join(form["action"]), data=fields)
        raise AssertionError(f"sign-in did not finish within {max_steps} steps")
