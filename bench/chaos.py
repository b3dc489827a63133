"""Crash chaos: ``kill -9`` tokend at random moments during continuous rotation, then let
a clean run settle, and count what the IdP saw.

``python -m bench chaos`` (``--quick`` for fewer kills) runs two phases against the
real test IdP with rotation on and short tokens: one where the IdP grants a reuse grace
of a few seconds, one with none. For each it reports, from the IdP's own request log:

- kills, and the rotations they lost: a rotated refresh token whose answer never made
  it into tokend's store shows up as the *spent* token presented again;
- grace reuses: those re-presentations the IdP answered from its reuse grace;
- accounts lost: grants the IdP revoked (reuse detected) or that ended unrefreshed.

Goals: with a grace, 0 accounts lost; without, no more lost accounts than kills that
landed between the IdP's rotation and tokend's commit (the re-presentations), and far
fewer grace reuses than kills (most kills land while nothing is in flight).
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench._common import Options, Row, log, provider_section, start_idp, workdir

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class ChaosResult:
    accounts: int
    kills: int
    refreshes: int
    # Rotations whose answer never reached tokend's store (a kill, or a timeout on a
    # loaded machine): each refresh token that was presented again, counted once.
    represented: int
    grace_reuses: int
    # The longest time from a lost rotation to the retry with the spent token.
    retry_delay_max: float
    # Grants revoked by the IdP or never refreshed in the clean phase.
    lost: list[str]
    clean_phase_s: float


# Limits loose enough that pacing never hides what a crash does.
PROVIDER_LIMITS: dict[str, Any] = {
    "timeout": "10s",
    "rate_limit": {"rate": 500, "burst": 500},
    "max_concurrency": 16,
    "backoff": {"initial": "0.2s", "max": "1s"},
}


def _config(directory: Path, provider: dict[str, Any], seeds: dict[str, str]) -> Path:
    config = {
        "state": {"backend": "sqlite", "path": str(directory / "state" / "tokend.db")},
        "serve": {
            "socket": None,
            "token_dir": str(directory / "tokens"),
            "metrics_listen": None,
            "drain_timeout": "5s",
        },
        "log": {"level": "info"},
        # Short tokens refreshed at about half their life: rotation never stops.
        "refresh": {"at_fraction": 0.5, "jitter_fraction": 0.2, "min_margin": "1s"},
        "providers": {"idp": {**provider, **PROVIDER_LIMITS}},
        "accounts": {
            name: {"provider": "idp", "refresh_token": seed} for name, seed in seeds.items()
        },
    }
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _start(config: Path, log_file: Path) -> subprocess.Popen[bytes]:
    with open(log_file, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "tokend", "run", "-c", str(config)],
            cwd=config.parent,
            stdout=out,
            stderr=out,
        )


def run_chaos(
    idp: Any,
    directory: Path,
    *,
    provider: dict[str, Any],
    client_id: str,
    accounts: int,
    kills: int,
    grace: float,
    token_ttl: int = 3,
    seed: int = 1,
    settle: float = 30.0,
    let_recover: bool = False,
) -> ChaosResult:
    """One chaos phase. ``idp`` is a started ``tests.idp_harness.IdP``; ``provider`` the
    config section for its client ``client_id`` (the seeds are minted for it).

    ``let_recover``: before each kill, let the process retry what its predecessor left
    in flight (a crash loop with a restart backoff, as Kubernetes does), so a machine
    slow to start a process cannot stack kills beyond the IdP's grace."""
    rng = random.Random(seed)
    idp.reset()
    idp.configure(access_token_ttl=token_ttl, reuse_grace_seconds=grace)
    grants: dict[str, str] = {}
    seeds: dict[str, str] = {}
    for i in range(accounts):
        seeded = idp.seed_grant(client_id)
        name = f"acct{i:03d}"
        seeds[name], grants[name] = seeded["refresh_token"], seeded["grant_id"]
    config = _config(directory, provider, seeds)
    log_file = directory / "tokend.log"
    for _ in range(kills):
        starts = _count(log_file, b'"event":"starting"')
        proc = _start(config, log_file)
        # Once the process is up (a crash loop faster than the interpreter starts would
        # only measure the machine), a random moment: loading, retrying what was in
        # flight, refreshing, committing, or idle.
        deadline = time.monotonic() + 30
        while _count(log_file, b'"event":"starting"') == starts and time.monotonic() < deadline:
            time.sleep(0.01)
        if let_recover:
            _wait_recovered(log_file, deadline)
        time.sleep(rng.uniform(0.0, 2.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    # The clean phase: every account must get (at least) two successful refreshes.
    started = time.monotonic()
    since = time.time()
    proc = _start(config, log_file)
    try:
        deadline = started + settle
        while time.monotonic() < deadline:
            ok = _refreshed_since(idp.log(), since)
            if all(ok.get(g, 0) >= 2 for g in grants.values()):
                break
            time.sleep(0.2)
        clean_s = time.monotonic() - started
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    entries = [e for e in idp.log() if e.get("grant_id") in set(grants.values())]
    rotated_at: dict[tuple[str, str], float] = {}
    represented: set[tuple[str, str]] = set()
    delays: list[float] = []
    for entry in sorted(entries, key=lambda e: e["t_start"]):
        key = (entry["grant_id"], entry["refresh_token_sha256"])
        if key in rotated_at:
            if key not in represented:
                delays.append(entry["t_start"] - rotated_at[key])
            represented.add(key)
        if key not in rotated_at:
            # Presented once: the IdP may have rotated it, answered or not (a killed
            # client's request still runs to its end at the IdP).
            rotated_at[key] = entry["t_end"] or entry["t_start"]
    ok = _refreshed_since(entries, since)
    lost = sorted(name for name, grant in grants.items() if ok.get(grant, 0) < 2)
    return ChaosResult(
        accounts=accounts,
        kills=kills,
        refreshes=sum(1 for e in entries if e["status"] == 200),
        represented=len(represented),
        retry_delay_max=max(delays, default=0.0),
        grace_reuses=sum(1 for e in entries if e.get("grace_reuse")),
        lost=lost,
        clean_phase_s=clean_s,
    )


def _wait_recovered(log_file: Path, deadline: float) -> None:
    """Until the latest process refreshed every account it found in flight."""
    while time.monotonic() < deadline:
        lines = log_file.read_bytes().splitlines()
        start = max(i for i, line in enumerate(lines) if b'"event":"starting"' in line)
        events = [json.loads(line) for line in lines[start:] if line.startswith(b"{")]
        in_flight = {e["account"] for e in events if e["event"] == "refresh_was_in_flight"}
        done = {e["account"] for e in events if e["event"] == "refresh"}
        if in_flight <= done:
            return
        time.sleep(0.05)


def _count(path: Path, needle: bytes) -> int:
    try:
        return path.read_bytes().count(needle)
    except FileNotFoundError:
        return 0


def _refreshed_since(entries: list[dict[str, Any]], since: float) -> dict[str, int]:
    counts: dict[str, int] = {}
    for entry in entries:
        if entry.get("status") == 200 and entry["t_start"] >= since and entry.get("grant_id"):
            counts[entry["grant_id"]] = counts.get(entry["grant_id"], 0) + 1
    return counts


def run(options: Options) -> list[Row]:
    kills = 15 if options.quick else 60
    # 40 accounts with 2 s tokens refreshed at half-life: ~40 refreshes a second, so
    # a kill often lands while one is in flight.
    accounts = 40
    rows: list[Row] = []
    with workdir("chaos") as directory:
        idp = start_idp(directory / "idp", access_token_ttl=2)
        try:
            for grace, goal in ((5.0, "0 lost"), (0.0, "lost <= rotations lost to kills")):
                phase = directory / f"grace-{grace:g}"
                phase.mkdir()
                log(f"chaos: {accounts} accounts, {kills} kills, reuse grace {grace:g} s")
                result = run_chaos(
                    idp,
                    phase,
                    provider=provider_section(idp, "bench-a"),
                    client_id="bench-a",
                    accounts=accounts,
                    kills=kills,
                    grace=grace,
                    token_ttl=2,
                )
                met = (
                    not result.lost
                    if grace
                    else len(result.lost) <= result.represented and result.represented < kills
                )
                rows.append(
                    Row(
                        f"chaos, reuse grace {grace:g} s: accounts lost of {accounts}",
                        f"{len(result.lost)} lost; {result.kills} kills; "
                        f"{result.represented} rotations lost to a kill "
                        f"(retried within {result.retry_delay_max:.1f} s); "
                        f"{result.grace_reuses} grace reuses",
                        f"{result.refreshes} refreshes; clean phase settled in "
                        f"{result.clean_phase_s:.1f} s",
                        "-",
                        goal,
                        met,
                    )
                )
        finally:
            idp.stop()
    return rows
