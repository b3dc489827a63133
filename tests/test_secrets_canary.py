"""The secrets canary, run last (see conftest): no client secret, seed refresh token,
rotated refresh token or key line the suite gave tokend appears in anything tokend
wrote for people to read: its log files, the output of its commands, its socket
answers (tests/_canary.py collects them as the suite runs)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from tests._canary import CANARY, Canary
from tests.idp_harness import IdP


def test_the_canary_finds_a_planted_secret(tmp_path: Path) -> None:
    canary = Canary()
    log = tmp_path / "tokend.log"
    refresh_token = "rt-planted-0123456789abcdefghij"
    log.write_text(f'{{"event": "x", "detail": "oops s3cr:et/+&%=planted and {refresh_token}."}}\n')
    canary.log_paths.add(log)
    canary.note_config({"providers": {"p": {"client_secret": "s3cr:et/+&%=planted"}}}, tmp_path)

    canary.note_idp_log(
        [{"refresh_token_sha256": hashlib.sha256(refresh_token.encode()).hexdigest()}]
    )
    hits = canary.hits()
    assert len(hits) == 2, hits
    assert all(str(log) in hit for hit in hits)
    # The hit names where, never the secret itself.
    assert not any("s3cr:et/+&%=planted" in hit or refresh_token in hit for hit in hits)


def test_no_secret_reached_any_output(idp: IdP) -> None:
    CANARY.note_idp_log(idp.log())
    hits = CANARY.hits()
    logs = [path for path in CANARY.log_paths if path.exists()]
    print(
        f"\nsecrets canary: {len(CANARY.secrets)} secrets and "
        f"{len(CANARY.refresh_token_hashes)} refresh tokens (by hash) looked for in "
        f"{len(logs)} tokend log files and {len(CANARY.outputs)} command outputs and "
        f"socket answers: {len(hits)} found"
    )
    assert hits == [], "\n".join(hits[:50])
