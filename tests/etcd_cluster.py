"""A real etcd cluster for the tests: three members on loopback, each its own process.

Members listen on free ports and keep their data under one directory each, so a killed
member restarts on its own data (as a crashed pod would) and rejoins the cluster.
Only the standard library and httpx are used; the cluster is driven through the v3
JSON gateway, the same interface tokend uses.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


class EtcdError(RuntimeError):
    """The cluster could not be started or did not become healthy in time."""


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def b64(value: str | bytes) -> str:
    raw = value.encode() if isinstance(value, str) else value
    return base64.b64encode(raw).decode()


def unb64(value: str) -> bytes:
    return base64.b64decode(value)


class Member:
    def __init__(self, name: str, datadir: Path, client_port: int, peer_port: int) -> None:
        self.name = name
        self.datadir = datadir
        self.client_url = f"http://127.0.0.1:{client_port}"
        self.peer_url = f"http://127.0.0.1:{peer_port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = datadir.parent / f"{name}.log"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class EtcdCluster:
    """Three etcd members; ``kill``/``start`` one, find the leader, read keys."""

    def __init__(
        self, root: Path, size: int = 3, *, heartbeat_ms: int = 50, election_ms: int = 500
    ) -> None:
        self.root = Path(root)
        self.heartbeat_ms = heartbeat_ms
        self.election_ms = election_ms
        ports = _free_ports(2 * size)
        self.members = [
            Member(f"m{i}", self.root / f"m{i}.data", ports[2 * i], ports[2 * i + 1])
            for i in range(size)
        ]
        self.initial_cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        self._started_once: set[str] = set()

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    def __enter__(self) -> EtcdCluster:
        self.start_all()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop_all()

    def start_all(self, timeout: float = 30.0) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for member in self.members:
            self.start(member, wait=False)
        self.wait_healthy(timeout)

    def start(self, member: Member, *, wait: bool = True, timeout: float = 30.0) -> None:
        if member.running:
            return
        fresh = member.name not in self._started_once
        cmd = [
            ETCD,
            "--name", member.name,
            "--data-dir", str(member.datadir),
            "--listen-client-urls", member.client_url,
            "--advertise-client-urls", member.client_url,
            "--listen-peer-urls", member.peer_url,
            "--initial-advertise-peer-urls", member.peer_url,
            "--initial-cluster", self.initial_cluster,
            "--initial-cluster-state", "new",
            "--initial-cluster-token", f"tokend-test-{id(self)}",
            # Loopback: short heartbeats make elections (and the tests) quick.
            "--heartbeat-interval", str(self.heartbeat_ms),
            "--election-timeout", str(self.election_ms),
            "--snapshot-count", "10000",
            "--log-level", "warn",
            "--logger", "zap",
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        log = member.log_path.open("ab")
        member.proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
        log.close()
        if fresh:
            self._started_once.add(member.name)
        if wait:
            self.wait_healthy(timeout)

    def kill(self, member: Member) -> None:
        """SIGKILL one member (its data stays for a restart)."""
        if member.proc is not None and member.proc.poll() is None:
            member.proc.send_signal(signal.SIGKILL)
            member.proc.wait(10)

    def stop_all(self) -> None:
        for member in self.members:
            self.kill(member)

    def status(self, member: Member, timeout: float = 0.5) -> dict[str, Any] | None:
        try:
            r = httpx.post(f"{member.client_url}/v3/maintenance/status", json={}, timeout=timeout)
            r.raise_for_status()
            body: dict[str, Any] = r.json()
            return body
        except (httpx.HTTPError, ValueError):
            return None

    def leader(self, timeout: float = 10.0) -> Member:
        """The member that is leader now (waits for an election to finish)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for member in self.members:
                if not member.running:
                    continue
                st = self.status(member)
                if st is None:
                    continue
                if st.get("leader") and st.get("leader") == st.get("header", {}).get("member_id"):
                    return member
            time.sleep(0.05)
        raise EtcdError("no leader elected in time")

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Until every running member answers and a quorum can commit a write."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                for member in self.members:
                    if member.running:
                        r = httpx.post(
                            f"{member.client_url}/v3/kv/range",
                            json={"key": b64("health")},
                            timeout=0.5,
                        )
                        r.raise_for_status()
                self.put("health", "ok", timeout=0.5)
                return
            except (httpx.HTTPError, EtcdError) as exc:
                last = str(exc)
            for member in self.members:
                if member.proc is not None and member.proc.poll() not in (None, -9):
                    tail = member.log_path.read_text(errors="replace")[-2000:]
                    raise EtcdError(f"etcd member {member.name} exited:\n{tail}")
            time.sleep(0.05)
        raise EtcdError(f"etcd cluster not healthy after {timeout}s: {last}")

    # -- direct key access for assertions -------------------------------------------

    def _post(
        self, path: str, body: dict[str, Any], timeout: float = 2.0, attempt: float = 0.5
    ) -> dict[str, Any]:
        last: Exception | None = None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for member in self.members:
                if not member.running:
                    continue
                try:
                    r = httpx.post(f"{member.client_url}{path}", json=body, timeout=attempt)
                    r.raise_for_status()
                    result: dict[str, Any] = r.json()
                    return result
                except httpx.HTTPError as exc:
                    last = exc
            time.sleep(0.05)
        raise EtcdError(f"etcd {path} failed: {last}")

    def put(self, key: str, value: str | bytes, timeout: float = 2.0) -> None:
        self._post("/v3/kv/put", {"key": b64(key), "value": b64(value)}, timeout)

    def get_prefix(self, prefix: str) -> dict[str, dict[str, Any]]:
        """Every key under ``prefix`` -> its kv (value decoded to bytes)."""
        end = bytearray(prefix.encode())
        end[-1] += 1
        body = self._post(
            "/v3/kv/range",
            {"key": b64(prefix), "range_end": b64(bytes(end))},
            timeout=20.0,
            attempt=5.0,
        )
        out = {}
        for kv in body.get("kvs", []):
            kv = dict(kv)
            kv["value"] = unb64(kv.get("value", ""))
            out[unb64(kv["key"]).decode()] = kv
        return out

    def count_prefix(self, prefix: str) -> int:
        """How many keys start with ``prefix`` (cheap: no values are sent)."""
        end = bytearray(prefix.encode())
        end[-1] += 1
        body = self._post(
            "/v3/kv/range",
            {"key": b64(prefix), "range_end": b64(bytes(end)), "count_only": True},
            timeout=10.0,
            attempt=2.0,
        )
        return int(body.get("count", 0))

    def delete_prefix(self, prefix: str) -> None:
        end = bytearray(prefix.encode())
        end[-1] += 1
        self._post("/v3/kv/deleterange", {"key": b64(prefix), "range_end": b64(bytes(end))})


@contextlib.contextmanager
def running_cluster(root: Path) -> Any:
    cluster = EtcdCluster(root)
    try:
        cluster.start_all()
        yield cluster
    finally:
        cluster.stop_all()
