"""``tokend token`` and ``tokend status``: the client library behind a command line.

These run on every call of a script or a shell prompt, so they import the standard
library and :mod:`tokend.client` only. Finding the socket in a config file usually
needs no YAML library either (:func:`_peek_socket`); the full loader is the fallback.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

from tokend.client import (
    Forbidden,
    TokendError,
    UnknownAccount,
    default_socket_path,
    get_token_info,
    list_accounts,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any, TextIO

CONFIG_ENV_VAR = "TOKEND_CONFIG"
DEFAULT_CONFIG = "config.yaml"
# serve.socket's default, relative to the config file's directory.
DEFAULT_CONFIG_SOCKET = "./run/tokend.sock"

# Exit codes of the commands.
EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE = 0, 1, 2


def resolve_socket_path(
    socket_arg: str | None,
    config_arg: str | None,
    environ: Mapping[str, str] | None = None,
) -> str:
    """Which socket the commands talk to: ``--socket``; else ``serve.socket`` of the
    config file (``-c``, else ``$TOKEND_CONFIG``, else ``./config.yaml`` if it exists);
    else ``$TOKEND_SOCKET``; else ``./run/tokend.sock``.

    Raises :class:`ValueError` (with a one-line message) when a config file that is
    named or found cannot be read, or sets no socket."""
    env = os.environ if environ is None else environ
    if socket_arg:
        return socket_arg
    named = config_arg or env.get(CONFIG_ENV_VAR)
    config_path = named or DEFAULT_CONFIG
    if not named and not os.path.exists(config_path):
        return default_socket_path(env)
    peeked = _peek_socket(config_path, env)
    if isinstance(peeked, _Unsure):
        peeked = _load_socket(config_path, env)
    if peeked is None:
        raise ValueError(f"{config_path}: serve.socket is not set; pass --socket PATH")
    # Relative to the config file's directory, as the daemon reads it.
    return os.path.join(os.path.dirname(os.path.abspath(config_path)), peeked)


def _load_socket(config_path: str, env: Mapping[str, str]) -> str | None:
    """serve.socket as the daemon's own loader reads it (YAML, pydantic: slower)."""
    from pathlib import Path

    from tokend.config import ConfigError, load_config

    try:
        config = load_config(Path(config_path), environ=env)
    except ConfigError as exc:
        first = exc.errors[0] if exc.errors else "invalid"
        raise ValueError(
            f"{config_path}: cannot read serve.socket ({first}); pass --socket PATH"
        ) from None
    return None if config.serve.socket is None else str(config.serve.socket)


class _Unsure:
    pass


_UNSURE = _Unsure()
_TOP_KEY = re.compile(r"([A-Za-z_][A-Za-z0-9_.-]*)[ ]*:(?:[ ]+(.*))?$")
_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^${}]*))?\}")
_EMPTY = ("", "~", "null", "Null", "NULL")
# Inline values that may continue on later lines, or that a line scan cannot read.
_OPENERS = "{['\"|>&*!"


def _peek_socket(path: str, env: Mapping[str, str]) -> str | _Unsure | None:
    """serve.socket read from the file's lines, for the plain block style that
    config files are written in (``serve:`` at the top level, ``socket: VALUE``
    indented under it). Anything else (flow style, anchors, tags, several documents,
    escapes, an unreadable file) is left to the full loader: ``_UNSURE``."""
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except (OSError, UnicodeDecodeError):
        return _UNSURE
    in_serve = seen_serve = False
    indent: int | None = None
    value: str | None = None
    found = False
    for raw in text.splitlines():
        line = raw.rstrip()
        stripped = line.lstrip(" ")
        if not stripped or stripped.startswith("#"):
            continue
        depth = len(line) - len(stripped)
        if stripped[0] == "\t":
            return _UNSURE
        if depth == 0:
            # A top-level key (documents, directives, flow style, anchors: unsure).
            match = _TOP_KEY.match(line)
            inline = match.group(2) if match else None
            if match is None or (inline and inline[0] in _OPENERS):
                return _UNSURE
            in_serve = match.group(1) == "serve"
            if in_serve:
                if seen_serve or (inline and not inline.startswith("#")):
                    return _UNSURE
                seen_serve = True
            indent = None
            continue
        if not in_serve:
            continue
        if indent is None:
            indent = depth
        if depth != indent:
            continue  # inside a nested value of serve
        match = _TOP_KEY.match(stripped)
        if match is None:
            return _UNSURE
        if match.group(1) == "socket":
            if found:
                return _UNSURE
            found = True
            value = match.group(2) or ""
    if not found:
        return DEFAULT_CONFIG_SOCKET
    assert value is not None
    return _plain_scalar(value, env)


def _plain_scalar(value: str, env: Mapping[str, str]) -> str | _Unsure | None:
    if value.startswith("'"):
        end = value.rfind("'")
        rest = value[end + 1 :].strip()
        if end == 0 or (rest and not rest.startswith("#")):
            return _UNSURE
        text = value[1:end].replace("''", "'")
    elif value.startswith('"'):
        end = value.rfind('"')
        rest = value[end + 1 :].strip()
        if end == 0 or "\\" in value or (rest and not rest.startswith("#")):
            return _UNSURE
        text = value[1:end]
    else:
        text = re.split(r"\s+#", value, maxsplit=1)[0].strip()
        if text in _EMPTY:
            return None
        if text[:1] in "&*!|>{[@`%" or ": " in text:
            return _UNSURE
    if "$" not in text:
        return text
    if "$${" in text:
        return _UNSURE
    missing = False

    def substitute(match: re.Match[str]) -> str:
        nonlocal missing
        name, default = match.group(1), match.group(2)
        got = env.get(name)
        if got:
            return got
        if default is not None:
            return default
        missing = True
        return ""

    result = _REFERENCE.sub(substitute, text)
    if missing or "${" in result:
        return _UNSURE  # the full loader says what is wrong
    return result


def token_command(
    account: str,
    *,
    socket_arg: str | None,
    config_arg: str | None,
    min_valid: float,
    as_json: bool,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """``tokend token``: the raw token (or its JSON) on stdout; one line on stderr and
    exit 1 when it is unavailable, 2 for usage errors, unknown accounts and refusals."""
    out = out or sys.stdout
    err = err or sys.stderr
    path = _socket_or_report(socket_arg, config_arg, err)
    if path is None:
        return EXIT_USAGE
    try:
        token = get_token_info(account, path, min_valid, cache=False)
    except (UnknownAccount, Forbidden) as exc:
        print(f"tokend: {exc}", file=err)
        return EXIT_USAGE
    except TokendError as exc:
        print(f"tokend: {exc}", file=err)
        return EXIT_UNAVAILABLE
    if as_json:
        out.write(json.dumps(token.as_dict(), separators=(",", ":")) + "\n")
    else:
        out.write(token.access_token + "\n")
    return EXIT_OK


def _socket_or_report(socket_arg: str | None, config_arg: str | None, err: TextIO) -> str | None:
    """The socket to use, or None after saying on ``err`` why there is none."""
    try:
        return resolve_socket_path(socket_arg, config_arg)
    except ValueError as exc:
        print(f"tokend: {exc}", file=err)
        return None


def status_command(
    *,
    socket_arg: str | None,
    config_arg: str | None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """``tokend status``: a table of every account's state; exit 1 if tokend cannot be
    reached."""
    out = out or sys.stdout
    err = err or sys.stderr
    path = _socket_or_report(socket_arg, config_arg, err)
    if path is None:
        return EXIT_USAGE
    try:
        accounts = list_accounts(path)
    except TokendError as exc:
        print(f"tokend: {exc}", file=err)
        return EXIT_UNAVAILABLE
    out.write(format_status(accounts, time.time()))
    return EXIT_OK


_LAST_ERROR_WIDTH = 60


def format_status(accounts: list[dict[str, Any]], now: float) -> str:
    """The ``tokend status`` table. With replicas sharing accounts, an OWNER column:
    the replica that refreshes the account, marked ``(here)`` when it is this one."""
    shared = any("owner" in a for a in accounts)
    header = (
        "ACCOUNT",
        "PROVIDER",
        "STATE",
        "EXPIRES IN",
        "LAST REFRESH",
        "NEXT REFRESH",
        "REAUTH BY",
        *(("OWNER",) if shared else ()),
        "LAST ERROR",
    )
    rows = [header]
    for a in accounts:
        expires_at = a.get("expires_at")
        rows.append(
            (
                str(a.get("name", "")),
                str(a.get("provider", "")),
                str(a.get("state", "")),
                _expires_in(expires_at, now),
                _ago(a.get("last_refresh_at"), now),
                _until(a.get("next_refresh_at"), now),
                _reauth_by(a, now),
                *((_owner_column(a),) if shared else ()),
                _truncate(_error_column(a), _LAST_ERROR_WIDTH),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = []
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines) + "\n"


def _owner_column(account: dict[str, Any]) -> str:
    owner = account.get("owner")
    if not owner:
        return "-"
    return f"{owner} (here)" if account.get("owned_here") else str(owner)


def _error_column(account: dict[str, Any]) -> str:
    """LAST ERROR: token files that cannot be written come first."""
    publish_error = account.get("publish_error")
    last_error = account.get("last_error")
    if publish_error:
        text = f"token files not written: {publish_error}"
        return f"{text}; {last_error}" if last_error else text
    return str(last_error or "-")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _expires_in(ts: float | None, now: float) -> str:
    if ts is None:
        return "-"
    if ts <= now:
        return f"expired {_duration(now - ts)} ago"
    return _duration(ts - now)


def _ago(ts: float | None, now: float) -> str:
    return "-" if ts is None else f"{_duration(max(0.0, now - ts))} ago"


def _until(ts: float | None, now: float) -> str:
    if ts is None:
        return "-"
    return "now" if ts <= now else f"in {_duration(ts - now)}"


def _reauth_by(account: dict[str, Any], now: float) -> str:
    """REAUTH BY: when a new sign-in is due, marked once it is within the warning."""
    deadline = account.get("reauth_deadline")
    if not isinstance(deadline, int | float):
        return "-"
    when = _until(deadline, now)
    return f"{when} (sign in again)" if account.get("reauth_warning") else when


def _truncate(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."
