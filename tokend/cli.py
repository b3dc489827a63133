"""The ``tokend`` command: run the daemon, check a config, and (later) read tokens."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import anyio

from tokend import logs
from tokend._version import __version__
from tokend.config import Config, ConfigError, load_config, resolve_config_path, summarize


def _load(args: argparse.Namespace) -> tuple[Config, Path] | None:
    path = resolve_config_path(args.config, os.environ)
    try:
        return load_config(path), path
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        print(f"{path}: {len(exc.errors)} error(s); tokend did not start", file=sys.stderr)
        return None


def _cmd_check(args: argparse.Namespace) -> int:
    loaded = _load(args)
    if loaded is None:
        return 2
    config, path = loaded
    print(f"{path}: {summarize(config)}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    loaded = _load(args)
    if loaded is None:
        return 2
    config, path = loaded
    logs.configure(config.log.level, config.log.format)
    from tokend.daemon import Daemon

    daemon = Daemon(config, path)
    if args.once:
        return anyio.run(daemon.run_once)
    return anyio.run(daemon.run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokend",
        description="Keeps OAuth 2.0 access tokens fresh and hands them to applications.",
    )
    parser.add_argument("--version", action="version", version=f"tokend {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_config_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "-c",
            "--config",
            metavar="FILE",
            help="config file (default: $TOKEND_CONFIG, else ./config.yaml)",
        )

    run = commands.add_parser("run", help="keep tokens fresh until SIGTERM")
    add_config_arg(run)
    run.add_argument(
        "--once",
        action="store_true",
        help="refresh what needs it, publish, exit 0 if every account has a valid token, else 1",
    )
    run.set_defaults(func=_cmd_run)

    check = commands.add_parser("check", help="validate a config file and exit")
    add_config_arg(check)
    check.set_defaults(func=_cmd_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
