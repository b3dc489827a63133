"""The command line and the client library, against a bare interpreter.

* ``tokend --version``, ``tokend token ACCOUNT --socket S``, ``tokend token ACCOUNT``
  (the socket found in ./config.yaml), ``tokend status --socket S``: wall time from
  spawn to exit of the installed ``tokend`` script, against a running tokend holding a
  valid token. Reference: ``python -c pass`` with the same interpreter, the runs
  interleaved so that load from elsewhere hits both alike. Goal: <= 2.5x.
* ``import tokend.client``: ``python -c "import tokend.client"`` against
  ``python -c pass`` (the difference is what an application pays).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from pathlib import Path

import yaml

from bench._common import PYTHON, Options, Row, Tokend, log, populate_store, workdir

GOAL = 2.5
TOKEND = Path(PYTHON).parent / "tokend"


def wall(argv: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, cwd=cwd, stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def run(options: Options) -> list[Row]:
    rounds = 15 if options.quick else 60
    with workdir("cli") as directory:
        populate_store(directory / "state.db", ["alice"])
        sock = directory / "t.sock"
        config = {
            "state": {"path": os.fspath(directory / "state.db")},
            "serve": {
                "socket": os.fspath(sock),
                "token_dir": os.fspath(directory / "tokens"),
                "metrics_listen": None,
            },
            "log": {"level": "warning"},
            "providers": {
                "p": {
                    "token_endpoint": "http://127.0.0.1:9/token",
                    "client_id": "c",
                    "client_secret": "s",
                }
            },
            "accounts": {"alice": {"provider": "p", "grant": "client_credentials"}},
        }
        # Block style, as config files are written (the socket is found without YAML).
        config_path = directory / "config.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        commands = {
            "tokend --version": [os.fspath(TOKEND), "--version"],
            "tokend token alice --socket S": [
                os.fspath(TOKEND),
                "token",
                "alice",
                "--socket",
                os.fspath(sock),
            ],
            "tokend token alice (socket from ./config.yaml)": [os.fspath(TOKEND), "token", "alice"],
            "tokend status --socket S": [os.fspath(TOKEND), "status", "--socket", os.fspath(sock)],
            "import tokend.client": [PYTHON, "-c", "import tokend.client"],
        }
        bare = [PYTHON, "-c", "pass"]
        times: dict[str, list[float]] = {name: [] for name in commands}
        reference: list[float] = []
        with Tokend(config_path, sock) as tokend:
            tokend.wait_ready()
            log(f"{rounds} rounds of {len(commands)} commands, each beside python -c pass")
            for _ in range(rounds):
                for name, argv in commands.items():
                    reference.append(wall(bare, directory))
                    times[name].append(wall(argv, directory))
    base = statistics.median(reference)
    rows = []
    for name, samples in times.items():
        value = statistics.median(samples)
        if name.startswith("import"):
            rows.append(
                Row(
                    name,
                    f"{value * 1000:.1f} ms ({(value - base) * 1000:+.1f} ms)",
                    f"python -c pass {base * 1000:.1f} ms",
                    f"{value / base:.2f}x",
                    notes=[f"median of {rounds}; the difference is the import's cost"],
                )
            )
            continue
        rows.append(
            Row(
                name,
                f"{value * 1000:.1f} ms",
                f"python -c pass {base * 1000:.1f} ms",
                f"{value / base:.2f}x",
                f"<= {GOAL}x",
                value / base <= GOAL,
                [f"median of {rounds} runs, spawn to exit, interleaved with the reference"],
            )
        )
    return rows
