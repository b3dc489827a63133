"""Where a store's secrets come from: a file named in the config, else an environment
variable, else a systemd credential (``LoadCredential=NAME:/path``, found under
``$CREDENTIALS_DIRECTORY``), in that order. One path for every such secret: the
state encryption key and the etcd password."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SecretSource", "SecretUnreadable", "configured_secret"]


class SecretUnreadable(ValueError):
    """A configured secret file could not be read. Names the file, never its content."""


@dataclass(frozen=True, slots=True)
class SecretSource:
    """Which secret, and the names it is looked up under."""

    # What it is, for messages: "state encryption key".
    what: str
    # The config key that names a file with it: "state.encryption_key_file".
    config_key: str
    env_var: str
    credential: str

    def where(self) -> str:
        """Every place it may come from, for a message saying none had it."""
        return f"set {self.config_key}, ${self.env_var} or the systemd credential {self.credential}"


def configured_secret(
    source: SecretSource, file: Path | None, environ: Mapping[str, str] | None = None
) -> tuple[bytes, str] | None:
    """The secret and a label saying where it was found (for messages: a path or the
    variable's name, never the value); None when it is configured nowhere."""
    env = os.environ if environ is None else environ
    if file is not None:
        return _read(source, file), f"{source.what} {file}"
    if value := env.get(source.env_var):
        return value.encode(), f"${source.env_var}"
    if directory := env.get("CREDENTIALS_DIRECTORY"):
        credential = Path(directory) / source.credential
        if credential.exists():
            return _read(source, credential), f"{source.what} {credential}"
    return None


def _read(source: SecretSource, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SecretUnreadable(
            f"{source.what} {path}: cannot read it: {exc.strerror or exc}"
        ) from None
