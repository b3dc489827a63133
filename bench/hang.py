"""Token reads while one account's call to its IdP hangs.

Eleven accounts: ten on one IdP client, one (``stuck``) on another. The IdP's
``hang`` fault parks every token request of the second client without an answer;
a forced refresh of ``stuck`` then waits on it (up to its 30 s timeout) while a
keep-alive client reads another account's token. Blocks of reads with and without
a hanging call alternate; the reference is the reads with no hang.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from bench._common import (
    Options,
    Row,
    Tokend,
    http,
    log,
    measure,
    ms,
    percentile,
    provider_section,
    request_head,
    serve_section,
    start_idp,
    workdir,
    write_config,
)

READ = request_head("GET", "/v1/tokens/r0")


def hung_in_flight(idp: Any) -> bool:
    return any(e["client_id"] == "bench-b" and e["t_end"] is None for e in idp.log())


def force_refresh(sock: Path, answers: list[int]) -> None:
    answers.append(http(sock, "POST", "/v1/tokens/stuck/refresh")[0])


def run(options: Options) -> list[Row]:
    rounds = 3 if options.quick else 6
    per_block = 3000 if options.quick else 10000
    with workdir("hang") as directory:
        idp = start_idp(directory / "idp", access_token_ttl=3600)
        try:
            return measure_hang(options, directory, idp, rounds, per_block)
        finally:
            idp.fault("none")
            idp.stop()


def measure_hang(
    options: Options, directory: Path, idp: Any, rounds: int, per_block: int
) -> list[Row]:
    accounts: dict[str, Any] = {
        f"r{i}": {"provider": "a", "refresh_token": idp.seed("bench-a")} for i in range(10)
    }
    accounts["stuck"] = {"provider": "b", "refresh_token": idp.seed("bench-b")}
    config = write_config(
        directory,
        {
            "state": {"path": str(directory / "state.db")},
            "serve": serve_section(directory, force_refresh_interval=0, request_wait_max=60),
            "log": {"level": "warning"},
            "providers": {
                "a": provider_section(idp, "bench-a"),
                "b": provider_section(idp, "bench-b", timeout=30),
            },
            "accounts": accounts,
        },
    )
    calm: list[float] = []
    hung: list[float] = []
    with Tokend(config, directory / "t.sock") as tokend:
        tokend.wait_ready()
        assert tokend.socket is not None
        sock = tokend.socket
        for i in range(rounds):
            result = measure("keepalive", sock, READ, count=per_block, latencies=True)
            calm.extend(result["lats"])
            idp.clear_log()
            idp.fault("hang", client_id="bench-b")
            answers: list[int] = []
            forced = threading.Thread(target=force_refresh, args=(sock, answers))
            forced.start()
            deadline = time.monotonic() + 10
            while not hung_in_flight(idp):
                if time.monotonic() > deadline:
                    raise RuntimeError("the IdP never saw the hanging refresh")
                time.sleep(0.01)
            result = measure("keepalive", sock, READ, count=per_block, latencies=True)
            if not hung_in_flight(idp):
                raise RuntimeError("the hanging call ended before the reads did")
            hung.extend(result["lats"])
            idp.fault("none")  # releases the parked request
            forced.join(30)
            if answers != [200]:
                raise RuntimeError(f"forced refresh of the stuck account answered {answers}")
            log(f"round {i + 1}/{rounds}")
    p99, ref = percentile(hung, 99), percentile(calm, 99)
    # "Within noise": at most 1.5x, or 0.1 ms more, whichever is larger.
    met = p99 <= max(1.5 * ref, ref + 0.0001)
    return [
        Row(
            "token reads while one account's IdP call hangs, p99",
            f"{ms(p99)} (p50 {ms(percentile(hung, 50))})",
            f"no hang {ms(ref)} (p50 {ms(percentile(calm, 50))})",
            f"{p99 / ref:.2f}x",
            "p99 unchanged (<= 1.5x or +0.1 ms)",
            met,
            [
                f"{len(hung)} reads during hangs, {len(calm)} without, in {rounds} "
                "alternating blocks; each hang is a forced refresh parked by the IdP, "
                "released after the block (the forced refresh then succeeds)"
            ],
        )
    ]
