"""The secrets canary: what the suite's tokend processes wrote (log files, CLI output,
socket answers) and every secret the suite handed them (client secrets, seed refresh
tokens, secret files), so that the last test can look for one in the other.

Refresh tokens the IdP rotated are never seen by the tests in clear: the IdP logs the
SHA-256 of every refresh token presented to it, so every token-shaped word of the
output is hashed and looked up among those.

Access tokens are not looked for: handing them out (token files, socket answers) is
tokend's job.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Keys of a config whose values are secrets, and those naming a file holding one.
_SECRET_KEYS = frozenset({"client_secret", "refresh_token"})
_SECRET_FILE_KEYS = frozenset({"client_secret_file", "refresh_token_file", "private_key_file"})
# Shorter values ("s", "x") would be found everywhere by chance.
_MIN_LENGTH = 8
_WORD = re.compile(r"[A-Za-z0-9_~.+/=-]{16,}")


@dataclass
class Canary:
    secrets: set[str] = field(default_factory=set)
    refresh_token_hashes: set[str] = field(default_factory=set)
    log_paths: set[Path] = field(default_factory=set)
    outputs: list[tuple[str, str]] = field(default_factory=list)

    def add_secret(self, value: object) -> None:
        if isinstance(value, str) and len(value.strip()) >= _MIN_LENGTH:
            self.secrets.add(value.strip())

    def note_config(self, config: Mapping[str, Any], base: Path) -> None:
        """Every secret in a config given to tokend (and in the files it names)."""
        for key, value in _walk(config):
            if key in _SECRET_KEYS:
                self.add_secret(value)
            elif key in _SECRET_FILE_KEYS and isinstance(value, str):
                path = Path(value) if Path(value).is_absolute() else base / value
                try:
                    text = path.read_text(errors="replace")
                except OSError:
                    continue
                if key == "private_key_file":
                    for line in text.splitlines():
                        if not line.startswith("-----") and len(line) >= 32:
                            self.add_secret(line)
                else:
                    self.add_secret(text)

    def note_idp_log(self, entries: Iterable[Mapping[str, Any]]) -> None:
        for entry in entries:
            digest = entry.get("refresh_token_sha256")
            if isinstance(digest, str):
                self.refresh_token_hashes.add(digest)

    def note_output(self, label: str, text: str | bytes | None) -> None:
        if text:
            if isinstance(text, bytes):
                text = text.decode("utf-8", errors="replace")
            self.outputs.append((label, text))

    def sources(self) -> Iterable[tuple[str, str]]:
        for path in sorted(self.log_paths):
            if path.exists():
                yield str(path), path.read_text(errors="replace")
        yield from self.outputs

    def hits(self) -> list[str]:
        """Where a secret was found: one line per (source, kind of secret)."""
        found: list[str] = []
        secrets = sorted(self.secrets, key=len, reverse=True)
        for source, text in self.sources():
            for secret in secrets:
                if secret in text:
                    found.append(f"{source}: a secret given to tokend ({secret[:4]}...)")
            for word in set(_WORD.findall(text)):
                for candidate in {word, word.rstrip(".")}:
                    digest = hashlib.sha256(candidate.encode()).hexdigest()
                    if digest in self.refresh_token_hashes:
                        found.append(f"{source}: a refresh token the IdP issued ({word[:4]}...)")
        return found


def _walk(value: Any, key: str | None = None) -> Iterable[tuple[str | None, Any]]:
    yield key, value
    if isinstance(value, Mapping):
        for inner_key, inner in value.items():
            yield from _walk(inner, str(inner_key))
    elif isinstance(value, list):
        for inner in value:
            yield from _walk(inner, key)


CANARY = Canary()
