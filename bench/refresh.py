"""Refreshes against the real test IdP (tests/idp: oidc-provider, rotating refresh
tokens), each beside the same IdP driven by bare httpx in the same run.

* Forced refresh, p50: ``POST /v1/tokens/x/refresh`` on the socket returns only
  after the rotated refresh token is committed to sqlite (``synchronous=FULL``, on
  the machine's disk) and the new token published (token files included).
  Reference: a plain ``httpx.Client`` POSTing the refresh_token grant, in
  alternating blocks.
* Throughput, many accounts: accounts whose tokens are due again one second after
  each refresh (``at_fraction`` 0.05 of a 20 s token, so none expires while queued),
  more of them than the IdP can serve: the rate tokend sustains, counted by the IdP
  over a window after warm-up. Reference: an ``httpx.AsyncClient`` loop rotating
  its own refresh tokens with the same concurrency (8) for the same time.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import httpx

from bench._common import (
    SECRETS,
    Options,
    Row,
    Tokend,
    cpu_seconds,
    keepalive_client,
    log,
    ms,
    percentile,
    provider_section,
    request_head,
    serve_section,
    start_idp,
    workdir,
    write_config,
)
from bench._load import exchange

CONCURRENCY = 8
# What tokend may send: unlimited but for the concurrency, like the bare loop.
UNPACED = {"rate_limit": {"rate": 100000, "burst": 100000}, "max_concurrency": CONCURRENCY}


def bare_refresh(client: httpx.Client, endpoint: str, refresh_token: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    response = client.post(
        endpoint, data={"grant_type": "refresh_token", "refresh_token": refresh_token}
    )
    elapsed = time.perf_counter() - t0
    response.raise_for_status()
    return elapsed, str(response.json()["refresh_token"])


def forced_refresh(options: Options, directory: Path, idp: Any) -> Row:
    rounds = 4 if options.quick else 8
    per_round = 15 if options.quick else 40
    seed = idp.seed("bench-a")
    config = write_config(
        directory,
        {
            "state": {"path": str(directory / "state.db")},
            "serve": serve_section(directory, force_refresh_interval=0),
            "log": {"level": "warning"},
            "providers": {"a": provider_section(idp, "bench-a", **UNPACED)},
            "accounts": {"x": {"provider": "a", "refresh_token": seed}},
        },
    )
    bare_token = idp.seed("bench-a")
    tokend_lats: list[float] = []
    bare_lats: list[float] = []
    request = request_head("POST", "/v1/tokens/x/refresh")
    with (
        Tokend(config, directory / "t.sock") as tokend,
        httpx.Client(auth=("bench-a", SECRETS["bench-a"]), timeout=10) as client,
    ):
        tokend.wait_ready()
        sock = keepalive_client(directory / "t.sock")
        bare_refresh(client, idp.token_endpoint, idp.seed("bench-a"))  # warm the connection
        exchange(sock, request)
        previous = b""
        for i in range(rounds):
            for name in ("bare", "tokend") if i % 2 == 0 else ("tokend", "bare"):
                for _ in range(per_round):
                    if name == "bare":
                        elapsed, bare_token = bare_refresh(client, idp.token_endpoint, bare_token)
                        bare_lats.append(elapsed)
                        continue
                    t0 = time.perf_counter()
                    response = exchange(sock, request)
                    tokend_lats.append(time.perf_counter() - t0)
                    if not response.startswith(b"HTTP/1.1 200") or response == previous:
                        raise RuntimeError(f"forced refresh failed: {response[:300]!r}")
                    previous = response
        sock.close()
    p50, ref = percentile(tokend_lats, 50), percentile(bare_lats, 50)
    return Row(
        "forced refresh with rotation, committed durably, p50",
        ms(p50),
        f"IdP bare refresh {ms(ref)}",
        f"{p50 / ref:.2f}x (+{ms(p50 - ref)})",
        "<= 15 ms",
        p50 <= 0.015,
        [
            f"{len(tokend_lats)} refreshes each, {rounds} alternating blocks; p99 tokend "
            f"{ms(percentile(tokend_lats, 99))}, bare {ms(percentile(bare_lats, 99))}"
        ],
    )


async def bare_loop(endpoint: str, tokens: list[str], duration: float) -> int:
    """Refreshes done in ``duration`` s; ``tokens`` is updated as they rotate."""
    done = 0
    deadline = time.perf_counter() + duration

    async with httpx.AsyncClient(
        auth=("bench-a", SECRETS["bench-a"]),
        timeout=10,
        limits=httpx.Limits(max_connections=CONCURRENCY),
    ) as client:

        async def worker(i: int) -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                response = await client.post(
                    endpoint, data={"grant_type": "refresh_token", "refresh_token": tokens[i]}
                )
                response.raise_for_status()
                tokens[i] = response.json()["refresh_token"]
                done += 1

        async with anyio.create_task_group() as group:
            for i in range(len(tokens)):
                group.start_soon(worker, i)
    return done


def seed_many(idp: Any, n: int) -> list[str]:
    tokens: list[str] = []
    lock = threading.Lock()

    def seeder(count: int) -> None:
        for _ in range(count):
            token = idp.seed("bench-a")
            with lock:
                tokens.append(token)

    # The harness's control client is one httpx.Client (thread-safe).
    threads = [threading.Thread(target=seeder, args=(n // 4 + (i < n % 4),)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return tokens


def tokend_rate(
    config: Path, socket: Path, idp: Any, warmup: float, window: float
) -> tuple[float, float]:
    """(refreshes/s counted by the IdP, tokend's CPU share) once warmed up."""
    with Tokend(config, socket) as tokend:
        time.sleep(warmup)
        if tokend.proc is not None and tokend.proc.poll() is not None:
            raise RuntimeError(f"tokend exited:\n{tokend.log_tail()}")
        before, cpu0 = idp.stats()["requests"], cpu_seconds(tokend.pid)
        t0 = time.perf_counter()
        time.sleep(window)
        after, cpu1 = idp.stats()["requests"], cpu_seconds(tokend.pid)
        elapsed = time.perf_counter() - t0
    return (after - before) / elapsed, (cpu1 - cpu0) / elapsed


def throughput(options: Options, directory: Path, idp: Any) -> Row:
    window = 4.0 if options.quick else 10.0
    warmup = 3.0 if options.quick else 5.0
    bare_rates: list[float] = []
    log("bare httpx loop")
    bare_tokens = seed_many(idp, CONCURRENCY)
    done = anyio.run(bare_loop, idp.token_endpoint, bare_tokens, window / 2)
    bare_rates.append(done / (window / 2))
    # More accounts than the IdP can refresh each second: tokend is saturated.
    accounts = max(400, int(bare_rates[0] * 1.5))
    log(f"seeding {accounts} accounts")
    seeds = seed_many(idp, accounts)
    settings: dict[str, Any] = {
        "state": {"path": str(directory / "many.db")},
        "serve": serve_section(directory, socket=str(directory / "m.sock")),
        "log": {"level": "warning"},
        "max_concurrency": 64,
        "refresh": {"at_fraction": 0.05, "jitter_fraction": 0.0},
        "providers": {"a": provider_section(idp, "bench-a", **UNPACED)},
        "accounts": {
            f"acct{i:05d}": {"provider": "a", "refresh_token": s} for i, s in enumerate(seeds)
        },
    }
    settings["serve"]["token_dir"] = str(directory / "many-tokens")
    config = write_config(directory, settings)
    shm = Path("/dev/shm")
    idp.configure(access_token_ttl=20)
    try:
        rate, cpu = tokend_rate(config, directory / "m.sock", idp, warmup, window)
        shm_rate = None
        if shm.is_dir():
            # Again with the token files in memory (an emptyDir with medium: Memory);
            # the store still holds every rotated token and stays on disk.
            with tempfile.TemporaryDirectory(dir=shm, prefix="tb-") as tokens:
                settings["serve"]["token_dir"] = tokens
                config = write_config(directory, settings)
                shm_rate, _ = tokend_rate(config, directory / "m.sock", idp, warmup, window)
    finally:
        idp.configure(access_token_ttl=3600)
    log("bare httpx loop again")
    done = anyio.run(bare_loop, idp.token_endpoint, bare_tokens, window / 2)
    bare_rates.append(done / (window / 2))
    bare = sum(bare_rates) / len(bare_rates)
    ratio = rate / bare
    notes = [
        f"{accounts} refresh_token accounts, each due again 1 s after its refresh, rotation "
        f"on, {CONCURRENCY} concurrent requests for both; tokend counted by the IdP over "
        f"{window:.0f} s after {warmup:.0f} s of warm-up, token files and store on the "
        f"disk; tokend used {cpu:.0%} of a core ({cpu / rate * 1000:.1f} ms per refresh); "
        f"the bare loop ran {window / 2:.0f} s before and after "
        f"({bare_rates[0]:,.0f}/s, {bare_rates[1]:,.0f}/s)"
    ]
    if shm_rate is not None:
        notes.append(
            f"with the token files on tmpfs instead: {shm_rate:,.0f}/s "
            f"({shm_rate / bare:.2f}x the bare loop)"
        )
    return Row(
        "refresh throughput, many accounts",
        f"{rate:,.0f}/s",
        f"bare httpx loop {bare:,.0f}/s",
        f"{ratio:.2f}x",
        ">= 0.6x bare loop",
        ratio >= 0.6,
        notes,
    )


def run(options: Options) -> list[Row]:
    with workdir("refresh") as directory:
        idp = start_idp(directory / "idp", access_token_ttl=3600)
        try:
            rows = [forced_refresh(options, directory, idp)]
            rows.append(throughput(options, directory, idp))
        finally:
            idp.stop()
    return rows
