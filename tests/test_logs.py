"""Redaction: secrets registered with the logger never appear in a line; forgotten
ones (spent refresh tokens, long-replaced access tokens) free their slot."""

from __future__ import annotations

import io
import json
from pathlib import Path

from tokend import logs


def test_registered_secrets_are_redacted_and_forgotten_ones_released() -> None:
    out = io.StringIO()
    logs.configure(stream=out)
    spent, current = "spent-refresh-token-0001", "current-refresh-token-0002"
    logs.register_secret(spent)
    logs.register_secret(current)
    logs.forget_secret(spent)
    logs.get_logger().info("x", detail=f"saw {spent} and {current}", refresh_token=current)
    line = json.loads(out.getvalue())
    assert current not in out.getvalue()
    assert line["refresh_token"] == logs.REDACTED
    # A forgotten value is no longer held (nor matched) by the redactor.
    assert spent in line["detail"]


def test_secrets_with_characters_outside_words_are_redacted() -> None:
    out = io.StringIO()
    logs.configure(stream=out)
    punctuated = "s3cr:et/+&%="  # no run of 8 word characters inside it
    anchored = "k3y:0123456789abcdef:tail!"  # one inner word, then punctuation
    for secret in (punctuated, anchored):
        logs.register_secret(secret)
    logs.get_logger().info(
        "x",
        detail=f"form client_secret={punctuated}&x=1; header {anchored}; again{punctuated}",
        nested={"list": [f"({anchored})"]},
    )
    text = out.getvalue()
    assert punctuated not in text and anchored not in text
    assert text.count(logs.REDACTED) == 4, text
    # Redaction is exact: the inner word alone, or a near miss, is left alone.
    assert logs.redact("0123456789abcdef") == "0123456789abcdef"
    assert logs.redact("s3cr:et/+&%") == "s3cr:et/+&%"
    logs.forget_secret(anchored)
    assert logs.redact(anchored) == anchored


def test_client_secrets_and_key_material_are_registered_with_the_redactor(
    tmp_path: Path,
) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from pydantic import SecretStr

    from tokend.config import ProviderConfig
    from tokend.oauth import ProviderClient

    secret = "pr0v:ider/secret+&%="
    basic = ProviderClient(
        "basic",
        ProviderConfig(
            token_endpoint="https://idp.example/token",
            client_id="client",
            client_secret=SecretStr(secret),
        ),
    )
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    key_file = tmp_path / "key.pem"
    key_file.write_bytes(pem)
    signed = ProviderClient(
        "jwt",
        ProviderConfig(
            token_endpoint="https://idp.example/token",
            client_id="client",
            auth_method="private_key_jwt",
            private_key_file=key_file,
        ),
    )
    from urllib.parse import quote_plus

    from tokend.oauth._auth import basic_authorization

    for text in (secret, quote_plus(secret), basic_authorization("client", secret)[6:]):
        assert logs.redact(f"echo: {text} .") == f"echo: {logs.REDACTED} ."
    key_lines = [line for line in pem.decode().splitlines() if not line.startswith("-----")]
    assert key_lines
    for line in key_lines:
        if len(line) >= 8:
            assert line not in logs.redact(pem.decode())
    del basic, signed


def test_secret_fields_are_redacted_and_fields_naming_tokens_are_not() -> None:
    out = io.StringIO()
    logs.configure(stream=out)
    secret = "sekrit-value-000111"
    logs.get_logger().info(
        "once_done",
        ok=False,
        accounts_without_token=["alice", "bob"],
        token_valid=True,
        token_type="Bearer",
        token_expires_at=1795000000,
        refresh_token=secret,
        access_token=secret,
        new_refresh_token=secret,
        client_secret=secret,
        password=secret,
        request={"headers": {"Authorization": f"Basic {secret}", "Set-Cookie": secret}},
        form={"client_assertion": secret, "code_verifier": secret, "grant_type": "x"},
    )
    line = json.loads(out.getvalue())
    assert secret not in out.getvalue()
    assert line["accounts_without_token"] == ["alice", "bob"]
    assert (line["token_valid"], line["token_type"], line["token_expires_at"]) == (
        True,
        "Bearer",
        1795000000,
    )
    for key in ("refresh_token", "access_token", "new_refresh_token", "client_secret", "password"):
        assert line[key] == logs.REDACTED, key
    assert line["request"]["headers"] == {
        "Authorization": logs.REDACTED,
        "Set-Cookie": logs.REDACTED,
    }
    assert line["form"] == {
        "client_assertion": logs.REDACTED,
        "code_verifier": logs.REDACTED,
        "grant_type": "x",
    }
