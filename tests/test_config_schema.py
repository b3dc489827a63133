"""``tokend check --schema``: the committed config.schema.json is the model's schema,
and it accepts the configs shipped in the repository (durations and file modes as
they are written)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.conftest import REPO
from tokend.cli import config_schema, main

SHIPPED = [
    REPO / "config.yaml",
    REPO / "deploy" / "systemd" / "config.yaml",
]


def test_committed_schema_matches_the_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--schema"]) == 0
    printed = capsys.readouterr().out
    assert printed == config_schema()
    committed = (REPO / "config.schema.json").read_text()
    assert printed == committed, (
        "config.schema.json is stale: tokend check --schema > config.schema.json"
    )


def kubernetes_config() -> object:
    configmap = yaml.safe_load((REPO / "deploy" / "kubernetes" / "configmap.yaml").read_text())
    return yaml.safe_load(configmap["data"]["config.yaml"])


@pytest.mark.parametrize("name", [*(str(p.relative_to(REPO)) for p in SHIPPED), "configmap"])
def test_schema_accepts_the_shipped_configs(name: str) -> None:
    schema = json.loads((REPO / "config.schema.json").read_text())
    document = (
        kubernetes_config() if name == "configmap" else yaml.safe_load((REPO / name).read_text())
    )
    jsonschema.validate(document, schema)


def test_schema_rejects_what_tokend_check_rejects(tmp_path: Path) -> None:
    schema = json.loads((REPO / "config.schema.json").read_text())
    bad = {"serve": {"idle_timeout": "soon", "tiemout": 1}}
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(bad))
    assert len(errors) == 2
