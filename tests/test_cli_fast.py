"""The client side stays light: ``tokend token``, ``tokend status``, ``tokend --version``
and ``import tokend.client`` import no daemon code, and finding the socket in a config
file agrees with the daemon's own loader."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from tokend.client_commands import _UNSURE, _load_socket, _peek_socket, resolve_socket_path

REPO = Path(__file__).resolve().parent.parent
# What the daemon imports and a client command must not.
HEAVY = {
    "anyio",
    "apscheduler",
    "httpx",
    "orjson",
    "prometheus_client",
    "pydantic",
    "requests",
    "structlog",
    "yaml",
    "tokend.config",
    "tokend.daemon",
    "tokend.engine",
}

PROBE = """
import json, sys
argv = json.loads(sys.argv[1])
if argv == ["import"]:
    import tokend.client
else:
    from tokend.cli import main
    try:
        main(argv)
    except SystemExit:
        pass
print(json.dumps(sorted(sys.modules)), file=sys.stderr)
"""


def imported_by(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(argv)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
        timeout=30,
    )
    modules: list[str] = json.loads(done.stderr.strip().splitlines()[-1])
    return set(modules)


@pytest.mark.parametrize(
    "argv",
    [
        ["import"],
        ["--version"],
        ["token", "alice", "--socket", "missing.sock"],
        ["token", "alice", "--json"],
        ["token", "alice", "-c", "config.yaml", "--min-valid", "5"],
        ["status"],
    ],
)
def test_client_commands_import_no_daemon_code(argv: list[str], tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text((REPO / "config.yaml").read_text())
    modules = imported_by(argv, tmp_path)
    assert not HEAVY & {m for m in modules if m in HEAVY or m.split(".")[0] in HEAVY}
    assert "tokend.client" in modules or argv == ["--version"]


def _config(serve: str) -> str:
    return (
        "state:\n  path: ./var/tokend.db\n"
        + textwrap.dedent(serve)
        + "providers:\n  p:\n    token_endpoint: http://127.0.0.1:9/token\n"
        + "    client_id: c\n    client_secret: s\n"
        + "accounts:\n  a: {provider: p, grant: client_credentials}\n"
    )


PEEKABLE = {
    "plain": "serve:\n  socket: ./run/x.sock   # comment\n",
    "absolute": "serve:\n    token_dir: t\n    socket: /tmp/abs.sock\n",
    "single": "serve:\n  socket: 'it''s.sock'\n",
    "double": 'serve:\n  socket: "d.sock"  # c\n',
    "default": "serve:\n  token_dir: t\n",
    "no serve": "",
    "null": "serve:\n  socket: null\n",
    "env": "serve:\n  socket: ${TD_SOCK}\n",
    "env default": "serve:\n  socket: ${TD_UNSET:-/tmp/def.sock}\n",
    "then others": "serve:\n  token_dir: t\n  metrics_listen: null\nlog:\n  level: info\n",
}
# Shapes a line scan leaves to the YAML loader (the answer must still be right).
UNSURE = {
    "flow": "serve: {socket: /tmp/flow.sock}\n",
    "escape": 'serve:\n  socket: "/tmp/e\\x41.sock"\n',
    "anchor": "serve: &s\n  socket: /tmp/a.sock\n",
    "missing env": "serve:\n  socket: ${TD_UNSET}/x.sock\n",
    "merge": "serve:\n  <<: {socket: /tmp/m.sock}\n",
    "quoted key": 'serve:\n  "socket": /tmp/q.sock\n',
    "literal": "serve:\n  socket: $${x}.sock\n",
}


@pytest.mark.parametrize("name", [*PEEKABLE, *UNSURE])
def test_socket_from_config_agrees_with_the_loader(name: str, tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(_config(PEEKABLE[name] if name in PEEKABLE else UNSURE[name]))
    env = {"TD_SOCK": "/tmp/from-env.sock"}
    peeked = _peek_socket(str(path), env)
    assert (peeked is _UNSURE) == (name in UNSURE)
    if name == "missing env":
        with pytest.raises(ValueError, match="TD_UNSET is not set"):
            resolve_socket_path(None, str(path), env)
        return
    loaded = _load_socket(str(path), env)
    if loaded is None:
        with pytest.raises(ValueError):
            resolve_socket_path(None, str(path), env)
    else:
        assert os.path.normpath(resolve_socket_path(None, str(path), env)) == loaded


def test_socket_is_peeked_from_the_shipped_and_generated_configs(tmp_path: Path) -> None:
    assert _peek_socket(str(REPO / "config.yaml"), {}) == "./run/tokend.sock"
    generated = tmp_path / "config.yaml"
    generated.write_text(
        yaml.safe_dump(
            {
                "state": {"path": "s.db"},
                "serve": {"socket": "/tmp/g.sock", "token_dir": "t", "metrics_listen": None},
                "log": {"level": "debug"},
                "accounts": {"a": {"provider": "p", "allow": {"uids": [1, 2]}}},
            },
            sort_keys=False,
        )
    )
    assert _peek_socket(str(generated), {}) == "/tmp/g.sock"
