"""100,000 accounts in one process, and a /metrics scrape at that size.

The config holds 100,000 client_credentials accounts (one line each, flow style) of
one provider, and the store a valid one-hour token for each, as after a restart: no
IdP is contacted. Token files are off (200,000 files are a filesystem benchmark, not
tokend's); the socket API is on.

* Start to all scheduled: ``Popen`` to the first 200 from ``GET /readyz``. The
  daemon loads every account, starts the socket listener, then schedules every
  account in one synchronous pass before the event loop first runs a connection, so
  the first answer comes after the last account is scheduled.
* RSS: VmRSS two seconds after ready (and VmHWM, the peak during start).
* Idle CPU: user + system time from /proc/PID/stat over a quiet interval.
* ``/metrics`` scrape: GET /metrics on the socket (a new connection each), timed to
  the last byte, while a keep-alive client reads a token without pause; its p99
  during the scrapes is compared with its p99 outside them.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from bench._common import (
    Options,
    Row,
    Tokend,
    cpu_seconds,
    http,
    load_result,
    log,
    ms,
    percentile,
    populate_store,
    request_head,
    rss_mb,
    run_load,
    workdir,
)
from bench.memory import per_account_notes

ACCOUNTS = 100_000


def write_scale_config(directory: Path, n: int) -> Path:
    lines = [
        f"state: {{path: {directory / 'state.db'}}}",
        f"serve: {{socket: {directory / 't.sock'}, token_dir: null, metrics_listen: null}}",
        "log: {level: warning}",
        "providers:",
        "  p: {token_endpoint: 'http://127.0.0.1:9/token', client_id: c, client_secret: s}",
        "accounts:",
    ]
    lines.extend(f"  acct{i:06d}: {{provider: p, grant: client_credentials}}" for i in range(n))
    path = directory / "config.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def status_kb(pid: int, key: str) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run(options: Options) -> list[Row]:
    idle_seconds = 5.0 if options.quick else 10.0
    scrapes = 3 if options.quick else 8
    with workdir("scale") as directory:
        log(f"writing {ACCOUNTS:,} accounts and their stored tokens")
        config = write_scale_config(directory, ACCOUNTS)
        populate_store(directory / "state.db", [f"acct{i:06d}" for i in range(ACCOUNTS)])
        with Tokend(config, directory / "t.sock") as tokend:
            ready = tokend.wait_ready(timeout=120)
            log(f"ready after {ready:.1f} s")
            time.sleep(2.0)
            rss = rss_mb(tokend.pid)
            peak = status_kb(tokend.pid, "VmHWM")
            c0, t0 = cpu_seconds(tokend.pid), time.monotonic()
            time.sleep(idle_seconds)
            idle = (cpu_seconds(tokend.pid) - c0) / (time.monotonic() - t0)
            assert tokend.socket is not None
            status, _ = http(tokend.socket, "GET", "/v1/tokens/acct050000")
            if status != 200:
                raise RuntimeError(f"token read answered {status}")
            log(f"{scrapes} scrapes of /metrics while reading a token")
            reader = run_load(
                "keepalive",
                tokend.socket,
                request_head("GET", "/v1/tokens/acct000001"),
                duration=2.0 + scrapes * 1.5,
                latencies=True,
            )
            time.sleep(1.0)
            windows: list[tuple[float, float]] = []
            sizes: list[int] = []
            for _ in range(scrapes):
                s0 = time.monotonic()
                status, body = http(tokend.socket, "GET", "/metrics")
                windows.append((s0, time.monotonic()))
                if status != 200:
                    raise RuntimeError(f"/metrics answered {status}")
                sizes.append(len(body))
                time.sleep(1.0)
            reads = load_result(reader)
    during: list[float] = []
    outside: list[float] = []
    for start, lat in zip(reads["starts"], reads["lats"], strict=True):
        inside = any(a <= start <= b or a <= start + lat <= b for a, b in windows)
        (during if inside else outside).append(lat)
    scrape = statistics.median(b - a for a, b in windows)
    p99_during, p99_outside = percentile(during, 99), percentile(outside, 99)
    return [
        Row(
            "100,000 accounts: RSS after start",
            f"{rss:.0f} MB (peak {peak:.0f} MB)",
            goal="<= 160 MB",
            met=rss <= 160,
            notes=[
                "VmRSS 2 s after ready; the peak is VmHWM (reached while loading)",
                *per_account_notes(),
            ],
        ),
        Row(
            "100,000 accounts: start to all scheduled",
            f"{ready:.1f} s",
            goal="<= 10 s",
            met=ready <= 10,
            notes=[
                "Popen to the first 200 from GET /readyz (answered only after the "
                "scheduling pass); the store is pre-filled with valid tokens"
            ],
        ),
        Row(
            "100,000 accounts: idle CPU",
            f"{idle:.2%} of a core",
            goal="~0",
            met=idle <= 0.01,
            notes=[f"/proc/PID/stat user+system over {idle_seconds:.0f} s, after ready + 2 s"],
        ),
        Row(
            "/metrics scrape at 100,000 accounts",
            ms(scrape),
            goal="<= 0.5 s",
            met=scrape <= 0.5,
            notes=[
                f"median of {scrapes} scrapes ({sizes[0]:,} bytes, max "
                f"{ms(max(b - a for a, b in windows))}), new connection each"
            ],
        ),
        Row(
            "token p99 during the /metrics scrape",
            ms(p99_during),
            f"outside scrapes {ms(p99_outside)}",
            f"{p99_during / p99_outside:.2f}x",
            "<= 5 ms",
            p99_during <= 0.005,
            [
                f"{len(during)} reads overlapping a scrape, {len(outside)} outside; max "
                f"during {ms(max(during))}"
            ],
        ),
    ]
