"""The alerting rules: checked and unit-tested by promtool, and one end to end run in
which a real Prometheus scrapes a running tokend and an alert fires when an account's
grant is revoked at the IdP."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO, base_config, wait_until
from tests.idp_harness import IdP
from tests.test_grafana import dashboard_queries

RULES_DIR = REPO / "deploy" / "prometheus"
RULES = RULES_DIR / "tokend-rules.yaml"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: run ./scripts/setup as root (scripts/apt.d/prometheus)")
    return path


def test_rules_pass_promtool_check_and_unit_tests() -> None:
    promtool = tool("promtool")
    check = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 8 rules found" in check.stdout
    unit = subprocess.run(
        [promtool, "test", "rules", "tokend-rules.test.yaml"],
        capture_output=True,
        text=True,
        cwd=RULES_DIR,
        timeout=60,
    )
    assert unit.returncode == 0, unit.stdout + unit.stderr
    # Every alert has a unit test.
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    tests = yaml.safe_load((RULES_DIR / "tokend-rules.test.yaml").read_text())["tests"]
    tested = {t["alertname"] for case in tests for t in case["alert_rule_test"]}
    assert tested == alerts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Prometheus:
    def __init__(self, directory: Path, target: str) -> None:
        self.directory = directory
        self.port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "tokend", "static_configs": [{"targets": [target]}]}],
        }
        (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = open(directory / "prometheus.log", "wb")  # noqa: SIM115 - the process's
        self.proc = subprocess.Popen(
            [
                tool("prometheus"),
                f"--config.file={directory / 'prometheus.yml'}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=self.log,
        )

    def api(self, path: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())["data"]

    def healthy_scrape(self) -> bool:
        try:
            targets = self.api("targets")["activeTargets"]
        except OSError:
            assert self.proc.poll() is None, (self.directory / "prometheus.log").read_text()
            return False
        return bool(targets) and targets[0]["health"] == "up"

    def alerts(self, name: str) -> list[dict[str, Any]]:
        return [a for a in self.api("alerts")["alerts"] if a["labels"]["alertname"] == name]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[Any]:
    started: list[Prometheus] = []

    def start(target: str) -> Prometheus:
        directory = tmp_path / "prometheus"
        directory.mkdir()
        started.append(Prometheus(directory, target))
        return started[-1]

    yield start
    for p in started:
        p.stop()


def test_needs_reauth_alert_fires_when_a_grant_is_revoked(
    fresh_idp: IdP, tokend_factory: Any, prometheus_for: Any
) -> None:
    port = free_port()
    config = base_config(fresh_idp, metrics_listen=f"127.0.0.1:{port}")
    alice = fresh_idp.seed_grant("basic-client")
    config["accounts"]["alice"] = {"provider": "idp", "refresh_token": alice["refresh_token"]}
    config["accounts"]["bob"] = {"provider": "idp", "refresh_token": fresh_idp.seed("basic-client")}
    tokend = tokend_factory(config)
    tokend.start()
    tokend.wait_event("refresh", account="alice", outcome="success")

    prometheus = prometheus_for(f"127.0.0.1:{port}")
    wait_until(prometheus.healthy_scrape, 30, 0.2, what="Prometheus scraping tokend")
    # Healthy: the rule is evaluated and nothing fires.
    wait_until(
        lambda: any(
            r.get("name") == "TokendAccountNeedsReauth" and r.get("health") == "ok"
            for g in prometheus.api("rules")["groups"]
            for r in g["rules"]
        ),
        20,
        0.2,
        what="the rule evaluated",
    )
    assert prometheus.alerts("TokendAccountNeedsReauth") == []

    # alice's grant is revoked: her next refresh (5 s tokens) gets invalid_grant.
    fresh_idp.revoke_grant(alice["grant_id"])
    tokend.wait_event("refresh", account="alice", outcome="account_permanent")
    firing = wait_until(
        lambda: [
            a for a in prometheus.alerts("TokendAccountNeedsReauth") if a["state"] == "firing"
        ],
        20,
        0.2,
        what="TokendAccountNeedsReauth firing",
    )
    assert len(firing) == 1
    assert firing[0]["labels"]["provider"] == "idp"
    assert firing[0]["labels"]["severity"] == "critical"
    assert float(firing[0]["value"]) == 1.0

    # The dashboard's queries answer from the same data (every panel has a series,
    # except the socket API's: this tokend has no socket).
    variables = {"$__rate_interval": "10s", "$job": ".*", "$instance": ".*"}
    for panel, expr in dashboard_queries(variables).items():
        url = "query?" + urllib.parse.urlencode({"query": expr})
        result = prometheus.api(url)["result"]
        assert result or panel.startswith("Socket API"), panel
