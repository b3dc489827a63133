"""deploy/kubernetes/: every manifest against the Kubernetes schemas (offline, strict,
from the first release with native sidecars to the newest the validator knows), the
Prometheus Operator resources by their own checks (the PrometheusRule's rules through
promtool, the ServiceMonitor's selector and port against the Service and the pod),
and the sidecar's shape and config."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.conftest import REPO

DIR = REPO / "deploy" / "kubernetes"
CRDS = {"PrometheusRule", "ServiceMonitor"}
# Native sidecars (init containers with restartPolicy: Always) are on by default
# from 1.29.
VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]


def manifests() -> dict[str, dict[str, Any]]:
    """Every resource in the directory by kind (each file holds one)."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            found[doc["kind"]] = doc
    return found


@pytest.mark.parametrize("version", VERSIONS)
def test_manifests_pass_the_kubernetes_schemas(version: str) -> None:
    checked = []
    for kind, doc in manifests().items():
        if kind in CRDS or kind == "Kustomization":
            continue
        kubernetes_validate.validate(doc, version, strict=True)
        checked.append(kind)
    assert sorted(checked) == [
        "ConfigMap",
        "Deployment",
        "PersistentVolumeClaim",
        "Secret",
        "Service",
    ]


def test_kustomization_lists_every_manifest() -> None:
    listed = manifests()["Kustomization"]["resources"]
    files = sorted(p.name for p in DIR.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == files


def test_prometheusrule_holds_the_checked_rules(tmp_path: Path) -> None:
    rule = manifests()["PrometheusRule"]
    shipped = yaml.safe_load((REPO / "deploy" / "prometheus" / "tokend-rules.yaml").read_text())
    assert rule["spec"] == shipped
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: run ./scripts/setup as root")
    extracted = tmp_path / "rules.yaml"
    extracted.write_text(yaml.safe_dump(rule["spec"]))
    done = subprocess.run(
        [promtool, "check", "rules", str(extracted)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = manifests()["Deployment"]["spec"]["template"]["spec"]
    return spec


def sidecar() -> dict[str, Any]:
    [tokend] = [c for c in pod_spec()["initContainers"] if c["name"] == "tokend"]
    return tokend


def test_servicemonitor_reaches_the_sidecar_metrics_port() -> None:
    resources = manifests()
    monitor, service = resources["ServiceMonitor"], resources["Service"]
    labels = resources["Deployment"]["spec"]["template"]["metadata"]["labels"]
    selected = monitor["spec"]["selector"]["matchLabels"]
    assert selected.items() <= service["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= labels.items()
    [endpoint] = monitor["spec"]["endpoints"]
    [port] = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
    assert port["targetPort"] in {p["name"] for p in sidecar()["ports"]}
    assert endpoint["path"] == "/metrics"


def test_sidecar_shape_and_hardening() -> None:
    spec, tokend = pod_spec(), sidecar()
    assert tokend["restartPolicy"] == "Always"
    assert tokend["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert tokend["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # The uid the image runs as.
    dockerfile = (REPO / "Dockerfile").read_text()
    user = re.search(r"^USER (\d+):(\d+)$", dockerfile, re.M)
    assert user is not None
    assert (spec["securityContext"]["runAsUser"], spec["securityContext"]["runAsGroup"]) == (
        int(user[1]),
        int(user[2]),
    )
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["automountServiceAccountToken"] is False
    for container in [*spec["initContainers"], *spec["containers"]]:
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True, container["name"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["capabilities"]["drop"] == ["ALL"], container["name"]
        assert "memory" in container["resources"]["limits"], container["name"]
        # Directories only: a subPath mount never sees a rotated token or a new seed.
        assert all("subPath" not in m for m in container["volumeMounts"]), container["name"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    [app] = spec["containers"]
    shared = {m["name"] for m in app["volumeMounts"]} & {m["name"] for m in tokend["volumeMounts"]}
    assert shared == {"tokens"} and "emptyDir" in volumes["tokens"]
    assert "persistentVolumeClaim" in volumes["state"]
    assert manifests()["Deployment"]["spec"]["strategy"]["type"] == "Recreate"


def test_configmap_config_passes_tokend_check(tmp_path: Path) -> None:
    """The ConfigMap's config.yaml with its mounts moved under a temporary directory."""
    text = manifests()["ConfigMap"]["data"]["config.yaml"]
    mounts = {m["mountPath"] for m in sidecar()["volumeMounts"]}
    for mount in sorted(mounts, key=len, reverse=True):
        text = text.replace(mount + "/", f"{tmp_path}{mount}/")
        (tmp_path / mount.lstrip("/")).mkdir(parents=True, exist_ok=True)
    secret = manifests()["Secret"]["stringData"]
    for name in secret:
        (tmp_path / "etc/tokend/seeds" / name).write_text("seed-or-secret-value\n")
    config = tmp_path / "config.yaml"
    config.write_text(text)
    done = subprocess.run(
        [str(Path(sys.executable).parent / "tokend"), "check", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    # The image's HEALTHCHECK and the probes use the port the config listens on.
    port = re.search(r'metrics_listen: "0\.0\.0\.0:(\d+)"', text)
    assert port is not None
    [declared] = [p["containerPort"] for p in sidecar()["ports"] if p["name"] == "metrics"]
    assert declared == int(port[1])
    assert f"127.0.0.1:{port[1]}/healthz" in (REPO / "Dockerfile").read_text()
