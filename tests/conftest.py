"""Shared fixtures: a real IdP, and tokend started as a subprocess and watched through
its JSON log lines, its files and its socket, as an application would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from tests._canary import CANARY
from tests.etcd_cluster import EtcdCluster
from tests.idp_harness import (
    BASIC_SECRET,
    CC_SECRET,
    POST_SECRET,
    IdP,
    default_clients,
    make_test_keys,
)
from tests.vault_harness import Bao

T = TypeVar("T")
REPO = Path(__file__).resolve().parent.parent


def wait_until(
    predicate: Callable[[], T], timeout: float = 15.0, interval: float = 0.02, what: str = ""
) -> T:
    """Poll ``predicate`` until it returns something truthy, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The secrets canary reads what every other test made tokend write: it runs last.
    last = [item for item in items if Path(str(item.fspath)).name == "test_secrets_canary.py"]
    if last:
        items[:] = [item for item in items if item not in last] + last


@pytest.fixture(scope="session", autouse=True)
def _canary_records_cli_output() -> Iterator[None]:
    """Keep the output of every tokend command a test runs, for the secrets canary."""
    real_run = subprocess.run

    def run(*args: Any, **kwargs: Any) -> Any:
        result = real_run(*args, **kwargs)
        argv = args[0] if args else kwargs.get("args")
        if isinstance(argv, list | tuple) and any(str(a).endswith("tokend") for a in argv):
            label = "cli: " + " ".join(str(a) for a in argv[-6:])
            CANARY.note_output(label, result.stdout)
            CANARY.note_output(label, result.stderr)
        return result

    subprocess.run = run  # type: ignore[assignment]
    for secret in (BASIC_SECRET, POST_SECRET, CC_SECRET):
        CANARY.add_secret(secret)
    yield
    subprocess.run = real_run


@pytest.fixture(scope="session")
def idp_keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return make_test_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="session")
def idp(tmp_path_factory: pytest.TempPathFactory, idp_keys: dict[str, Any]) -> Iterator[IdP]:
    """One real IdP for the session: rotation on, access tokens living 5 seconds."""
    server = IdP(
        tmp_path_factory.mktemp("idp"),
        clients=default_clients(idp_keys["ec_public_jwk"], idp_keys["rsa_public_jwk"]),
        access_token_ttl=5,
    )
    with server.start():
        yield server


@pytest.fixture(scope="session")
def etcd_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """A real 3-member etcd cluster on loopback for the session (tests that kill
    members restart them; each test uses its own key prefix)."""
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd"))
    try:
        cluster.start_all()
        yield cluster
    finally:
        cluster.stop_all()


@pytest.fixture
def etcd(etcd_cluster: EtcdCluster) -> EtcdCluster:
    """The session cluster with every member running and healthy."""
    for member in etcd_cluster.members:
        etcd_cluster.start(member, wait=False)
    etcd_cluster.wait_healthy()
    return etcd_cluster


@pytest.fixture(scope="session")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bao]:
    """One real OpenBao dev server for the session (KV v2 at secret/, AppRole, JWT)."""
    server = Bao(tmp_path_factory.mktemp("bao")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fresh_idp(idp: IdP) -> IdP:
    """The session IdP with faults off, default settings and an empty request log."""
    # The refresh tokens presented so far, for the secrets canary, before the log goes.
    CANARY.note_idp_log(idp.log())
    idp.reset()
    return idp


class Tokend:
    """tokend running as a subprocess on a config written for the test."""

    def __init__(self, workdir: Path, config: dict[str, Any]) -> None:
        self.workdir = workdir
        self.config = config
        self.config_path = workdir / "config.yaml"
        self.log_path = workdir / "tokend.log"
        CANARY.log_paths.add(self.log_path)
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        self._events: list[dict[str, Any]] = []

    def write_config(self, config: dict[str, Any] | None = None) -> None:
        if config is not None:
            self.config = config
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        CANARY.note_config(self.config, self.workdir)

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "tokend", *args]

    def start(self, *extra: str) -> Tokend:
        self.write_config()
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the subprocess
        self.proc = subprocess.Popen(
            self.command("run", "-c", str(self.config_path), *extra),
            cwd=self.workdir,
            stdout=log,
            stderr=log,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()
        return self

    def run_once(self, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        self.write_config()
        result = subprocess.run(
            self.command("run", "-c", str(self.config_path), "--once"),
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        with open(self.log_path, "a") as log:
            log.write(result.stderr)
        return result

    def events(self, event: str | None = None, **match: Any) -> list[dict[str, Any]]:
        """Every JSON log event so far (optionally those named ``event`` matching ``match``)."""
        with open(self.log_path, "rb") as log:
            log.seek(self._log_offset)
            chunk = log.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self._log_offset += len(complete)
        for line in complete.decode(errors="replace").splitlines():
            try:
                parsed = json.loads(line)
            except ValueError:
                parsed = {"event": "_non_json", "line": line}
            self._events.append(parsed)
        return [
            e
            for e in self._events
            if (event is None or e.get("event") == event)
            and all(e.get(k) == v for k, v in match.items())
        ]

    def wait_event(
        self, event: str, timeout: float = 20.0, count: int = 1, **match: Any
    ) -> list[dict[str, Any]]:
        def found() -> list[dict[str, Any]]:
            self._check_alive()
            hits = self.events(event, **match)
            return hits if len(hits) >= count else []

        return wait_until(found, timeout, what=f"{count}x {event} {match}")

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None and self.proc.returncode != 0:
            raise AssertionError(
                f"tokend exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}"
            )

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def token_file(self, account: str) -> Path:
        return self.workdir / "tokens" / account / "token"

    def token_json(self, account: str) -> dict[str, Any] | None:
        path = self.workdir / "tokens" / account / "token.json"
        return json.loads(path.read_text()) if path.exists() else None

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


@pytest.fixture
def tokend_factory(tmp_path: Path) -> Iterator[Callable[..., Tokend]]:
    started: list[Tokend] = []

    def make(config: dict[str, Any], name: str = "tokend") -> Tokend:
        workdir = tmp_path / name
        workdir.mkdir(exist_ok=True)
        instance = Tokend(workdir, config)
        started.append(instance)
        return instance

    yield make
    for instance in started:
        if instance.proc is not None and instance.proc.poll() is None:
            instance.proc.kill()
            instance.proc.wait(10)


def base_config(idp: IdP, **serve: Any) -> dict[str, Any]:
    """A config for the session IdP with the confidential basic-auth client, tuned for
    5-second tokens (refresh margins in seconds, not minutes)."""
    return {
        "state": {"backend": "sqlite", "path": "./state/tokend.db"},
        "serve": {
            "socket": None,
            "token_dir": "./tokens",
            "metrics_listen": None,
            "drain_timeout": "5s",
            **serve,
        },
        "log": {"level": "debug"},
        "refresh": {"min_margin": "1s"},
        "providers": {
            "idp": {
                "issuer": idp.issuer,
                "client_id": "basic-client",
                "client_secret": "basic-secret",
                "auth_method": "client_secret_basic",
                "timeout": "3s",
            }
        },
        "accounts": {},
    }
