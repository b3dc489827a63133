"""Client authentication with a TLS client certificate (RFC 8705): tls_client_auth (a
certificate from a CA the IdP trusts) and self_signed_tls_client_auth (a certificate
registered with the client), against the test IdP serving HTTPS on loopback with
certificates made here; the access tokens come back bound to the certificate."""

from __future__ import annotations

import base64
import datetime
import hashlib
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.idp_harness import IdP
from tokend.config import ProviderConfig
from tokend.oauth import (
    FailureKind,
    ProviderClient,
    ProviderSetupError,
    TokenFailure,
    TokenResponse,
)

CLIENT_DNS = "client.tokend.test"


def _b64url(value: int) -> str:
    return base64.urlsafe_b64encode(value.to_bytes(32, "big")).rstrip(b"=").decode()


def self_signed(directory: Path) -> tuple[Path, Path, dict[str, Any], bytes]:
    """A self-signed EC certificate and key, its public JWK with x5c, and its DER."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tokend self-signed")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    der = cert.public_bytes(serialization.Encoding.DER)
    numbers = key.public_key().public_numbers()
    jwk = {
        "kty": "EC",
        "crv": "P-256",
        "x": _b64url(numbers.x),
        "y": _b64url(numbers.y),
        "x5c": [base64.b64encode(der).decode()],
    }
    cert_path, key_path = directory / "self.pem", directory / "self.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path, jwk, der


class Pki:
    def __init__(self, directory: Path) -> None:
        ca = trustme.CA()
        self.ca = directory / "ca.pem"
        ca.cert_pem.write_to_path(self.ca)
        server = ca.issue_cert("127.0.0.1")
        self.server_cert, self.server_key = directory / "server.pem", directory / "server.key"
        self.server_cert.write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
        server.private_key_pem.write_to_path(self.server_key)
        client = ca.issue_cert(CLIENT_DNS)
        self.client_cert, self.client_key = directory / "client.pem", directory / "client.key"
        self.client_cert.write_bytes(client.cert_chain_pems[0].bytes())
        client.private_key_pem.write_to_path(self.client_key)
        self.client_der = x509.load_pem_x509_certificate(
            self.client_cert.read_bytes()
        ).public_bytes(serialization.Encoding.DER)
        self.self_cert, self.self_key, self.self_jwk, self.self_der = self_signed(directory)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def mtls_idp(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[IdP]:
    bound = {
        "tls_client_certificate_bound_access_tokens": True,
        "grant_types": ["client_credentials", "refresh_token"],
        "redirect_uris": [],
        "response_types": [],
        "scope": "openid offline_access read write",
    }
    clients = [
        {
            "client_id": "mtls-client",
            "token_endpoint_auth_method": "tls_client_auth",
            "tls_client_auth_san_dns": CLIENT_DNS,
            **bound,
        },
        {
            "client_id": "self-signed-client",
            "token_endpoint_auth_method": "self_signed_tls_client_auth",
            "jwks": {"keys": [pki.self_jwk]},
            **bound,
        },
    ]
    tls = {"cert": str(pki.server_cert), "key": str(pki.server_key), "ca": str(pki.ca)}
    with IdP(tmp_path_factory.mktemp("mtls-idp"), clients=clients, tls=tls) as server:
        yield server


def provider(idp: IdP, pki: Pki, client_id: str, cert: Path, key: Path) -> ProviderConfig:
    method = "tls_client_auth" if client_id == "mtls-client" else "self_signed_tls_client_auth"
    return ProviderConfig.model_validate(
        {
            "issuer": idp.issuer,
            "client_id": client_id,
            "auth_method": method,
            "tls_client_cert_file": str(cert),
            "tls_client_key_file": str(key),
            "tls_ca_file": str(pki.ca),
        }
    )


def thumbprint(der: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()


def introspect(idp: IdP, pki: Pki, config: ProviderConfig, token: str) -> dict[str, Any]:
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.load_cert_chain(str(config.tls_client_cert_file), str(config.tls_client_key_file))
    with httpx.Client(verify=context) as http:
        response = http.post(
            idp.metadata["introspection_endpoint"],
            data={"token": token, "client_id": config.client_id},
        )
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


@pytest.mark.parametrize("client_id", ["mtls-client", "self-signed-client"])
def test_certificate_authenticates_and_binds_the_tokens(
    mtls_idp: IdP, pki: Pki, client_id: str
) -> None:
    if client_id == "mtls-client":
        cert, key, der = pki.client_cert, pki.client_key, pki.client_der
    else:
        cert, key, der = pki.self_cert, pki.self_key, pki.self_der
    config = provider(mtls_idp, pki, client_id, cert, key)
    seed = mtls_idp.seed(client_id, scope="openid offline_access read")

    async def main() -> tuple[object, object]:
        async with ProviderClient("idp", config) as client:
            return await client.client_credentials("read"), await client.refresh(seed)

    issued, refreshed = anyio.run(main)
    assert isinstance(issued, TokenResponse), issued
    assert isinstance(refreshed, TokenResponse), refreshed
    assert refreshed.refresh_token not in (None, seed)
    assert [e["auth_method_seen"] for e in mtls_idp.log()][-2:] == ["none", "none"]
    # Bound to the certificate tokend presented (RFC 8705 3.1), and passed through as is.
    for token in (issued, refreshed):
        details = introspect(mtls_idp, pki, config, token.access_token)
        assert details["active"] is True
        assert details["cnf"] == {"x5t#S256": thumbprint(der)}


def test_a_certificate_the_client_did_not_register_is_refused(mtls_idp: IdP, pki: Pki) -> None:
    # The CA-issued certificate, presented as the self-signed client's.
    config = provider(mtls_idp, pki, "self-signed-client", pki.client_cert, pki.client_key)

    async def main() -> object:
        async with ProviderClient("idp", config) as client:
            return await client.client_credentials("read")

    outcome = anyio.run(main)
    assert isinstance(outcome, TokenFailure)
    assert (outcome.kind, outcome.reason) == (FailureKind.PROVIDER_PERMANENT, "invalid_client")


def test_unusable_certificate_files_are_named(pki: Pki, tmp_path: Path) -> None:
    wrong_key = tmp_path / "wrong.key"
    wrong_key.write_bytes(pki.self_key.read_bytes())
    config = ProviderConfig.model_validate(
        {
            "token_endpoint": "https://127.0.0.1:9/token",
            "client_id": "c",
            "auth_method": "tls_client_auth",
            "tls_client_cert_file": str(pki.client_cert),
            "tls_client_key_file": str(wrong_key),
        }
    )
    with pytest.raises(ProviderSetupError, match=r"tls_client_cert_file .* are not a PEM"):
        ProviderClient("idp", config)
    with pytest.raises(ValueError, match="needs tls_client_cert_file"):
        ProviderConfig.model_validate(
            {"token_endpoint": "https://x/t", "client_id": "c", "auth_method": "tls_client_auth"}
        )
