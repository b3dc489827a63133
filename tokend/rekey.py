"""``tokend rekey``: re-seal the tokens at rest with a new state key, in one transaction.

Run it with tokend stopped (the state file's lock says so otherwise). The old key is the
configured one (``state.encryption_key_file``, ``$TOKEND_STATE_KEY`` or the systemd
credential); a state file stored in the clear is sealed for the first time. Afterwards
the file opens with the new key only: put it where the config looks for the key.
"""

from __future__ import annotations

import sys
from pathlib import Path

import anyio

from tokend.config import Config
from tokend.store import StoreError, state_cipher
from tokend.store._crypto import StateKeyError, TokenCipher, parse_key


def rekey_command(config: Config, new_key_file: Path) -> int:
    """Exit status: 0 done, 2 nothing changed (the reason is on stderr)."""
    state = config.state
    if state.backend != "sqlite":
        print(f"tokend rekey: state.backend {state.backend} is not rekeyed here", file=sys.stderr)
        return 2
    try:
        new = TokenCipher(parse_key(_read(new_key_file), f"--new-key-file {new_key_file}"))
        old = state_cipher(state)
        count = anyio.run(_rekey, state.path, old, new)
    except (StoreError, StateKeyError) as exc:
        print(f"tokend rekey: {exc}; nothing was changed", file=sys.stderr)
        return 2
    print(
        f"tokend rekey: {count} account(s) in {state.path} re-sealed with the key in "
        f"{new_key_file}; point state.encryption_key_file at it (or put it in place of the "
        "old key) before starting tokend"
    )
    return 0


async def _rekey(path: Path, old: TokenCipher | None, new: TokenCipher) -> int:
    from tokend.store.sqlite import SqliteStore

    store = SqliteStore(path, exclusive=True, cipher=old)
    await store.open()
    try:
        return await store.rekey(new)
    finally:
        await store.close()


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise StateKeyError(f"--new-key-file {path}: {exc.strerror or exc}") from None
