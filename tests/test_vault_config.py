"""The vault: block, vault:// seeds and the state key in the config: positions of every
problem, paths taken from the config's directory, and no value echoed."""

from __future__ import annotations

from pathlib import Path

from tests.test_config import PROVIDER, problems, write
from tokend.config import VaultRef, load_config

VAULT = """\
vault:
  address: https://vault.example.com:8200/
  namespace: team-a
  ca_file: ca.pem
  auth: {method: approle, role_id: r-1, secret_id_file: secret-id}
"""


def test_a_vault_config_loads_with_paths_from_the_config_directory(tmp_path: Path) -> None:
    for name in ("ca.pem", "secret-id", "state.key"):
        (tmp_path / name).write_text("x")
    path = write(
        tmp_path,
        PROVIDER
        + VAULT
        + """\
state: {encryption_key_file: state.key}
accounts:
  alice: {provider: idp, refresh_token: "vault://secret/tokend/alice#refresh_token"}
  bob:
    provider: idp
    refresh_token: vault://kv/team/bob#rt
    write_back: false
""",
    )
    config = load_config(path, environ={})
    assert config.vault is not None
    assert config.vault.address == "https://vault.example.com:8200"
    assert config.vault.ca_file == tmp_path / "ca.pem"
    assert config.vault.auth.secret_id_file == tmp_path / "secret-id"
    assert config.vault.auth.mount_path == "approle"
    assert config.state.encryption_key_file == tmp_path / "state.key"
    alice, bob = config.accounts["alice"], config.accounts["bob"]
    assert alice.vault_ref == VaultRef("secret", "tokend/alice", "refresh_token")
    assert alice.writes_back and not bob.writes_back
    assert bob.vault_ref == VaultRef("kv", "team/bob", "rt")


def test_vault_problems_point_at_their_keys(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        PROVIDER
        + """\
accounts:
  alice: {provider: idp, refresh_token: "vault://secret/tokend/alice#refresh_token"}
  bob: {provider: idp, refresh_token: "vault://secret-no-path#f"}
  carol: {provider: idp, refresh_token: plain-seed-value, write_back: true}
""",
    )
    found = problems(path)
    assert found[0] == (
        f"{path}:7:26: accounts.alice.refresh_token: a vault:// seed needs a top-level "
        "'vault:' block (address, auth)"
    )
    assert any(f"{path}:8:24: accounts.bob.refresh_token: a vault seed is" in p for p in found)
    assert f"{path}:9:3: accounts.carol: write_back applies to vault:// seeds only" in found
    assert not any("plain-seed-value" in p for p in found)


def test_vault_auth_methods_say_what_they_need(tmp_path: Path) -> None:
    cases = {
        "{method: token}": "method token needs exactly one of token or token_file",
        "{method: approle, secret_id: s}": "method approle needs role_id",
        "{method: jwt, role: r}": "method jwt needs role and jwt_file",
        "{method: kubernetes, role: r, role_id: x}": "method kubernetes does not use: role_id",
        "{method: ldap}": "auth.method",
    }
    for auth, message in cases.items():
        path = write(
            tmp_path,
            PROVIDER
            + f"vault:\n  address: http://127.0.0.1:8200\n  auth: {auth}\naccounts: {{}}\n",
        )
        (problem,) = problems(path)
        assert f"{path}:8:" in problem and message in problem, problem
    path = write(
        tmp_path, PROVIDER + "vault:\n  address: vault:8200\n  auth: {method: token, token: t}\n"
    )
    (problem,) = problems(path)
    assert f"{path}:7:3: vault.address: expected an http(s) URL" in problem
