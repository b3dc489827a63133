"""The vault client against a real OpenBao server: reads, check-and-set writes, every
login method, token renewal, and one clear line for each way a read can fail."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.vault_harness import Bao, make_jwt
from tokend.config import VaultAuthConfig, VaultConfig, VaultRef
from tokend.sources import VaultClient, VaultError, VaultErrorKind

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _config(bao: Bao, auth: dict[str, Any], **extra: Any) -> VaultConfig:
    return VaultConfig(address=bao.address, auth=VaultAuthConfig(**auth), timeout=2, **extra)


def _path() -> str:
    return f"tokend/{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def client(bao: Bao) -> AsyncIterator[VaultClient]:
    vc = VaultClient(_config(bao, {"method": "token", "token": bao.token(["tokend"])}))
    try:
        yield vc
    finally:
        await vc.aclose()


async def test_read_and_check_and_set_write(bao: Bao, client: VaultClient) -> None:
    path = _path()
    bao.put_secret(path, {"refresh_token": "rt-1", "note": "kept"})
    ref = VaultRef("secret", path, "refresh_token")
    secret = await client.read(ref, "alice")
    assert (secret.version, secret.value("alice")) == (1, "rt-1")
    assert await client.current_version(ref, "alice") == 1
    version = await client.write(ref, "alice", {**secret.data, "refresh_token": "rt-2"}, cas=1)
    assert version == 2
    assert bao.get_secret(path) == ({"refresh_token": "rt-2", "note": "kept"}, 2)
    # A second writer that read version 1 loses, and nothing is overwritten.
    with pytest.raises(VaultError) as conflict:
        await client.write(ref, "alice", {"refresh_token": "rt-stale"}, cas=1)
    assert conflict.value.kind is VaultErrorKind.CAS_CONFLICT
    assert bao.get_secret(path)[0]["refresh_token"] == "rt-2"


async def test_each_bad_read_is_one_line_naming_account_and_path(
    bao: Bao, client: VaultClient
) -> None:
    path = _path()
    bao.put_secret(path, {"other": "s3cret-value"})

    async def failure(ref: VaultRef, vc: VaultClient = client) -> VaultError:
        with pytest.raises(VaultError) as caught:
            (await vc.read(ref, "alice")).value("alice")
        message = str(caught.value)
        assert "\n" not in message and "account alice" in message
        assert ref.where in message
        assert "s3cret-value" not in message
        return caught.value

    missing = await failure(VaultRef("secret", "tokend/none-here", "refresh_token"))
    assert missing.kind is VaultErrorKind.MISSING_SECRET
    assert "bao kv put -mount=secret tokend/none-here refresh_token=" in str(missing)
    field = await failure(VaultRef("secret", path, "refresh_token"))
    assert field.kind is VaultErrorKind.MISSING_FIELD
    assert "fields present: other" in str(field)
    bao.call("POST", "kv1/tokend/alice", {"refresh_token": "x"})
    v1 = await failure(VaultRef("kv1", "tokend/alice", "refresh_token"))
    assert v1.kind is VaultErrorKind.WRONG_MOUNT and "KV version 1" in str(v1)
    nomount = await failure(VaultRef("nosuchmount", "tokend/alice", "refresh_token"))
    assert nomount.kind in (VaultErrorKind.WRONG_MOUNT, VaultErrorKind.PERMISSION)
    denied = await failure(VaultRef("secret", "elsewhere/alice", "refresh_token"))
    assert denied.kind is VaultErrorKind.PERMISSION
    assert "'read' on secret/data/elsewhere/alice" in str(denied)
    deleted_path = _path()
    bao.put_secret(deleted_path, {"refresh_token": "gone"})
    bao.delete_secret(deleted_path)
    deleted = await failure(VaultRef("secret", deleted_path, "refresh_token"))
    assert deleted.kind is VaultErrorKind.MISSING_SECRET and "is deleted" in str(deleted)


async def test_expired_token_and_sealed_vault(bao: Bao, tmp_path: Path) -> None:
    path = _path()
    bao.put_secret(path, {"refresh_token": "rt"})
    ref = VaultRef("secret", path, "refresh_token")
    token = bao.token(["tokend"])
    vc = VaultClient(_config(bao, {"method": "token", "token": token}))
    try:
        await vc.read(ref, "alice")
        bao.call("POST", "auth/token/revoke", {"token": token})
        with pytest.raises(VaultError) as caught:
            await vc.read(ref, "alice")
        assert caught.value.kind is VaultErrorKind.AUTH
        assert "expired or revoked" in str(caught.value)
    finally:
        await vc.aclose()

    # A token file is read again when its token is refused: rotating the file heals it.
    token_file = tmp_path / "token"
    token_file.write_text(bao.token(["tokend"], ttl="1h"))
    vc = VaultClient(_config(bao, {"method": "token", "token_file": token_file}))
    try:
        await vc.read(ref, "alice")
        bao.call("POST", "auth/token/revoke-self", token=token_file.read_text())
        token_file.write_text(bao.token(["tokend"]) + "\n")
        assert (await vc.read(ref, "alice")).value("alice") == "rt"
        bao.seal()
        try:
            with pytest.raises(VaultError) as sealed:
                await vc.read(ref, "alice")
            assert sealed.value.kind is VaultErrorKind.SEALED and sealed.value.transient
        finally:
            bao.unseal()
    finally:
        await vc.aclose()


async def test_approle_login_renewal_and_relogin_at_max_ttl(bao: Bao, tmp_path: Path) -> None:
    import anyio

    role_id, secret_id = bao.approle("renewing", token_ttl="3s", token_max_ttl="5s")
    secret_file = tmp_path / "secret-id"
    secret_file.write_text(secret_id + "\n")
    path = _path()
    bao.put_secret(path, {"refresh_token": "rt"})
    ref = VaultRef("secret", path, "refresh_token")
    vc = VaultClient(
        _config(bao, {"method": "approle", "role_id": role_id, "secret_id_file": secret_file})
    )
    try:
        assert (await vc.read(ref, "alice")).value("alice") == "rt"
        assert vc.logins == 1
        async with anyio.create_task_group() as group:
            group.start_soon(vc.maintain_token)
            # 3 s leases renewed at 2 s; the 5 s max TTL forces a new login.
            deadline = time.monotonic() + 15
            while (vc.renewals < 1 or vc.logins < 2) and time.monotonic() < deadline:
                await anyio.sleep(0.1)
                await vc.read(ref, "alice")
            group.cancel_scope.cancel()
        assert vc.renewals >= 1 and vc.logins >= 2
    finally:
        await vc.aclose()


async def test_approle_refused_is_an_auth_error(bao: Bao) -> None:
    role_id, _ = bao.approle("refused")
    vc = VaultClient(
        _config(bao, {"method": "approle", "role_id": role_id, "secret_id": "not-the-secret"})
    )
    try:
        with pytest.raises(VaultError) as caught:
            await vc.read(VaultRef("secret", "tokend/x", "f"), "alice")
        assert caught.value.kind is VaultErrorKind.AUTH
        assert "not-the-secret" not in str(caught.value)
        assert "auth/approle" in str(caught.value)
    finally:
        await vc.aclose()


async def test_jwt_login_with_a_key_pair(bao: Bao, tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    public_pem = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    bao.jwt_role("tokend", public_pem, audience="tokend", token_ttl="1m")
    now = int(time.time())
    jwt_file = tmp_path / "jwt"
    jwt_file.write_text(
        make_jwt(
            key,
            {
                "sub": "system:serviceaccount:ns:tokend",
                "aud": "tokend",
                "iat": now,
                "exp": now + 600,
            },
        )
    )
    path = _path()
    bao.put_secret(path, {"refresh_token": "rt-jwt"})
    vc = VaultClient(
        _config(bao, {"method": "jwt", "role": "tokend", "jwt_file": jwt_file, "mount": "jwt"})
    )
    try:
        secret = await vc.read(VaultRef("secret", path, "refresh_token"), "alice")
        assert secret.value("alice") == "rt-jwt"
        assert vc.logins == 1
    finally:
        await vc.aclose()
    # A JWT signed by another key is refused with one line.
    jwt_file.write_text(
        make_jwt(
            ec.generate_private_key(ec.SECP256R1()),
            {"sub": "x", "aud": "tokend", "iat": now, "exp": now + 600},
        )
    )
    vc = VaultClient(_config(bao, {"method": "jwt", "role": "tokend", "jwt_file": jwt_file}))
    try:
        with pytest.raises(VaultError) as caught:
            await vc.ensure_token()
        assert caught.value.kind is VaultErrorKind.AUTH
    finally:
        await vc.aclose()


async def test_unreachable_vault(tmp_path: Path) -> None:
    from tests.vault_harness import free_port

    config = VaultConfig(
        address=f"http://127.0.0.1:{free_port()}",
        auth=VaultAuthConfig(method="token", token="t"),
        timeout=1,
    )
    vc = VaultClient(config)
    try:
        with pytest.raises(VaultError) as caught:
            await vc.read(VaultRef("secret", "tokend/a", "f"), "alice")
        assert caught.value.kind is VaultErrorKind.UNREACHABLE and caught.value.transient
        assert "cannot reach" in str(caught.value)
    finally:
        await vc.aclose()
