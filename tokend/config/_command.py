"""What the one-account commands (``tokend login``, ``tokend revoke``) start from: the
config file the user means, and the account it names."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from tokend.config._load import ConfigError, load_config, resolve_config_path
from tokend.config._schema import AccountConfig, Config


class AccountNotLoaded(Exception):
    """The config does not load, or names no such account; the message says which
    (one line per problem, as ``tokend check`` would)."""


def load_account(
    account: str, config_arg: str | None, environ: Mapping[str, str] | None = None
) -> tuple[Config, AccountConfig]:
    """The config (``-c``, else ``$TOKEND_CONFIG``, else ``./config.yaml``) and the
    settings of ``account`` in it. Raises :class:`AccountNotLoaded`."""
    path: Path = resolve_config_path(config_arg, os.environ if environ is None else environ)
    try:
        config = load_config(path)
    except ConfigError as exc:
        raise AccountNotLoaded(f"{exc}\n{path}: {len(exc.errors)} error(s)") from None
    aconf = config.accounts.get(account)
    if aconf is None:
        known = ", ".join(sorted(config.accounts)) or "none"
        raise AccountNotLoaded(f"{path}: no account {account!r} (accounts: {known})")
    return config, aconf
