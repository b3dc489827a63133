"""The socket API against a plain asyncio echo server, in alternating rounds.

* one keep-alive client: ``GET /v1/tokens/x`` latency, p50 and p99;
* 16 keep-alive clients, closed loop: requests per second;
* a new connection per request: p50.

The account's stored token is 800 bytes, so tokend's JSON answer is about the size of
the echo server's 1 KB reply. Rounds alternate echo and tokend so that a burst of
load from elsewhere on the machine hits both alike.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench._common import (
    Echo,
    Options,
    Row,
    Tokend,
    c_client,
    cpu_seconds,
    load_result,
    log,
    measure,
    ms,
    percentile,
    populate_store,
    request_head,
    rss_mb,
    run_c_load,
    run_load,
    serve_section,
    workdir,
    write_config,
)

TOKEN_REQUEST = request_head("GET", "/v1/tokens/x")
# Client processes for the concurrent row, each holding CONNS / PROCS connections.
CONNS = 16
PROCS = 2


def tokend_config(directory: Path) -> Path:
    populate_store(directory / "state.db", ["x"], token_bytes=800)
    return write_config(
        directory,
        {
            "state": {"path": str(directory / "state.db")},
            "serve": serve_section(directory),
            "log": {"level": "warning"},
            "providers": {
                # Never contacted: the stored token is valid for an hour.
                "p": {
                    "token_endpoint": "http://127.0.0.1:9/token",
                    "client_id": "c",
                    "client_secret": "s",
                }
            },
            "accounts": {"x": {"provider": "p", "grant": "client_credentials"}},
        },
    )


def concurrent_rate(sock: Path, duration: float) -> tuple[float, float]:
    """(requests/s, client CPU share) with CONNS connections: one C client process if
    there is a C compiler, else PROCS Python processes."""
    if c_client() is not None:
        procs = [run_c_load(sock, TOKEN_REQUEST, conns=CONNS, duration=duration)]
    else:
        procs = [
            run_load("keepalive", sock, TOKEN_REQUEST, conns=CONNS // PROCS, duration=duration)
            for _ in range(PROCS)
        ]
    results = [load_result(p) for p in procs]
    if any(r["bad"] for r in results):
        raise RuntimeError("non-200 answers under load")
    rate = sum(r["n"] / r["elapsed"] for r in results)
    cpu = sum(r["cpu"] for r in results) / max(r["elapsed"] for r in results)
    return rate, cpu


def run(options: Options) -> list[Row]:
    rounds = 4 if options.quick else 8
    per_round = 1500 if options.quick else 5000
    rate_seconds = 1.0 if options.quick else 2.0
    newconn_per_round = 500 if options.quick else 2000
    with workdir("sock") as directory:
        config = tokend_config(directory)
        with Tokend(config, directory / "t.sock") as tokend, Echo(directory) as echo:
            tokend.wait_ready()
            assert tokend.socket is not None
            targets: dict[str, Path] = {"echo": echo.socket, "tokend": tokend.socket}
            assert echo.proc is not None
            pids = {"echo": echo.proc.pid, "tokend": tokend.pid}
            server_cpu: dict[str, list[float]] = {"echo": [], "tokend": []}
            lats: dict[str, list[float]] = {"echo": [], "tokend": []}
            rates: dict[str, list[float]] = {"echo": [], "tokend": []}
            client_cpu: dict[str, list[float]] = {"echo": [], "tokend": []}
            newconn: dict[str, list[float]] = {"echo": [], "tokend": []}
            log(f"{rounds} alternating rounds")
            for i in range(rounds):
                order = ("echo", "tokend") if i % 2 == 0 else ("tokend", "echo")
                for name in order:
                    result: dict[str, Any] = measure(
                        "keepalive", targets[name], TOKEN_REQUEST, count=per_round, latencies=True
                    )
                    if result["bad"]:
                        raise RuntimeError(f"{name}: non-200 answers")
                    lats[name].extend(result["lats"])
                for name in order:
                    c0, t0 = cpu_seconds(pids[name]), time.monotonic()
                    rate, cpu = concurrent_rate(targets[name], rate_seconds)
                    busy = (cpu_seconds(pids[name]) - c0) / (time.monotonic() - t0)
                    server_cpu[name].append(busy)
                    rates[name].append(rate)
                    client_cpu[name].append(cpu)
                for name in order:
                    result = measure(
                        "newconn",
                        targets[name],
                        TOKEN_REQUEST,
                        count=newconn_per_round,
                        latencies=True,
                    )
                    newconn[name].extend(result["lats"])
            rss = rss_mb(tokend.pid)
    p50 = {n: percentile(v, 50) for n, v in lats.items()}
    p99 = {n: percentile(v, 99) for n, v in lats.items()}
    rate = {n: sum(v) / len(v) for n, v in rates.items()}
    new50 = {n: percentile(v, 50) for n, v in newconn.items()}
    ratio50 = p50["tokend"] / p50["echo"]
    ratio_rate = rate["tokend"] / rate["echo"]
    cpu_share = max(sum(v) / len(v) for v in client_cpu.values())
    busy = {n: sum(v) / len(v) for n, v in server_cpu.items()}
    return [
        Row(
            "socket GET /v1/tokens/x, 1 keep-alive client, p50 / p99",
            f"{ms(p50['tokend'])} / {ms(p99['tokend'])}",
            f"echo {ms(p50['echo'])} / {ms(p99['echo'])}",
            f"{ratio50:.2f}x / {p99['tokend'] / p99['echo']:.2f}x",
            "p50 <= 2x echo",
            ratio50 <= 2.0,
            [
                f"{len(lats['tokend'])} requests per server over {rounds} alternating rounds "
                f"(a new client process each); tokend RSS afterwards {rss:.0f} MB"
            ],
        ),
        Row(
            f"same, {CONNS} concurrent keep-alive clients, requests/s",
            f"{rate['tokend']:,.0f}/s",
            f"echo {rate['echo']:,.0f}/s",
            f"{ratio_rate:.2f}x",
            ">= 0.5x echo",
            ratio_rate >= 0.5,
            [
                (
                    f"one raw-socket client process in C (bench/_load.c), {CONNS} connections, "
                    if c_client() is not None
                    else f"{PROCS} raw-socket client processes x {CONNS // PROCS} connections, "
                )
                + f"{rounds} rounds of {rate_seconds:.0f} s per server; the servers were "
                f"busy {busy['tokend']:.0%} (tokend) and {busy['echo']:.0%} (echo) of a "
                f"core, the clients used {cpu_share:.0%} of a core together"
            ],
        ),
        Row(
            "new connection per request, p50",
            ms(new50["tokend"]),
            f"echo {ms(new50['echo'])}",
            f"{new50['tokend'] / new50['echo']:.2f}x",
            "<= 0.15 ms",
            new50["tokend"] <= 0.00015,
            [
                f"{len(newconn['tokend'])} connections per server: connect, send, read the "
                f"whole answer, close; p99 tokend {ms(percentile(newconn['tokend'], 99))}, "
                f"echo {ms(percentile(newconn['echo'], 99))}"
            ],
        ),
    ]
