"""Small deployments: the memory of a one-account tokend, and how fast a restart with
valid stored tokens is ready.

* RSS of one account: VmRSS from /proc/PID/status one second after /readyz first
  answers 200, with the token files, the socket and the metrics port all on (the
  shipped config's shape). Reference: the RSS of a bare ``python -c`` importing
  tokend's modules (what the interpreter and the libraries cost before any work).
* Start to ready, 10 accounts with valid stored tokens: from ``Popen`` of
  ``python -m tokend run`` to the first 200 from ``GET /readyz`` on the socket, polled
  every 2 ms; the median of several starts. Reference: the wall time of
  ``python -c "import tokend.daemon"`` (interpreter start plus imports alone).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from pathlib import Path

from bench._common import (
    PYTHON,
    ROOT,
    Options,
    Row,
    Tokend,
    log,
    populate_store,
    rss_mb,
    serve_section,
    workdir,
    write_config,
)
from bench.memory import import_notes

IMPORTS = "import tokend.daemon, tokend.cli"


def config_for(directory: Path, n: int) -> Path:
    names = [f"acct{i:02d}" for i in range(n)]
    populate_store(directory / "state.db", names)
    return write_config(
        directory,
        {
            "state": {"path": str(directory / "state.db")},
            "serve": serve_section(directory, metrics_listen="127.0.0.1:0"),
            "providers": {
                "p": {
                    "token_endpoint": "http://127.0.0.1:9/token",
                    "client_id": "c",
                    "client_secret": "s",
                }
            },
            "accounts": {name: {"provider": "p", "grant": "client_credentials"} for name in names},
        },
    )


def import_only() -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of an interpreter that only imports tokend."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([PYTHON, "-c", IMPORTS], cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - t0, usage.ru_maxrss / 1024


def run(options: Options) -> list[Row]:
    starts = 3 if options.quick else 9
    with workdir("small") as directory:
        one = directory / "one"
        one.mkdir()
        with Tokend(config_for(one, 1), one / "t.sock") as tokend:
            tokend.wait_ready()
            time.sleep(1.0)
            rss_one = rss_mb(tokend.pid)
        ten = directory / "ten"
        ten.mkdir()
        config = config_for(ten, 10)
        ready: list[float] = []
        imports: list[float] = []
        import_rss: list[float] = []
        log(f"{starts} starts, alternating with bare imports")
        for _ in range(starts):
            wall, peak = import_only()
            imports.append(wall)
            import_rss.append(peak)
            with Tokend(config, ten / "t.sock") as tokend:
                ready.append(tokend.wait_ready())
    ready50 = statistics.median(ready)
    import50 = statistics.median(imports)
    return [
        Row(
            "1 account, RSS",
            f"{rss_one:.1f} MB",
            f"python importing tokend {statistics.median(import_rss):.1f} MB",
            f"{rss_one / statistics.median(import_rss):.2f}x",
            "<= 40 MB",
            rss_one <= 40,
            [
                "VmRSS 1 s after ready; token files, socket and metrics port on; the "
                'reference is the peak RSS of `python -c "' + IMPORTS + '"`',
                import_notes(),
            ],
        ),
        Row(
            "start to ready, 10 accounts with valid stored tokens",
            f"{ready50 * 1000:.0f} ms",
            f"python importing tokend {import50 * 1000:.0f} ms",
            f"{ready50 / import50:.2f}x",
            "<= 0.6 s",
            ready50 <= 0.6,
            [
                f"median of {starts} starts (min {min(ready) * 1000:.0f}, max "
                f"{max(ready) * 1000:.0f} ms), Popen to the first 200 from GET /readyz"
            ],
        ),
    ]
