"""Render deploy/grafana/preview.png (the README's picture of the dashboard) from real
data: the test IdP, tokend with four accounts and a real Prometheus scraping it every
second, for about a minute. One account's grant is revoked at the IdP after 20 s and
the IdP fails every request for 10 s after 35 s, so the panels show what operators
look for. The panels are the dashboard's own queries (deploy/grafana/tokend.json),
drawn with matplotlib (``pip install matplotlib``).

    python -m scripts.dashboard_preview [--seconds 60] [--out deploy/grafana/preview.png]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.idp_harness import IdP, default_clients, make_test_keys  # noqa: E402

PANELS = [
    "Accounts by state",
    "Refreshes by outcome",
    "Shortest remaining token lifetime",
    "Token request duration",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def query_range(port: int, expr: str, start: float, end: float) -> list[dict[str, Any]]:
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": "1s"})
    url = f"http://127.0.0.1:{port}/api/v1/query_range?{params}"
    with urllib.request.urlopen(url, timeout=10) as response:
        result: list[dict[str, Any]] = json.loads(response.read())["data"]["result"]
        return result


def wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"no answer from {url}")


def collect(directory: Path, seconds: float) -> tuple[dict[str, list[Any]], float, float]:
    (directory / "idp").mkdir()
    (directory / "keys").mkdir()
    keys = make_test_keys(directory / "keys")
    clients = default_clients(keys["ec_public_jwk"], keys["rsa_public_jwk"])
    idp = IdP(directory / "idp", clients=clients, access_token_ttl=10)
    metrics_port, prom_port = free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    with idp.start():
        grants = {
            name: idp.seed_grant("basic-client") for name in ("alice", "bob", "carol", "dave")
        }
        config = {
            "state": {"path": str(directory / "tokend.db")},
            "serve": {
                "socket": str(directory / "t.sock"),
                "token_dir": str(directory / "tokens"),
                "metrics_listen": f"127.0.0.1:{metrics_port}",
            },
            "log": {"level": "warning"},
            "refresh": {"min_margin": "1s"},
            "providers": {
                "idp": {
                    "issuer": idp.issuer,
                    "client_id": "basic-client",
                    "client_secret": "basic-secret",
                    "backoff": {"initial": "1s", "max": "4s"},
                    "breaker": {"cooldown_initial": "5s"},
                }
            },
            "accounts": {
                name: {"provider": "idp", "refresh_token": g["refresh_token"]}
                for name, g in grants.items()
            },
        }
        (directory / "config.yaml").write_text(yaml.safe_dump(config))
        prometheus_config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {
                    "job_name": "tokend",
                    "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}],
                }
            ],
        }
        (directory / "prometheus.yml").write_text(yaml.safe_dump(prometheus_config))
        log = open(directory / "processes.log", "wb")  # noqa: SIM115 - the processes'
        try:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "tokend", "run", "-c", str(directory / "config.yaml")],
                    stdout=log,
                    stderr=log,
                )
            )
            procs.append(
                subprocess.Popen(
                    [
                        shutil.which("prometheus") or "prometheus",
                        f"--config.file={directory / 'prometheus.yml'}",
                        f"--storage.tsdb.path={directory / 'data'}",
                        f"--web.listen-address=127.0.0.1:{prom_port}",
                        "--log.level=warn",
                    ],
                    stdout=log,
                    stderr=log,
                )
            )
            wait_http(f"http://127.0.0.1:{metrics_port}/healthz")
            wait_http(f"http://127.0.0.1:{prom_port}/-/ready")
            start = time.time()
            print(f"collecting for {seconds:.0f} s", file=sys.stderr)
            time.sleep(20)
            idp.revoke_grant(grants["carol"]["grant_id"])
            time.sleep(15)
            idp.fault("status_500")
            time.sleep(10)
            idp.fault("none")
            time.sleep(max(0.0, seconds - (time.time() - start)))
            end = time.time()
            board = json.loads((ROOT / "deploy" / "grafana" / "tokend.json").read_text())
            data: dict[str, list[Any]] = {}
            for panel in board["panels"]:
                if panel["title"] not in PANELS:
                    continue
                series = []
                for target in panel["targets"]:
                    expr = target["expr"].replace("$__rate_interval", "10s")
                    expr = expr.replace("$job", ".*").replace("$instance", ".*")
                    for result in query_range(prom_port, expr, start, end):
                        legend = target["legendFormat"]
                        for key, value in result["metric"].items():
                            legend = legend.replace("{{" + key + "}}", value)
                        series.append((legend, result["values"], panel["fieldConfig"]))
                data[panel["title"]] = series
            return data, start, end
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(30)
            log.close()


def render(data: dict[str, list[Any]], start: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    units = {
        "Accounts by state": "accounts",
        "Refreshes by outcome": "refreshes/s",
        "Shortest remaining token lifetime": "seconds",
        "Token request duration": "seconds",
    }
    plt.rcParams.update({"font.size": 9})
    fig, axes = plt.subplots(2, 2, figsize=(11, 6), dpi=110)
    fig.patch.set_facecolor("#181b1f")
    for ax, title in zip(axes.flat, PANELS, strict=True):
        ax.set_facecolor("#111217")
        for spine in ax.spines.values():
            spine.set_color("#444")
        ax.tick_params(colors="#ccc")
        ax.set_title(title, color="#eee", loc="left", fontsize=10)
        ax.set_ylabel(units[title], color="#aaa")
        ax.grid(color="#2a2d33", linewidth=0.6)
        for legend, values, _ in sorted(data.get(title, []), key=lambda s: s[0]):
            xs = [float(t) - start for t, _ in values]
            ys = [float(v) for _, v in values]
            if not any(ys) and title != "Shortest remaining token lifetime":
                continue
            ax.plot(xs, ys, label=legend, linewidth=1.4)
        ax.set_xlabel("seconds", color="#aaa")
        ax.legend(fontsize=7, facecolor="#181b1f", edgecolor="#444", labelcolor="#ddd", loc="best")
    fig.suptitle(
        "tokend (deploy/grafana/tokend.json): carol's grant revoked at 20 s, IdP failing 35-45 s",
        color="#eee",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out, facecolor=fig.get_facecolor())
    print(f"wrote {out}", file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--out", type=Path, default=ROOT / "deploy" / "grafana" / "preview.png")
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="td-preview"))
    try:
        data, start, _ = collect(directory, args.seconds)
    finally:
        if os.environ.get("KEEP") is None:
            shutil.rmtree(directory, ignore_errors=True)
    render(data, start, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
