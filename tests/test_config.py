"""Loading config files: positions, interpolation, paths, secrets kept out of errors."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from tokend.config import (
    Config,
    ConfigError,
    _load,
    load_config,
    read_secret_file,
    resolve_config_path,
    summarize,
)

CANARY = "tok-CANARY-9f3e71"

PROVIDER = """\
providers:
  idp:
    token_endpoint: https://idp.example.com/token
    client_id: tokend
    client_secret: hunter2
"""

VALID = (
    PROVIDER
    + """\
accounts:
  alice:
    provider: idp
    refresh_token: seed
"""
)


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def problems(path: Path, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ=environ or {})
    lines = [str(issue) for issue in caught.value.errors]
    assert str(caught.value) == "\n".join(lines)
    return lines


@pytest.fixture(params=["libyaml", "python"])
def yaml_loader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Run a test with the C loader and with the pure-Python fallback."""
    if request.param == "libyaml":
        if not hasattr(yaml, "CSafeLoader"):
            pytest.skip("PyYAML built without libyaml")
        monkeypatch.setattr(_load, "_Loader", yaml.CSafeLoader)
    else:
        monkeypatch.setattr(_load, "_Loader", yaml.SafeLoader)
    yield request.param


# -- a valid file ----------------------------------------------------------------------


def test_valid_config_loads_and_summarizes(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        VALID + "  bob:\n    provider: idp\n    grant: client_credentials\n    scope: read\n",
    )
    config = load_config(path, environ={})
    assert config.providers["idp"].client_id == "tokend"
    assert config.accounts["bob"].grant == "client_credentials"
    assert summarize(config) == (
        f"ok: 1 provider, 2 accounts (1 refresh_token, 1 client_credentials), "
        f"state sqlite {tmp_path / 'var/tokend.db'}"
    )


def test_summary_counts_and_plurals(tmp_path: Path) -> None:
    accounts = (
        "".join(f"  a{i}:\n    provider: idp\n    refresh_token: seed\n" for i in range(4))
        + "  cc:\n    provider: idp2\n    grant: client_credentials\n"
    )
    provider2 = PROVIDER.removeprefix("providers:\n").replace("idp:", "idp2:")
    path = write(tmp_path, PROVIDER + provider2 + "accounts:\n" + accounts)
    summary = summarize(load_config(path, environ={}))
    assert summary.startswith(
        "ok: 2 providers, 5 accounts (4 refresh_token, 1 client_credentials), "
    )
    assert "hunter2" not in summary and "seed" not in summary


def test_model_validate_on_a_dict_still_rejects_an_unknown_provider() -> None:
    with pytest.raises(ValidationError, match=r"unknown provider 'nope' \(defined: idp\)"):
        Config.model_validate(
            {
                "providers": {
                    "idp": {"token_endpoint": "https://x", "client_id": "c", "client_secret": "s"}
                },
                "accounts": {"a": {"provider": "nope", "refresh_token": "r"}},
            }
        )


# -- every problem at once ---------------------------------------------------------------


def test_every_problem_is_reported_at_once_with_its_position(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "idp").write_text("s3cr3t\n")
    path = write(
        tmp_path,
        """\
        providers:
          idp:
            token_endpoint: https://idp.example.com/token
            client_id: tokend
            client_secret_file: secrets/idp
            tiemout: 5s
          broken:
            issuer: https://other.example.com
            client_secret: ${OTHER_SECRET}
        accounts:
          alice:
            provider: idp
            refresh_token_file: alice.token
          bob:
            provider: ipd
            refresh_token: seed
            refresh:
              min_margin: soon
        """,
    )
    assert problems(path) == [
        f"{path}:6:5: providers.idp.tiemout: unknown key 'tiemout' (did you mean 'timeout'?)",
        f"{path}:7:3: providers.broken.client_id: required key 'client_id' is missing",
        f"{path}:9:20: providers.broken.client_secret: environment variable OTHER_SECRET is "
        "not set (use ${OTHER_SECRET:-default} to give a default)",
        f"{path}:13:5: accounts.alice.refresh_token_file: file not found "
        f"(relative paths are taken from {tmp_path})",
        f"{path}:15:5: accounts.bob.provider: unknown provider 'ipd' (defined: broken, idp)",
        f"{path}:18:7: accounts.bob.refresh.min_margin: expected a duration like 90, 90s, 5m or 1h",
    ]


def test_unknown_key_without_a_close_match_lists_the_known_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "log:\n  colour: true\n")
    assert problems(path) == [
        f"{path}:2:3: log.colour: unknown key 'colour' (expected one of: level, format)"
    ]


def test_literal_typo_suggests_the_option(tmp_path: Path) -> None:
    path = write(tmp_path, "log:\n  level: warn\n")
    assert problems(path) == [
        f"{path}:2:3: log.level: must be 'debug', 'info', 'warning' or 'error' "
        "(did you mean 'warning'?)"
    ]


def test_wrong_kinds_of_value_are_named_not_quoted(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "serve:\nlog: [json]\nmax_concurrency: lots\nstate: {path: 5}\n"
        "providers: {idp: {client_id: yes}}\n",
    )
    assert problems(path) == [
        f"{path}:1:1: serve: must be a mapping of keys to values (got nothing)",
        f"{path}:2:1: log: must be a mapping of keys to values (got a list)",
        f"{path}:3:1: max_concurrency: must be a valid integer, unable to parse string as an "
        "integer (got text)",
        f"{path}:4:9: state.path: must be a file path (got a number)",
        f"{path}:5:19: providers.idp.client_id: must be text (got true/false); quote it",
    ]


def test_duplicate_key_is_reported_at_the_second(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        VALID + "  alice:\n    provider: idp\n",
    )
    assert problems(path) == [
        f"{path}:10:3: accounts.alice: duplicate key 'alice' (first set on line 7)"
    ]


def test_merge_keys_and_anchors_work(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        PROVIDER
        + textwrap.dedent(
            """\
        accounts:
          alice: &base
            provider: idp
            refresh_token: seed
          bob:
            <<: *base
            scope: read
            tiemout: 1
        """
        ),
    )
    assert problems(path) == [
        f"{path}:13:5: accounts.bob.tiemout: unknown key 'tiemout' (expected one of: provider, "
        "grant, refresh_token, refresh_token_file, scope, refresh, required, allow, outputs, "
        "on_change, write_back, revoke_on_remove)"
    ]


# -- YAML problems --------------------------------------------------------------------------


def test_yaml_syntax_error_is_one_issue_at_its_mark(tmp_path: Path, yaml_loader: str) -> None:
    path = write(tmp_path, "providers:\n  idp:\n    client_id: a: b\n")
    [line] = problems(path)
    assert line.startswith(f"{path}:3:17: mapping values are not allowed")


def test_unterminated_quote_points_at_where_it_started(tmp_path: Path, yaml_loader: str) -> None:
    path = write(tmp_path, 'log:\n  level: "info\n')
    assert problems(path) == [
        f"{path}:3:1: found unexpected end of stream "
        "(while scanning a quoted scalar started on line 2)"
    ]


def test_tab_indentation_is_explained(tmp_path: Path, yaml_loader: str) -> None:
    path = write(tmp_path, "log:\n\tlevel: info\n")
    [line] = problems(path)
    assert line.startswith(f"{path}:2:1: found character")
    assert line.endswith("YAML indents with spaces, not tabs")


def test_empty_file(tmp_path: Path) -> None:
    path = write(tmp_path, "# nothing here yet\n")
    assert problems(path) == [
        f"{path}:1:1: the file is empty: it needs at least 'providers:' and 'accounts:'"
    ]


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "- providers\n- accounts\n")
    assert problems(path) == [
        f"{path}:1:1: the top level must be a mapping of settings such as "
        "'providers:' and 'accounts:'"
    ]


def test_missing_config_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    assert problems(path) == [f"{path}: cannot read config file: file not found"]


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(b"log:\n  level: \xff\n")
    assert problems(path) == [f"{path}:2:10: not UTF-8 text: save the file as UTF-8"]


def test_control_character(tmp_path: Path, yaml_loader: str) -> None:
    path = write(tmp_path, "log:\n  lével: a\x01b\n")
    assert problems(path) == [
        f"{path}:2:11: "
        + (
            "control characters are not allowed"
            if yaml_loader == "libyaml"
            else "special characters are not allowed"
        )
        + ": remove or escape that character"
    ]


def test_unsupported_tag_and_recursive_alias(tmp_path: Path) -> None:
    path = write(tmp_path, "log:\n  level: !env LEVEL\nrefresh: &r\n  x: *r\n")
    assert problems(path) == [
        f"{path}:2:10: log.level: unsupported YAML tag (quote a value that starts with '!')",
        f"{path}:4:3: refresh.x: an alias refers to the value that contains it",
    ]


def test_decimal_file_mode_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, VALID + "serve:\n  socket_mode: 660\n  token_file_mode: 0640\n")
    assert problems(path) == [
        f'{path}:11:3: serve.socket_mode: file modes are octal: write 0660 or "0660", '
        "not 660 (which YAML reads as a decimal number)"
    ]
    path = write(tmp_path, VALID + 'serve:\n  socket_mode: "660"\n  token_file_mode: 0640\n')
    serve = load_config(path, environ={}).serve
    assert (serve.socket_mode, serve.token_file_mode) == (0o660, 0o640)


# -- ${VAR} interpolation ------------------------------------------------------------------


def interpolated(tmp_path: Path, value: str, environ: dict[str, str]) -> str | None:
    path = write(tmp_path, VALID + f"serve:\n  metrics_listen: {value}\n")
    return load_config(path, environ=environ).serve.metrics_listen


@pytest.mark.parametrize(
    ("value", "environ", "expected"),
    [
        ("${LISTEN}", {"LISTEN": "0.0.0.0:9000"}, "0.0.0.0:9000"),
        ("'127.0.0.1:${PORT}'", {"PORT": "9001"}, "127.0.0.1:9001"),
        ("${A}${B}", {"A": "x", "B": "y"}, "xy"),
        ("${LISTEN:-127.0.0.1:1}", {}, "127.0.0.1:1"),
        ("${LISTEN:-127.0.0.1:1}", {"LISTEN": ""}, "127.0.0.1:1"),
        ("${LISTEN:-127.0.0.1:1}", {"LISTEN": "[::1]:2"}, "[::1]:2"),
        ("${LISTEN}", {"LISTEN": ""}, ""),
        ("'a$${LISTEN}b'", {}, "a${LISTEN}b"),
        ("'$$ and $x'", {}, "$$ and $x"),
    ],
)
def test_interpolation(tmp_path: Path, value: str, environ: dict[str, str], expected: str) -> None:
    assert interpolated(tmp_path, value, environ) == expected


def test_interpolated_values_are_validated_after_substitution(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        PROVIDER.replace("hunter2", "${IDP_SECRET}") + "max_concurrency: ${N}\n",
    )
    config = load_config(path, environ={"IDP_SECRET": "from-env", "N": "8"})
    secret = config.providers["idp"].client_secret
    assert secret is not None and secret.get_secret_value() == "from-env"
    assert config.max_concurrency == 8


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            "${LISTEN}",
            "environment variable LISTEN is not set (use ${LISTEN:-default} to give a default)",
        ),
        (
            "x${1BAD}",
            "malformed '${...}': expected ${NAME} or ${NAME:-default} "
            "(write '$${' for a literal '${')",
        ),
        ("'x${OPEN'", "'${' without a closing '}' (write '$${' for a literal '${')"),
        ("${A:-${B}}", "${A:-...}: a default cannot contain another '${'"),
    ],
)
def test_interpolation_problems(tmp_path: Path, value: str, message: str) -> None:
    path = write(tmp_path, VALID + f"serve:\n  metrics_listen: {value}\n")
    assert problems(path) == [f"{path}:11:19: serve.metrics_listen: {message}"]


def test_unset_variable_does_not_also_cause_a_type_error(tmp_path: Path) -> None:
    path = write(tmp_path, VALID + "max_concurrency: ${N}\n")
    assert problems(path) == [
        f"{path}:10:18: max_concurrency: environment variable N is not set "
        "(use ${N:-default} to give a default)"
    ]


def test_empty_secret_from_the_environment(tmp_path: Path) -> None:
    path = write(tmp_path, PROVIDER.replace("hunter2", "${IDP_SECRET:-}"))
    assert problems(path) == [
        f"{path}:5:5: providers.idp.client_secret: is empty "
        "(check the environment variable it comes from, if any)"
    ]


# -- paths and secret files -----------------------------------------------------------------


def test_relative_paths_resolve_against_the_config_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "etc" / "tokend"
    (conf_dir / "secrets").mkdir(parents=True)
    (conf_dir / "secrets" / "idp").write_text("s3cr3t\n")
    (conf_dir / "alice.token").write_text("seed\n")
    write(
        conf_dir,
        """\
        state:
          path: var/tokend.db
        serve:
          socket: /run/tokend.sock
        providers:
          idp:
            token_endpoint: https://idp.example.com/token
            client_id: tokend
            client_secret_file: ./secrets/idp
        accounts:
          alice:
            provider: idp
            refresh_token_file: alice.token
        """,
    )
    monkeypatch.chdir(tmp_path)
    config = load_config(Path("etc/tokend/config.yaml"), environ={})
    assert config.state.path == conf_dir / "var" / "tokend.db"
    assert config.serve.socket == Path("/run/tokend.sock")
    # Defaults are relative to the config file too, not to the working directory.
    assert config.serve.token_dir == conf_dir / "run" / "tokens"
    assert config.providers["idp"].client_secret_file == conf_dir / "secrets" / "idp"
    assert config.accounts["alice"].refresh_token_file == conf_dir / "alice.token"


def test_secret_files_are_checked_but_not_read(tmp_path: Path) -> None:
    # An empty file passes: the engine reads it, and reports emptiness, when it needs it.
    (tmp_path / "alice.token").write_text("")
    path = write(tmp_path, VALID.replace("refresh_token: seed", "refresh_token_file: alice.token"))
    account = load_config(path, environ={}).accounts["alice"]
    assert account.refresh_token is None
    assert account.refresh_token_file == tmp_path / "alice.token"


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "file not found"),
        ("directory", "is a directory, not a file"),
        pytest.param(
            "unreadable",
            "permission denied",
            marks=pytest.mark.skipif(
                os.name != "posix" or os.geteuid() == 0, reason="root can read anything"
            ),
        ),
    ],
)
def test_unusable_secret_file_is_reported_at_its_key(
    tmp_path: Path, setup: str, message: str
) -> None:
    target = tmp_path / "idp.secret"
    if setup == "directory":
        target.mkdir()
    elif setup == "unreadable":
        target.write_text("x")
        target.chmod(0)
    path = write(
        tmp_path, VALID.replace("client_secret: hunter2", "client_secret_file: idp.secret")
    )
    assert problems(path) == [
        f"{path}:5:5: providers.idp.client_secret_file: {message} "
        f"(relative paths are taken from {tmp_path})"
    ]


def test_tilde_is_not_expanded(tmp_path: Path) -> None:
    path = write(tmp_path, VALID + "state:\n  path: ~/tokend.db\n")
    assert problems(path) == [
        f"{path}:11:3: state.path: '~' is not expanded: write an absolute path, "
        "or one relative to the config file's directory"
    ]


def test_read_secret_file(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cr3t\n")
    assert read_secret_file(secret) == "s3cr3t"
    secret.write_text("  s3cr3t \r\n\n")
    assert read_secret_file(secret) == "s3cr3t"
    secret.write_text(" \n")
    with pytest.raises(ValueError, match=r"is empty: write the secret into it") as caught:
        read_secret_file(secret)
    assert str(secret) in str(caught.value)
    secret.write_bytes(b"\xff" + CANARY.encode())
    with pytest.raises(ValueError, match="not UTF-8") as caught:
        read_secret_file(secret)
    assert CANARY not in str(caught.value)
    with pytest.raises(FileNotFoundError):
        read_secret_file(tmp_path / "missing")


# -- values ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "seconds"),
    [
        ("90", 90.0),
        ('"90"', 90.0),
        ('"90s"', 90.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("250ms", 0.25),
        ("1.5", 1.5),
    ],
)
def test_durations(tmp_path: Path, written: str, seconds: float) -> None:
    path = write(tmp_path, VALID.replace("hunter2", f"hunter2\n    timeout: {written}"))
    assert load_config(path, environ={}).providers["idp"].timeout == seconds


@pytest.mark.parametrize(
    ("written", "message"),
    [
        ("5 minutes", "expected a duration like 90, 90s, 5m or 1h"),
        ("-5", "a duration cannot be negative"),
        (".inf", "expected a finite duration like 90, 90s, 5m or 1h"),
        ("true", "expected a duration like 90, 90s, 5m or 1h"),
        ("0", "must be greater than 0"),
    ],
)
def test_bad_durations(tmp_path: Path, written: str, message: str) -> None:
    path = write(tmp_path, VALID.replace("hunter2", f"hunter2\n    timeout: {written}"))
    assert problems(path) == [f"{path}:6:5: providers.idp.timeout: {message}"]


NAME_RULE = (
    "not a valid name: use 1-64 of A-Z a-z 0-9 . _ - and not '.' or '..' (names become file names)"
)


def test_names_that_would_make_bad_file_names_are_rejected(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        VALID.replace("  idp:", "  a/b:")
        + "  ..:\n    provider: ../etc\n    grant: client_credentials\n",
    )
    assert problems(path) == [
        f"{path}:2:3: providers.a/b: {NAME_RULE}",
        f"{path}:8:5: accounts.alice.provider: unknown provider 'idp' (defined: a/b)",
        f'{path}:10:3: accounts."..": {NAME_RULE}',
        f'{path}:11:5: accounts."..".provider: {NAME_RULE}',
    ]


@pytest.mark.parametrize(
    ("provider_lines", "message"),
    [
        ("client_secret: s", None),
        ("auth_method: client_secret_post\n    client_secret: s", None),
        ("auth_method: none", None),
        ("", "auth_method client_secret_basic needs client_secret or client_secret_file"),
        (
            "auth_method: client_secret_post",
            "auth_method client_secret_post needs client_secret or client_secret_file",
        ),
        ("auth_method: private_key_jwt", "auth_method private_key_jwt needs private_key_file"),
        (
            "auth_method: none\n    client_secret: s",
            "auth_method none does not use a client secret: remove client_secret/"
            "client_secret_file or use client_secret_basic/client_secret_post",
        ),
        (
            "client_secret: s\n    private_key_file: key.pem",
            "private_key_file is only used with auth_method private_key_jwt",
        ),
        (
            "client_secret: s\n    signing_alg: ES256",
            "signing_alg is only used with auth_method private_key_jwt",
        ),
        (
            "client_secret: s\n    client_secret_file: secret",
            "set client_secret or client_secret_file, not both",
        ),
    ],
)
def test_auth_method_requirements(tmp_path: Path, provider_lines: str, message: str | None) -> None:
    (tmp_path / "key.pem").write_text("not really a key")
    (tmp_path / "secret").write_text("s")
    text = VALID.replace("client_secret: hunter2", provider_lines)
    path = write(tmp_path, text)
    if message is None:
        load_config(path, environ={})
    else:
        assert problems(path) == [f"{path}:2:3: providers.idp: {message}"]


def test_private_key_jwt_with_its_key(tmp_path: Path) -> None:
    (tmp_path / "key.pem").write_text("not parsed here")
    lines = "auth_method: private_key_jwt\n    private_key_file: key.pem\n    signing_alg: ES256"
    path = write(tmp_path, VALID.replace("client_secret: hunter2", lines))
    provider = load_config(path, environ={}).providers["idp"]
    assert provider.private_key_file == tmp_path / "key.pem"


def test_grant_requirements(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        PROVIDER
        + textwrap.dedent(
            """\
        accounts:
          a:
            provider: idp
          b:
            provider: idp
            grant: client_credentials
            refresh_token: seed
        """
        ),
    )
    assert problems(path) == [
        f"{path}:9:3: accounts.b: grant client_credentials takes no refresh token",
    ]


def test_url_is_not_echoed(tmp_path: Path) -> None:
    path = write(tmp_path, VALID.replace("https://idp", f"ftp://{CANARY}@idp"))
    assert problems(path) == [
        f"{path}:3:5: providers.idp.token_endpoint: "
        "expected an http(s) URL such as https://idp.example.com"
    ]


# -- secrets never leak ------------------------------------------------------------------


def test_misplaced_secrets_are_not_echoed(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        PROVIDER.replace("client_secret: hunter2", f"client_secrte: {CANARY}")
        + textwrap.dedent(
            f"""\
        accounts:
          alice:
            provider: idp
            refresh_token: 98765432123456789
          bob:
            provider: idp
            refresh_tokn: {CANARY}
        """
        ),
    )
    output = "\n".join(problems(path))
    assert CANARY not in output and "98765432123456789" not in output
    assert "unknown key 'client_secrte' (did you mean 'client_secret'?)" in output
    assert "accounts.alice.refresh_token: must be text (got a number); quote it" in output
    assert "unknown key 'refresh_tokn' (did you mean 'refresh_token'?)" in output


@pytest.mark.parametrize(
    "written",
    [
        f"*{CANARY}",
        f"!{CANARY}",
        f"!{CANARY}!x",
        f'"{CANARY}',
        f"{CANARY}: x",
        f"&{CANARY}@x",
        f'"{CANARY}\\q"',
        f"@{CANARY}",
        f"!!int {CANARY}",
        f"!!binary {CANARY}",
        f"[{CANARY}",
    ],
)
def test_secrets_that_break_the_yaml_are_not_echoed(
    tmp_path: Path, yaml_loader: str, written: str
) -> None:
    path = write(tmp_path, VALID.replace("refresh_token: seed", f"refresh_token: {written}"))
    output = "\n".join(problems(path))
    assert "CANARY" not in output


SECRET_KEYS = [
    ("providers", "idp", "client_secret"),
    ("providers", "idp", "client_secret_file"),
    ("providers", "idp", "private_key_file"),
    ("providers", "idp", "client_secrte"),
    ("providers", "idp", "extra_params"),
    ("accounts", "alice", "refresh_token"),
    ("accounts", "alice", "refresh_token_file"),
    ("accounts", "alice", "refresh_tokn"),
    ("refresh_token",),
]

_around_canary = st.builds(lambda a, b: a + CANARY + b, st.text(), st.text())
_garbage = st.one_of(
    _around_canary,
    st.integers(min_value=10**15, max_value=10**30),
    st.lists(_around_canary, min_size=1, max_size=3),
    st.dictionaries(st.sampled_from(["audience", "x"]), _around_canary, min_size=1),
    st.dictionaries(_around_canary, st.just("v"), min_size=1, max_size=1).map(
        lambda d: {"nested": d}
    ),
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(where=st.sampled_from(SECRET_KEYS), value=_garbage)
def test_garbage_under_secret_keys_never_leaks(
    tmp_path: Path, where: tuple[str, ...], value: object
) -> None:
    data = yaml.safe_load(VALID)
    parent = data
    for key in where[:-1]:
        parent = parent[key]
    parent[where[-1]] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    try:
        load_config(path, environ={})
    except ConfigError as exc:
        output = str(exc)
        assert CANARY not in output
        if isinstance(value, int):
            assert str(value) not in output


# -- which file -------------------------------------------------------------------------


def test_resolve_config_path_precedence() -> None:
    env = {"TOKEND_CONFIG": "/etc/tokend/config.yaml"}
    assert resolve_config_path("given.yaml", env) == Path("given.yaml")
    assert resolve_config_path(None, env) == Path("/etc/tokend/config.yaml")
    assert resolve_config_path(None, {}) == Path("config.yaml")
    assert resolve_config_path(None, {"TOKEND_CONFIG": ""}) == Path("config.yaml")
    assert resolve_config_path("", {}) == Path("config.yaml")


def test_outputs_templates_and_owners_are_checked_with_positions(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        serve:
          token_file_owner: no-such-user-here
        providers:
          idp: {token_endpoint: "http://127.0.0.1:1/token", client_id: x, auth_method: none}
        accounts:
          alice:
            provider: idp
            refresh_token: rt-canary-0001
            outputs:
              - {file: header, template: "Authorization: Bearer {access_token.__class__}"}
              - {file: ..data, template: "{access_token}"}
        """,
    )
    lines = problems(path)
    assert any(
        ":2:3: serve.token_file_owner:" in line and "unknown user" in line for line in lines
    ), lines
    assert any(
        "accounts.alice.outputs.0.template:" in line and "is not allowed" in line for line in lines
    ), lines
    assert any("accounts.alice.outputs.1.file:" in line and "'..'" in line for line in lines)
    assert not any("rt-canary-0001" in line for line in lines)


def test_presets_fill_in_what_is_left_out() -> None:
    from tokend.config import ProviderConfig

    def provider(**settings: object) -> ProviderConfig:
        base = {"issuer": "https://idp.example", "client_id": "c", "auth_method": "none"}
        return ProviderConfig.model_validate({**base, **settings})

    assert provider(preset="okta").reuse_grace == 30
    assert provider(preset="okta", reuse_grace="5s").reuse_grace == 5  # explicit wins
    assert provider(preset="xero").reuse_grace == 1800
    google = provider(preset="google")
    assert google.authorize_params == {"access_type": "offline", "prompt": "consent"}
    assert google.login_scope == "openid"
    assert provider().reuse_grace == 0
    with pytest.raises(ValueError, match="preset"):
        provider(preset="nowhere")


DAY = 86400.0


@pytest.mark.parametrize(
    ("preset", "max_idle", "max_age"),
    [
        ("google", 180 * DAY, None),
        ("entra", 90 * DAY, None),
        ("xero", 60 * DAY, None),
        ("okta", None, 90 * DAY),
        ("auth0", None, 30 * DAY),
        # The IdP reports it (Keycloak), or it is each deployment's own setting.
        ("keycloak", None, None),
        ("salesforce", None, None),
        ("hydra", None, None),
    ],
)
def test_presets_know_the_documented_refresh_token_lifetimes(
    preset: str, max_idle: float | None, max_age: float | None
) -> None:
    from tokend.config import ProviderConfig

    base = {"issuer": "https://idp.example", "client_id": "c", "auth_method": "none"}
    config = ProviderConfig.model_validate({**base, "preset": preset})
    assert (config.refresh_token_max_idle, config.refresh_token_max_age) == (max_idle, max_age)
    assert config.reauth_warning == 14 * DAY
    # The operator's setting wins, an explicit null included.
    mine = ProviderConfig.model_validate(
        {
            **base,
            "preset": preset,
            "refresh_token_max_idle": "7d",
            "refresh_token_max_age": None,
            "reauth_warning": "3d",
        }
    )
    assert (mine.refresh_token_max_idle, mine.refresh_token_max_age) == (7 * DAY, None)
    assert mine.reauth_warning == 3 * DAY


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"refresh_token_max_idle": "soon"}, "refresh_token_max_idle"),
        ({"refresh_token_max_age": 0}, "refresh_token_max_age"),
        ({"reauth_warning": "-1d"}, "reauth_warning"),
    ],
)
def test_refresh_token_lifetimes_are_checked(settings: dict[str, object], message: str) -> None:
    from tokend.config import ProviderConfig

    base = {"issuer": "https://idp.example", "client_id": "c", "auth_method": "none"}
    with pytest.raises(ValueError, match=message):
        ProviderConfig.model_validate({**base, **settings})


def test_one_account_commands_say_what_is_wrong_with_the_config(tmp_path: Path) -> None:
    from tokend.config import AccountNotLoaded, load_account

    path = tmp_path / "config.yaml"
    path.write_text("providers: {}\naccounts: {}\nserve: {tiemout: 1}\n")
    with pytest.raises(AccountNotLoaded, match=r"error\(s\)") as bad:
        load_account("alice", str(path))
    assert "tiemout" in str(bad.value)
    path.write_text("providers: {}\naccounts: {}\n")
    with pytest.raises(AccountNotLoaded, match=r"no account 'alice' \(accounts: none\)"):
        load_account("alice", str(path))
