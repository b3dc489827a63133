"""Where tokend's memory goes: the two memory rows' breakdowns.

* One account: a fresh interpreter imports tokend's dependencies one group at a time,
  then tokend's own modules; VmRSS after each step (``/proc/self/status``).
* Many accounts: tokend's daemon in this process (a child interpreter) with
  ``tracemalloc`` on, 10,000 accounts shaped like the 100,000-account row (one
  provider, client_credentials, a stored one-hour token each); the live allocations
  once it is ready, grouped by the line that made them and divided by the account
  count. (tracemalloc itself costs memory and time, so this run is not timed and its
  RSS is not a figure; the row's RSS comes from bench/scale.py.)
"""

from __future__ import annotations

import json
import subprocess
import sys

from bench._common import PYTHON, ROOT, log

GROUPS = [
    ("asyncio (with ssl, concurrent.futures)", ["asyncio", "ssl"]),
    ("sqlite3, json, orjson", ["sqlite3", "json", "orjson"]),
    ("anyio", ["anyio"]),
    ("yaml", ["yaml"]),
    ("pydantic, pydantic-core", ["pydantic"]),
    ("structlog", ["structlog"]),
    ("httpx, httpcore", ["httpx"]),
    ("prometheus_client", ["prometheus_client"]),
    ("tokend.config (the config models' validators)", ["tokend.config"]),
    ("the rest of tokend", ["tokend.daemon", "tokend.cli"]),
]

_IMPORTS = r"""
import importlib, json, sys
def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
steps = [("python -c (interpreter)", rss())]
for label, modules in json.loads(sys.argv[1]):
    for name in modules:
        importlib.import_module(name)
    steps.append((label, rss()))
print(json.dumps(steps))
"""


def import_steps() -> list[tuple[str, float]]:
    out = subprocess.run(
        [PYTHON, "-c", _IMPORTS, json.dumps(GROUPS)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [(label, float(mb)) for label, mb in json.loads(out)]


def import_notes() -> str:
    steps = import_steps()
    parts = [f"interpreter {steps[0][1]:.1f} MB"]
    for (label, mb), (_, before) in zip(steps[1:], steps, strict=False):
        parts.append(f"{label} +{mb - before:.1f}")
    return "RSS by import (a fresh interpreter, one group at a time): " + ", ".join(parts)


_PER_ACCOUNT = r"""
import json, os, signal, socket, sys, tempfile, threading, time, tracemalloc
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from bench.scale import write_scale_config
from bench._common import populate_store
n = int(sys.argv[1])
d = Path(tempfile.mkdtemp(prefix="tb-mem-", dir="/tmp"))
cfg = write_scale_config(d, n)
populate_store(d / "state.db", [f"acct{i:06d}" for i in range(n)])
import anyio
import tokend.daemon
from tokend import logs
from tokend.config import load_config
tracemalloc.start(1)
before = tracemalloc.take_snapshot()
daemon = tokend.daemon.Daemon(load_config(cfg), cfg)
result = {}
def watch():
    while True:
        time.sleep(0.1)
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(d / "t.sock"))
                s.sendall(b"GET /readyz HTTP/1.1\r\nConnection: close\r\n\r\n")
                if s.recv(100).startswith(b"HTTP/1.1 200"):
                    break
        except OSError:
            pass
    time.sleep(1)
    stats = tracemalloc.take_snapshot().compare_to(before, "lineno")
    rows = []
    for stat in stats[:14]:
        frame = stat.traceback[0]
        where = frame.filename.split("site-packages/")[-1].replace(sys.argv[2] + "/", "")
        rows.append([f"{where}:{frame.lineno}", stat.size_diff, stat.count_diff])
    result["rows"] = rows
    result["total"] = sum(s.size_diff for s in stats)
    os.kill(os.getpid(), signal.SIGTERM)
threading.Thread(target=watch, daemon=True).start()
logs.configure("warning", "json")
anyio.run(daemon.run)
import shutil; shutil.rmtree(d, ignore_errors=True)
print("RESULT " + json.dumps(result))
"""


def per_account_notes(n: int = 10_000) -> list[str]:
    log(f"tracemalloc of a {n:,}-account tokend")
    out = subprocess.run(
        [PYTHON, "-c", _PER_ACCOUNT, str(n), str(ROOT)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout
    line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        return ["per-account breakdown: the traced run failed"]
    result = json.loads(line[len("RESULT ") :])
    total = result["total"] / n
    parts = [f"{where} {size / n:.0f} B" for where, size, _ in result["rows"] if size > 0]
    return [
        f"live allocations per account once ready ({n:,} accounts, tracemalloc): "
        f"{total:.0f} B in all; by the line that made them: " + ", ".join(parts)
    ]


if __name__ == "__main__":
    print(import_notes())
    print("\n".join(per_account_notes(int(sys.argv[1]) if len(sys.argv) > 1 else 10_000)))
