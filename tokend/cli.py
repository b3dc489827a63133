"""The ``tokend`` command: run the daemon, check a config, read tokens and states.

Starting this module imports argparse and nothing of the daemon: each command's
handler imports what it needs when it runs, so ``tokend token``, ``tokend status`` and
``tokend --version`` cost little more than the interpreter (tests/test_cli_imports.py
keeps it so; bench/cli.py measures it).

A command is one ``_add_NAME(commands)`` function listed in :data:`COMMANDS`: it
declares the arguments and sets ``func`` to a handler that imports its own modules.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeAlias

from tokend._version import __version__

if TYPE_CHECKING:
    from pathlib import Path

    from tokend.config import Config

    Commands: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]


# -- shared arguments ------------------------------------------------------------------------


def add_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help="config file (default: $TOKEND_CONFIG, else ./config.yaml)",
    )


def add_socket_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--socket",
        metavar="PATH",
        help="tokend's socket (default: serve.socket of the config file if one is "
        "given or found, else $TOKEND_SOCKET, else ./run/tokend.sock)",
    )
    add_config_arg(p)


def seconds_arg(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError("expected a number of seconds") from None
    if not 0 <= seconds < 1e9:
        raise argparse.ArgumentTypeError("expected a number of seconds, 0 or more")
    return seconds


def load_or_report(args: argparse.Namespace) -> tuple[Config, Path] | None:
    """The config named by ``-c`` (or found), or None after printing its errors."""
    from tokend.config import ConfigError, load_config, resolve_config_path

    path = resolve_config_path(args.config, os.environ)
    try:
        return load_config(path), path
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        print(f"{path}: {len(exc.errors)} error(s); tokend did not start", file=sys.stderr)
        return None


# -- daemon commands ---------------------------------------------------------------------------


def _add_run(commands: Commands) -> None:
    run = commands.add_parser("run", help="keep tokens fresh until SIGTERM")
    add_config_arg(run)
    run.add_argument(
        "--once",
        action="store_true",
        help="refresh what needs it, publish, exit 0 if every account has a valid token, else 1",
    )
    run.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    loaded = load_or_report(args)
    if loaded is None:
        return 2
    config, path = loaded
    import anyio

    from tokend import logs
    from tokend.daemon import Daemon

    logs.configure(config.log.level, config.log.format)
    daemon = Daemon(config, path)
    if args.once:
        return anyio.run(daemon.run_once)
    return anyio.run(daemon.run)


def _add_check(commands: Commands) -> None:
    check = commands.add_parser("check", help="validate a config file and exit")
    add_config_arg(check)
    check.add_argument(
        "--schema",
        action="store_true",
        help="print the config file's JSON Schema (for editors; config.schema.json) and exit",
    )
    check.set_defaults(func=_check)


def _check(args: argparse.Namespace) -> int:
    if args.schema:
        sys.stdout.write(config_schema())
        return 0
    loaded = load_or_report(args)
    if loaded is None:
        return 2
    from tokend.config import summarize

    config, path = loaded
    print(f"{path}: {summarize(config)}")
    return 0


def config_schema() -> str:
    """The JSON Schema of the config file, as committed in config.schema.json."""
    import json

    from tokend.config import Config

    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        **Config.model_json_schema(),
        "title": "tokend configuration",
    }
    return json.dumps(schema, indent=2) + "\n"


def _add_rekey(commands: Commands) -> None:
    rekey = commands.add_parser(
        "rekey", help="re-seal the stored tokens with a new state key (tokend stopped)"
    )
    add_config_arg(rekey)
    rekey.add_argument(
        "--new-key-file",
        required=True,
        metavar="FILE",
        help="the new key: 32 bytes, raw or base64",
    )
    rekey.set_defaults(func=_rekey)


def _rekey(args: argparse.Namespace) -> int:
    loaded = load_or_report(args)
    if loaded is None:
        return 2
    from pathlib import Path

    from tokend.rekey import rekey_command

    return rekey_command(loaded[0], Path(args.new_key_file))


# -- client commands (fast: tokend.client_commands imports the standard library only) --------


def _add_token(commands: Commands) -> None:
    token = commands.add_parser(
        "token",
        help="print an account's access token (exit 1 if unavailable, 2 if unknown)",
    )
    token.add_argument("account", metavar="ACCOUNT")
    add_socket_args(token)
    token.add_argument(
        "--min-valid",
        type=seconds_arg,
        default=0.0,
        metavar="SECONDS",
        help="wait (bounded) for a token valid at least this much longer (default 0)",
    )
    token.add_argument(
        "--json",
        action="store_true",
        help="print access_token, token_type, expires_at, expires_in and scope as JSON",
    )
    token.set_defaults(func=_token)


def _token(args: argparse.Namespace) -> int:
    from tokend.client_commands import token_command

    return token_command(
        args.account,
        socket_arg=args.socket,
        config_arg=args.config,
        min_valid=args.min_valid,
        as_json=args.json,
    )


def _add_status(commands: Commands) -> None:
    status = commands.add_parser("status", help="show every account's state")
    add_socket_args(status)
    status.set_defaults(func=_status)


def _status(args: argparse.Namespace) -> int:
    from tokend.client_commands import status_command

    return status_command(socket_arg=args.socket, config_arg=args.config)


# -- signing in ---------------------------------------------------------------------------------


def _add_login(commands: Commands) -> None:
    login = commands.add_parser(
        "login", help="sign in once; the refresh token becomes the account's seed"
    )
    login.add_argument("account", metavar="ACCOUNT")
    add_config_arg(login)
    login.add_argument(
        "--device",
        action="store_true",
        help="sign in on another device with a code (for hosts without a browser)",
    )
    login.add_argument(
        "--no-browser", action="store_true", help="print the URL only, never open a browser"
    )
    login.add_argument(
        "--port",
        type=int,
        default=0,
        metavar="N",
        help="loopback port for the redirect (default: any free one)",
    )
    login.add_argument(
        "--scope", help="scope to ask for (default: the account's, else 'openid offline_access')"
    )
    login.add_argument(
        "--timeout",
        type=seconds_arg,
        default=300.0,
        metavar="SECONDS",
        help="longest wait for the browser's redirect (default 300)",
    )
    login.set_defaults(func=_login)


def _login(args: argparse.Namespace) -> int:
    from tokend.login import login_command

    return login_command(
        args.account,
        config_arg=args.config,
        device=args.device,
        open_browser=not args.no_browser,
        port=args.port,
        scope=args.scope,
        timeout=args.timeout,
    )


def _add_revoke(commands: Commands) -> None:
    revoke = commands.add_parser(
        "revoke", help="revoke an account's refresh token at the IdP (RFC 7009)"
    )
    revoke.add_argument("account", metavar="ACCOUNT")
    add_config_arg(revoke)
    revoke.set_defaults(func=_revoke)


def _revoke(args: argparse.Namespace) -> int:
    from tokend.revoke import revoke_command

    return revoke_command(args.account, config_arg=args.config)


# In the order `tokend --help` lists them.
COMMANDS: tuple[Callable[[Commands], None], ...] = (
    _add_run,
    _add_check,
    _add_rekey,
    _add_token,
    _add_status,
    _add_login,
    _add_revoke,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokend",
        description="Keeps OAuth 2.0 access tokens fresh and hands them to applications.",
    )
    parser.add_argument("--version", action="version", version=f"tokend {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
