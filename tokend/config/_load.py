"""Loading a config file: YAML with positions, ``${VAR}`` interpolation, every problem at once.

:func:`load_config` reports everything it finds in one :class:`ConfigError`: YAML
problems, schema violations, accounts naming undefined providers and secret files that
cannot be opened. Each problem is a :class:`ConfigIssue` that renders as
``FILE:LINE:COL: key.path: message`` so an editor can jump to it.

No message ever contains a configured value: a secret pasted under the wrong key, or
typed as a number, must not end up in a terminal, a log or a CI transcript. Messages
name keys, types, environment variable names and expected forms instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import difflib
import json
import os
import re
import stat
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from tokend._gc import paused_gc
from tokend.config._schema import (
    VAULT_MISSING,
    VAULT_SCHEME,
    AccountConfig,
    Config,
    StateConfig,
    VaultConfig,
    _check_name,
    unknown_provider_message,
)

__all__ = [
    "ConfigError",
    "ConfigIssue",
    "load_config",
    "read_secret_file",
    "resolve_config_path",
    "summarize",
]

DEFAULT_CONFIG_PATH = Path("config.yaml")
CONFIG_ENV_VAR = "TOKEND_CONFIG"

# The C loader is several times faster, but not every PyYAML build has libyaml.
_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_TAG = "tag:yaml.org,2002:"
_MAP, _SEQ, _STR, _INT, _MERGE = (_TAG + t for t in ("map", "seq", "str", "int", "merge"))

# "$${" is a literal "${"; "${...}" a reference; a "${" with no "}" is unterminated.
_REFERENCE = re.compile(r"\$\$\{|\$\{([^}]*)\}|\$\{")
_REFERENCE_BODY = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.DOTALL)

# Keys whose values are paths taken relative to the config file's directory, and
# whether each names a secret file that must be readable at load time.
_PATH_KEYS: tuple[tuple[tuple[str, ...], bool], ...] = (
    (("state", "path"), False),
    (("state", "encryption_key_file"), True),
    (("state", "password_file"), True),
    (("state", "tls", "ca_file"), True),
    (("state", "tls", "cert_file"), True),
    (("state", "tls", "key_file"), True),
    (("vault", "ca_file"), True),
    (("vault", "auth", "token_file"), True),
    (("vault", "auth", "secret_id_file"), True),
    (("vault", "auth", "jwt_file"), True),
    (("serve", "socket"), False),
    (("serve", "token_dir"), False),
    (("providers", "*", "client_secret_file"), True),
    (("providers", "*", "private_key_file"), True),
    (("providers", "*", "tls_client_cert_file"), True),
    (("providers", "*", "tls_client_key_file"), True),
    (("providers", "*", "tls_ca_file"), True),
    (("accounts", "*", "refresh_token_file"), True),
)

# Written unquoted, YAML 1.1 reads 0640 as octal but 640 as decimal (0o1200): almost
# certainly not what was meant, and nothing downstream could tell.
_MODE_KEYS = (("serve", "socket_mode"), ("serve", "token_file_mode"))

Key = str | int
KeyPath = tuple[Key, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem in a config file, at the key it concerns.

    ``line`` and ``column`` are 1-based and point at the offending key, or at the
    nearest enclosing key that exists when the key itself is missing. They are
    ``None`` only when the file could not be read at all. ``path`` is the dotted key
    path (``providers.idp.client_secret``), empty for problems not about one key.
    """

    file: Path
    line: int | None
    column: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = str(self.file)
        if self.line is not None:
            where += f":{self.line}:{self.column or 1}"
        if self.path:
            return f"{where}: {self.path}: {self.message}"
        return f"{where}: {self.message}"


class ConfigError(Exception):
    """A config file that cannot be used; ``errors`` lists every problem found."""

    def __init__(self, errors: list[ConfigIssue]) -> None:
        super().__init__(errors)
        self.errors = errors

    def __str__(self) -> str:
        return "\n".join(str(issue) for issue in self.errors)


def resolve_config_path(cli_value: str | None, environ: Mapping[str, str] | None = None) -> Path:
    """Which config file to use: ``-c`` if given, else ``$TOKEND_CONFIG``, else ``./config.yaml``.

    An empty value counts as not given, so ``TOKEND_CONFIG=`` falls through to the default.
    """
    env = os.environ if environ is None else environ
    if cli_value:
        return Path(cli_value)
    if from_env := env.get(CONFIG_ENV_VAR):
        return Path(from_env)
    return DEFAULT_CONFIG_PATH


def load_config(path: Path, *, environ: Mapping[str, str] | None = None) -> Config:
    """Read, interpolate and validate the config file at ``path``.

    ``${VAR}`` and ``${VAR:-default}`` in string values are replaced from ``environ``
    (default: ``os.environ``) before validation; the default applies when the variable
    is unset or empty, and ``$${`` stands for a literal ``${``.

    Relative paths -- ``state.path``, ``serve.socket``, ``serve.token_dir`` and the
    ``*_file`` secrets, including the defaults of the first three -- are resolved
    against the directory holding the config file (as named, symlinks not followed),
    never the working directory: the daemon, ``tokend check`` and a service manager
    then agree on the files whatever directory each starts in. A leading ``~`` is
    rejected rather than expanded, since whose home it means depends on who runs it.

    Secret files are checked to exist and be readable, but not read: the engine reads
    them itself (see :func:`read_secret_file`) so that it notices when they change.

    Raises :class:`ConfigError` listing every problem found.
    """
    env: Mapping[str, str] = os.environ if environ is None else environ
    try:
        raw = path.read_bytes()
    except OSError as exc:
        issue = ConfigIssue(path, None, None, "", f"cannot read config file: {_os_reason(exc)}")
        raise ConfigError([issue]) from None
    # A large config (100,000 accounts) builds millions of objects; the collector's
    # repeated full passes over them cost more than the parsing itself (4.6 s of 6 s).
    with paused_gc():
        # A valid file is read without recording where each key is; only a file with a
        # problem is read again, keeping every position, to say where the problem is.
        config = _FileLoader(path, env).load_unpositioned(raw)
        if config is None:
            loader = _FileLoader(path, env)
            config = loader.load(raw)
            if loader.issues or config is None:
                raise ConfigError(sorted(loader.issues, key=lambda i: (i.line or 0, i.column or 0)))
        return _resolve_paths(config, _config_dir(path))


def read_secret_file(path: Path) -> str:
    """The secret held in ``path``, without surrounding whitespace (a trailing newline).

    Raises ``OSError`` when the file cannot be read and ``ValueError`` when it is empty
    or not UTF-8. Messages name the file, never its content.
    """
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        # "from None": the decode error's message quotes a byte of the secret.
        raise ValueError(
            f"secret file {path} is not UTF-8 text: it should hold the secret on one line"
        ) from None
    secret = text.strip()
    if not secret:
        raise ValueError(
            f"secret file {path} is empty: write the secret into it (a trailing newline is fine)"
        )
    return secret


def summarize(config: Config) -> str:
    """One line saying what a valid config sets up, without any secrets."""
    grants: tuple[str, ...] = get_args(AccountConfig.model_fields["grant"].annotation)
    counts = {grant: 0 for grant in grants}
    for account in config.accounts.values():
        counts[account.grant] = counts.get(account.grant, 0) + 1
    by_grant = ", ".join(f"{n} {grant}" for grant, n in counts.items() if n)
    accounts = _plural(len(config.accounts), "account")
    if by_grant:
        accounts += f" ({by_grant})"
    providers = _plural(len(config.providers), "provider")
    return f"ok: {providers}, {accounts}, state {config.state.backend} {config.state.path}"


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _config_dir(path: Path) -> Path:
    return path.absolute().parent


def _under(base: Path, path: Path) -> Path:
    return path if path.is_absolute() else base / path


def _resolve_account(account: AccountConfig, base: Path) -> AccountConfig:
    update: dict[str, object] = {}
    if account.refresh_token_file is not None:
        update["refresh_token_file"] = _under(base, account.refresh_token_file)
    on_change = account.on_change
    if on_change is not None and on_change.pid_file is not None:
        update["on_change"] = on_change.model_copy(
            update={"pid_file": _under(base, on_change.pid_file)}
        )
    return account.model_copy(update=update) if update else account


def _resolve_paths(config: Config, base: Path) -> Config:
    """``config`` with every relative path made absolute under ``base``.

    Done on the validated models so the defaults are resolved as well. The models are
    frozen, hence copies; the values keep their validated types, so nothing is re-checked.
    """
    serve = config.serve
    providers = {
        name: provider.model_copy(
            update={
                key: _under(base, value)
                for key in (
                    "client_secret_file",
                    "private_key_file",
                    "tls_client_cert_file",
                    "tls_client_key_file",
                    "tls_ca_file",
                )
                if (value := getattr(provider, key)) is not None
            }
        )
        for name, provider in config.providers.items()
    }
    # Accounts set up alike (a fleet of client_credentials accounts, say) share one
    # settings object: a model costs about 600 bytes, 60 MB at 100,000 accounts.
    alike: dict[AccountConfig, AccountConfig] = {}
    accounts = {}
    for name, account in config.accounts.items():
        resolved = _resolve_account(account, base)
        # A field that cannot be hashed (a list): the account keeps its own.
        with contextlib.suppress(TypeError):
            resolved = alike.setdefault(resolved, resolved)
        accounts[name] = resolved
    return config.model_copy(
        update={
            "state": _resolve_state(config.state, base),
            "vault": None if config.vault is None else _resolve_vault(config.vault, base),
            "serve": serve.model_copy(
                update={
                    key: _under(base, value)
                    for key in ("socket", "token_dir")
                    if (value := getattr(serve, key)) is not None
                }
            ),
            "providers": providers,
            "accounts": accounts,
        }
    )


def _resolve_state(state: StateConfig, base: Path) -> StateConfig:
    files = {
        key: _under(base, value)
        for key in ("encryption_key_file", "password_file")
        if (value := getattr(state, key)) is not None
    }
    tls = state.tls
    if tls is not None:
        tls_files = {
            key: _under(base, value)
            for key in ("ca_file", "cert_file", "key_file")
            if (value := getattr(tls, key)) is not None
        }
        files["tls"] = tls.model_copy(update=tls_files)  # type: ignore[assignment]
    return state.model_copy(update={"path": _under(base, state.path), **files})


def _resolve_vault(vault: VaultConfig, base: Path) -> VaultConfig:
    auth = vault.auth
    files = {
        key: _under(base, value)
        for key in ("token_file", "secret_id_file", "jwt_file")
        if (value := getattr(auth, key)) is not None
    }
    return vault.model_copy(
        update={
            "ca_file": None if vault.ca_file is None else _under(base, vault.ca_file),
            "auth": auth.model_copy(update=files) if files else auth,
        }
    )


def _os_reason(exc: OSError) -> str:
    # strerror alone: str(exc) repeats the file name, which may be a misplaced secret.
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, IsADirectoryError):
        return "is a directory, not a file"
    return (exc.strerror or type(exc).__name__).lower()


class _FileLoader:
    """One load of one file: the parsed data, where each key is, and the issues found."""

    def __init__(self, file: Path, environ: Mapping[str, str]) -> None:
        self.file = file
        self.environ = environ
        self.issues: list[ConfigIssue] = []
        # 1-based (line, column) of every key, and of every item of a list.
        self.positions: dict[KeyPath, tuple[int, int]] = {(): (1, 1)}
        # Values that could not be read (unset variable, unsupported tag): whatever the
        # schema says about them would only repeat the problem already reported.
        self.broken: set[KeyPath] = set()
        # The source text of unquoted integers, for the file-mode check.
        self.int_text: dict[KeyPath, str] = {}
        self._constructor = yaml.constructor.SafeConstructor()
        self._building: set[int] = set()

    # -- reporting -------------------------------------------------------------------

    def _add(self, path: KeyPath, message: str, mark: tuple[int, int] | None = None) -> None:
        if mark is None:
            mark = self._position(path)
        dotted = ".".join(_path_part(key) for key in path)
        self.issues.append(ConfigIssue(self.file, mark[0], mark[1], dotted, message))

    def _position(self, path: KeyPath) -> tuple[int, int]:
        while path not in self.positions:
            path = path[:-1]
        return self.positions[path]

    # -- the whole load -------------------------------------------------------------

    def load(self, raw: bytes) -> Config | None:
        text = self._decode(raw)
        if text is None:
            return None
        root = self._compose(text)
        if root is None:
            return None
        if not isinstance(root, yaml.MappingNode):
            self._add(
                (),
                "the top level must be a mapping of settings such as 'providers:' and 'accounts:'",
                _mark(root.start_mark),
            )
            return None
        data = self._build(root, ())
        if not isinstance(data, dict):  # a tagged root mapping, already reported
            return None
        self._check_paths(data)
        self._check_modes()
        self._check_providers_exist(data)
        self._check_vault_seeds(data)
        try:
            config = Config.model_validate(data)
        except ValidationError as exc:
            self._report_validation(exc, data)
            return None
        return config

    def load_unpositioned(self, raw: bytes) -> Config | None:
        """The config in ``raw`` if it is valid, else ``None`` (then :meth:`load` it).

        Builds the data straight from the parser's events, without the node tree and
        without recording the position of every key: for 100,000 accounts those cost
        about 250 MB at the peak and 40% of the load time, and they are only needed to
        report problems. Anything out of the ordinary (anchors and aliases, explicit
        tags, merge keys, duplicate keys) and every problem send the caller to
        :meth:`load`, which handles and reports it with its position.
        """
        try:
            text = raw.decode("utf-8").removeprefix("\ufeff")
            data = _unpositioned_data(text, self)
        except _NeedsPositions:
            return None
        except (yaml.YAMLError, ValueError, TypeError, OverflowError):
            # A YAML error (reported with its position by load()) or a value the
            # constructor rejects.
            return None
        self._check_paths(data)
        self._check_modes()
        self._check_providers_exist(data)
        self._check_vault_seeds(data)
        if self.issues or self.broken:
            return None
        try:
            return Config.model_validate(data)
        except ValidationError:
            return None

    def _decode(self, raw: bytes) -> str | None:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            # Position only: the offending byte may be part of a secret.
            before = raw[: exc.start].decode("utf-8", errors="replace")
            self._add((), "not UTF-8 text: save the file as UTF-8", _offset_mark(before))
            return None
        return text.removeprefix("\ufeff")

    def _compose(self, text: str) -> yaml.Node | None:
        try:
            root: yaml.Node | None = yaml.compose(text, Loader=_Loader)
        except yaml.MarkedYAMLError as exc:
            self._add((), _yaml_message(exc, text), _yaml_mark(exc))
            return None
        except yaml.reader.ReaderError as exc:
            self._add(
                (),
                f"{exc.reason}: remove or escape that character",
                _offset_mark(_reader_prefix(text, exc.position)),
            )
            return None
        except yaml.YAMLError as exc:  # pragma: no cover - PyYAML raises the above
            self._add((), f"YAML error: {type(exc).__name__}")
            return None
        if root is None:
            self._add((), "the file is empty: it needs at least 'providers:' and 'accounts:'")
        return root

    # -- turning nodes into data ---------------------------------------------------

    def _build(self, node: yaml.Node, path: KeyPath) -> object:
        if isinstance(node, yaml.ScalarNode):
            return self._build_scalar(node, path)
        # Aliases share nodes, so a node that contains itself would recurse forever.
        if id(node) in self._building:
            self._add(path, "an alias refers to the value that contains it")
            self.broken.add(path)
            return None
        self._building.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode) and node.tag == _MAP:
                return self._build_mapping(node, path)
            if isinstance(node, yaml.SequenceNode) and node.tag == _SEQ:
                items: list[object] = []
                for index, item in enumerate(node.value):
                    self.positions[(*path, index)] = _mark(item.start_mark)
                    items.append(self._build(item, (*path, index)))
                return items
        finally:
            self._building.discard(id(node))
        return self._unsupported_tag(node, path)

    def _build_mapping(self, node: yaml.MappingNode, path: KeyPath) -> dict[str, object]:
        merged: dict[str, object] = {}
        own: dict[str, object] = {}
        seen: dict[str, int] = {}
        merges = [value for key, value in node.value if key.tag == _MERGE]
        # "<<: [*a, *b]": earlier sources win, and keys written here win over all of
        # them; building the later ones first lets the winners' positions stick.
        for value in merges:
            sources = value.value if isinstance(value, yaml.SequenceNode) else [value]
            for source in reversed(sources):
                if isinstance(source, yaml.MappingNode):
                    built = self._build(source, path)
                    if isinstance(built, dict):
                        merged.update(built)
                else:
                    self._add(path, "'<<' merges only mappings", _mark(source.start_mark))
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE:
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                self._add(
                    path,
                    "a key must be a plain name, not a list or mapping",
                    _mark(key_node.start_mark),
                )
                continue
            # The key as written: "123:" names an account "123", not the number.
            key: str = key_node.value
            key_mark = _mark(key_node.start_mark)
            if key in seen:
                self._add(
                    (*path, key), f"duplicate key '{key}' (first set on line {seen[key]})", key_mark
                )
                continue
            seen[key] = key_mark[0]
            self.positions[(*path, key)] = key_mark
            own[key] = self._build(value_node, (*path, key))
        merged.update(own)
        return merged

    def _build_scalar(self, node: yaml.ScalarNode, path: KeyPath) -> object:
        if node.tag == _STR:
            return self._interpolate(node.value, path, _mark(node.start_mark))
        if node.tag not in self._constructor.yaml_constructors:
            return self._unsupported_tag(node, path)
        # Plain style is None from the pure-Python parser, "" from libyaml.
        if node.tag == _INT and not node.style:
            self.int_text[path] = node.value
        try:
            return self._constructor.construct_object(node, deep=True)
        except Exception:
            # Whatever failed, the value is not a valid <tag>; the exception's own
            # message would quote the value.
            kind = node.tag.removeprefix(_TAG)
            self._add(
                path, f"not a valid {kind}: quote it to use it as text", _mark(node.start_mark)
            )
            self.broken.add(path)
            return None

    def _unsupported_tag(self, node: yaml.Node, path: KeyPath) -> object:
        # The tag is not named: an unquoted value starting with "!" is read as one.
        self._add(
            path,
            "unsupported YAML tag (quote a value that starts with '!')",
            _mark(node.start_mark),
        )
        self.broken.add(path)
        return None

    def _interpolate(self, text: str, path: KeyPath, mark: tuple[int, int]) -> str:
        if "${" not in text:
            return text
        problems: list[str] = []

        def replace(match: re.Match[str]) -> str:
            whole, body = match.group(0), match.group(1)
            if whole == "$${":
                return "${"
            if body is None:
                problems.append("'${' without a closing '}' (write '$${' for a literal '${')")
                return whole
            ref = _REFERENCE_BODY.fullmatch(body)
            if ref is None:
                problems.append(
                    "malformed '${...}': expected ${NAME} or ${NAME:-default} "
                    "(write '$${' for a literal '${')"
                )
                return whole
            name, default = ref.group(1), ref.group(2)
            if default is not None and "${" in default:
                problems.append(f"${{{name}:-...}}: a default cannot contain another '${{'")
                return whole
            value = self.environ.get(name)
            if default is not None and not value:
                return default
            if value is None:
                problems.append(
                    f"environment variable {name} is not set "
                    f"(use ${{{name}:-default}} to give a default)"
                )
                return whole
            return value

        result = _REFERENCE.sub(replace, text)
        if problems:
            for problem in dict.fromkeys(problems):
                self._add(path, problem, mark)
            self.broken.add(path)
            # Keep the text as written: a secret that is present but unresolved should
            # not also be reported as missing.
            return text
        return result

    # -- checks on the data before the schema -----------------------------------------

    def _check_paths(self, data: dict[str, object]) -> None:
        base = _config_dir(self.file)
        for pattern, is_secret in _PATH_KEYS:
            for path, value in _matching(data, pattern):
                if not isinstance(value, str) or path in self.broken:
                    continue  # the schema reports a wrong type
                if value.startswith("~"):
                    self._add(
                        path,
                        "'~' is not expanded: write an absolute path, or one "
                        "relative to the config file's directory",
                    )
                elif is_secret:
                    self._check_secret_file(path, value, base)

    def _check_secret_file(self, path: KeyPath, value: str, base: Path) -> None:
        # The message never repeats the file name: a secret pasted here by mistake
        # would be printed with it. The directory shows where relative names point.
        if not value.strip():
            self._add(path, "is empty: name the file holding the secret")
            return
        where = f" (relative paths are taken from {base})"
        try:
            target = _under(base, Path(value))
            info = target.stat()
            if stat.S_ISDIR(info.st_mode):
                self._add(path, "is a directory, not a file" + where)
                return
            if not stat.S_ISREG(info.st_mode):
                self._add(path, "is not a regular file" + where)
                return
            # Opening, not os.access(): as root access() says yes to everything.
            os.close(os.open(target, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC))
        except OSError as exc:
            self._add(path, _os_reason(exc) + where)
        except ValueError:  # a NUL byte in the name
            self._add(path, "is not a valid file name")

    def _check_modes(self) -> None:
        for path in _MODE_KEYS:
            text = self.int_text.get(path)
            if text is not None and text.isdigit() and not text.startswith("0"):
                self._add(
                    path,
                    f'file modes are octal: write 0{text} or "0{text}", '
                    f"not {text} (which YAML reads as a decimal number)",
                )
                self.broken.add(path)

    def _check_providers_exist(self, data: dict[str, object]) -> None:
        # Here rather than in Config's own check so that it is reported per account and
        # together with every other problem; Config still rejects it on its own.
        accounts, providers = data.get("accounts"), data.get("providers", {})
        if not isinstance(accounts, dict) or not isinstance(providers, dict):
            return
        for account_name, account in accounts.items():
            provider = account.get("provider") if isinstance(account, dict) else None
            path: KeyPath = ("accounts", account_name, "provider")
            if not isinstance(provider, str) or provider in providers or path in self.broken:
                continue
            try:
                _check_name(provider)
            except ValueError:
                continue  # the schema reports an invalid name
            self._add(path, unknown_provider_message(provider, providers))

    def _check_vault_seeds(self, data: dict[str, object]) -> None:
        # Per account, like the provider check: Config's own check stops at the first.
        accounts = data.get("accounts")
        if not isinstance(accounts, dict) or data.get("vault") is not None:
            return
        for account_name, account in accounts.items():
            seed = account.get("refresh_token") if isinstance(account, dict) else None
            if isinstance(seed, str) and seed.startswith(VAULT_SCHEME):
                self._add(("accounts", account_name, "refresh_token"), VAULT_MISSING)

    # -- schema errors ---------------------------------------------------------------

    def _report_validation(self, exc: ValidationError, data: dict[str, object]) -> None:
        for error in exc.errors(include_input=False, include_url=False):
            if error["type"] in ("unknown_provider", "vault_missing"):
                continue  # reported per account by _check_providers_exist / _vault_seeds
            loc: KeyPath = tuple(error["loc"])
            if loc and loc[-1] == "[key]":
                # An invalid mapping key (a name): report it at the key itself.
                loc = loc[:-1]
            if any(loc[:n] in self.broken for n in range(len(loc) + 1)):
                continue
            self._add(loc, _describe(error["type"], error["msg"], loc, data))


class _NeedsPositions(Exception):
    """The unpositioned read met something only the positioned one handles."""


# What an event-driven read keeps per open mapping or sequence: [the container, the
# key awaiting its value] (the key is None between entries, and always for a list).
_Frame = list[Any]


def _unpositioned_data(text: str, loader: _FileLoader) -> dict[str, object]:
    """The data :meth:`_FileLoader.load` builds from ``text``, built from parser
    events instead of a node tree. Raises :class:`_NeedsPositions` where ``load``
    would do something else than build plain data: report a problem, resolve an
    anchor, alias, explicit tag or merge key, or reject a duplicate key."""
    parser = _Loader(text)
    try:
        get = parser.get_event
        resolve = parser.resolve
        if not isinstance(get(), yaml.StreamStartEvent):  # pragma: no cover
            raise _NeedsPositions
        if not isinstance(get(), yaml.DocumentStartEvent):
            raise _NeedsPositions  # an empty file
        event = get()
        if type(event) is not yaml.MappingStartEvent or event.anchor or event.tag:
            raise _NeedsPositions
        root: dict[str, object] = {}
        # The keys leading to the innermost open container, for int_text.
        path: list[Key] = []
        stack: list[_Frame] = [[root, None]]
        scalar, mapping_start, sequence_start = (
            yaml.ScalarEvent,
            yaml.MappingStartEvent,
            yaml.SequenceStartEvent,
        )
        while stack:
            event = get()
            kind = type(event)
            frame = stack[-1]
            container = frame[0]
            if kind is yaml.MappingEndEvent or kind is yaml.SequenceEndEvent:
                stack.pop()
                if path:
                    path.pop()
                continue
            if kind is not scalar and kind is not mapping_start and kind is not sequence_start:
                raise _NeedsPositions  # an alias
            if event.anchor is not None or event.tag is not None:
                raise _NeedsPositions
            is_map = type(container) is dict
            if is_map and frame[1] is None:
                # A key: the plain name as written ("123:" names an account "123").
                if kind is not scalar or (event.value == "<<" and event.implicit[0]):
                    raise _NeedsPositions  # not a scalar, or a merge key
                if event.value in container:
                    raise _NeedsPositions  # a duplicate
                frame[1] = event.value
                continue
            key: Key = frame[1] if is_map else len(container)
            value: object
            if kind is scalar:
                tag = resolve(yaml.ScalarNode, event.value, event.implicit)
                if tag == _STR:
                    string: str = event.value
                    if "${" in string:
                        string = loader._interpolate(string, (), (1, 1))
                        if loader.issues:
                            raise _NeedsPositions
                    value = string
                else:
                    value = _construct(loader, tag, event, path, key)
            elif kind is mapping_start:
                value = {}
            else:
                value = []
            if is_map:
                container[key] = value
                frame[1] = None
            else:
                container.append(value)
            if kind is not scalar:
                stack.append([value, None])
                path.append(key)
        if not isinstance(get(), yaml.DocumentEndEvent) or not isinstance(
            get(), yaml.StreamEndEvent
        ):
            raise _NeedsPositions  # more than one document
        return root
    finally:
        parser.dispose()


def _construct(
    loader: _FileLoader, tag: str, event: yaml.ScalarEvent, path: list[Key], key: Key
) -> object:
    """A non-string scalar, as ``_FileLoader._build_scalar`` constructs it."""
    constructor = loader._constructor
    if tag not in constructor.yaml_constructors:
        raise _NeedsPositions
    if tag == _INT and not event.style:
        loader.int_text[(*path, key)] = event.value
    node = yaml.ScalarNode(tag, event.value, style=event.style)
    value = constructor.construct_object(node, deep=True)
    # construct_object remembers every node it built; this one is never seen again.
    constructor.constructed_objects.pop(node, None)
    return value


def _describe(kind: str, msg: str, loc: KeyPath, data: dict[str, object]) -> str:
    """An actionable message for one pydantic error, built without its input value."""
    if kind == "missing":
        return f"required key '{loc[-1]}' is missing"
    if kind == "extra_forbidden":
        key = str(loc[-1])
        model = _model_at(loc[:-1])
        known = list(model.model_fields) if model is not None else []
        close = difflib.get_close_matches(key, known, n=1)
        if close:
            return f"unknown key '{key}' (did you mean '{close[0]}'?)"
        if known:
            return f"unknown key '{key}' (expected one of: {', '.join(known)})"
        return f"unknown key '{key}'"
    if kind in ("value_error", "assertion_error"):
        return msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    value = _value_at(data, loc)
    got = f" (got {_kind_of(value)})"
    if kind in ("model_type", "dict_type"):
        return "must be a mapping of keys to values" + got
    if kind == "path_type":
        return "must be a file path" + got
    if kind in ("bool_type", "bool_parsing"):
        return "must be true or false" + got
    if kind == "string_type":
        hint = "; quote it" if isinstance(value, int | float | datetime.date) else ""
        return "must be text" + got + hint
    text = msg.replace("Input should be", "must be", 1).replace("Input is", "is", 1)
    if kind == "literal_error":
        options = _literal_options(loc)
        if isinstance(value, str) and (close := difflib.get_close_matches(value, options, n=1)):
            return f"{text} (did you mean '{close[0]}'?)"
        return text
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return text + got
    return text


def _kind_of(value: object) -> str:
    # Only the kind of value: the value itself may be a secret.
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, datetime.date):
        return "a date"
    return "binary data" if isinstance(value, bytes) else "another kind of value"


def _value_at(data: object, loc: KeyPath) -> object:
    for key in loc:
        try:
            data = data[key]  # type: ignore[index]
        except (TypeError, KeyError, IndexError):
            return None
    return data


def _matching(data: object, pattern: tuple[str, ...]) -> list[tuple[KeyPath, object]]:
    """(path, value) for every path in ``data`` that ``pattern`` matches ("*": any key)."""
    found: list[tuple[KeyPath, object]] = [((), data)]
    for part in pattern:
        found = [
            ((*path, key), child)
            for path, value in found
            if isinstance(value, dict)
            for key, child in value.items()
            if part in ("*", key)
        ]
    return found


def _strip_type(tp: Any) -> Any:
    """``tp`` without ``Annotated[...]`` and ``| None`` wrappers."""
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp = get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            rest = [arg for arg in get_args(tp) if arg is not type(None)]
            if len(rest) != 1:
                return tp
            tp = rest[0]
        else:
            return tp


def _type_at(loc: KeyPath) -> Any:
    """The schema type at ``loc`` (None if the schema has nothing there)."""
    tp: Any = Config
    for key in loc:
        tp = _strip_type(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(str(key))
            if field is None:
                return None
            tp = field.annotation
        elif get_origin(tp) is dict:
            tp = get_args(tp)[1]
        elif get_origin(tp) is list:
            tp = get_args(tp)[0]
        else:
            return None
    return _strip_type(tp)


def _model_at(loc: KeyPath) -> type[BaseModel] | None:
    tp = _type_at(loc)
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _literal_options(loc: KeyPath) -> list[str]:
    tp = _type_at(loc)
    if get_origin(tp) is not Literal:
        return []
    return [str(arg) for arg in get_args(tp)]


def _path_part(key: Key) -> str:
    # Names may contain dots ("alice.prod"); quoting those keeps the path unambiguous.
    text = str(key)
    return text if _PLAIN_PART.fullmatch(text) else json.dumps(text, ensure_ascii=False)


_PLAIN_PART = re.compile(r"[^\s.\"']+")


def _mark(mark: yaml.Mark) -> tuple[int, int]:
    return mark.line + 1, mark.column + 1


def _offset_mark(before: str) -> tuple[int, int]:
    """1-based (line, column) just after the text ``before``."""
    return before.count("\n") + 1, len(before) - (before.rfind("\n") + 1) + 1


def _reader_prefix(text: str, position: int) -> str:
    # libyaml counts bytes of UTF-8, the pure-Python reader counts characters.
    if _Loader is not yaml.SafeLoader:
        return text.encode("utf-8")[:position].decode("utf-8", errors="ignore")
    return text[:position]


def _yaml_mark(exc: yaml.MarkedYAMLError) -> tuple[int, int]:
    mark = exc.problem_mark or exc.context_mark
    return _mark(mark) if mark is not None else (1, 1)


# Quoted text in PyYAML's messages: a single character is kept ("'@'"), longer text
# may be part of a value ("found undefined alias 'the-secret'") and is dropped.
_QUOTED = re.compile(r"\s*'([^']{2,})'")


def _yaml_message(exc: yaml.MarkedYAMLError, text: str) -> str:
    problem = _QUOTED.sub(_keep_token, exc.problem or "invalid YAML")
    message = problem
    if exc.context and exc.context_mark is not None and exc.context_mark != exc.problem_mark:
        line = exc.context_mark.line + 1
        message += f" ({_QUOTED.sub(_keep_token, exc.context)} started on line {line})"
    mark = exc.problem_mark
    char = _char_at(text, mark) if mark is not None else ""
    if char == "\t":
        message += ": YAML indents with spaces, not tabs"
    elif "undefined alias" in problem:
        message += ": quote a value that starts with '*'"
    elif "cannot start any token" in problem and char:
        message += f": quote a value that starts with {char!r}"
    return message


def _keep_token(match: re.Match[str]) -> str:
    inner = match.group(1)
    # Token names such as '<stream end>' and escaped characters such as '\t' are safe.
    if (inner.startswith("<") and inner.endswith(">")) or re.fullmatch(r"\\.", inner):
        return match.group(0)
    return ""


def _char_at(text: str, mark: yaml.Mark) -> str:
    lines = text.splitlines()
    if mark.line < len(lines) and mark.column < len(lines[mark.line]):
        return lines[mark.line][mark.column]
    return ""
