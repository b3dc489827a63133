"""deploy/grafana/tokend.json: a dashboard whose every query is valid PromQL (promtool
parses them as recording rules) over series tokend exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO

DASHBOARD = REPO / "deploy" / "grafana" / "tokend.json"
# Grafana's variables, as Grafana would expand them.
VARIABLES = {"$__rate_interval": "1m", "$job": ".*", "$instance": ".*"}


def dashboard_queries(variables: dict[str, str] = VARIABLES) -> dict[str, str]:
    """Every panel target's expression by "panel title/refId", variables expanded."""
    board: dict[str, Any] = json.loads(DASHBOARD.read_text())
    queries = {}
    for panel in board["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for name, value in variables.items():
                expr = expr.replace(name, value)
            queries[f"{panel['title']}/{target['refId']}"] = expr
    return queries


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: run ./scripts/setup as root")
    queries = dashboard_queries()
    assert len(queries) >= 10
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": expr}
                    for i, expr in enumerate(queries.values())
                ],
            }
        ]
    }
    path = tmp_path / "queries.yaml"
    path.write_text(yaml.safe_dump(rules))
    done = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # Only tokend's own series: documented in tokend/publish/metrics.py, or alerted on.
    documented = (REPO / "tokend" / "publish" / "metrics.py").read_text() + (
        REPO / "deploy" / "prometheus" / "tokend-rules.yaml"
    ).read_text()
    for expr in queries.values():
        for metric in re.findall(r"\b(tokend_[a-z_]+?)(?:_bucket|_total)?\b", expr):
            assert metric in documented, metric
