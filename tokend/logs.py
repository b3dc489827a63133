"""structlog setup: JSON lines on stderr, secrets redacted wherever they appear.

Redaction works on two levels, because a secret can reach a log line by key
(``refresh_token=...``) or buried in text (an exception message quoting a header):

* a key that names a secret (``refresh_token``, ``client_secret``, ``Authorization``,
  ``password``... see :func:`is_secret_key`) has its value replaced, however deep it
  sits;
* every string value is scanned for the values of secrets tokend currently holds
  (registered with :func:`register_secret`) and for ``Bearer``/``Basic`` credentials.

Exceptions are rendered without local variables: a traceback's locals would hold
the very tokens this file exists to hide.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO

import orjson
import structlog

REDACTED = "[redacted]"

# Field names that hold a secret, compared in lower case with "-" read as "_" (HTTP
# headers). Exact names: a key merely containing "token" ("accounts_without_token",
# "token_valid") holds names or flags, and redacting it hides what the line says.
_SECRET_KEYS = frozenset(
    {
        "token",
        "tokens",
        "access_token",
        "refresh_token",
        "id_token",
        "secret",
        "secrets",
        "client_secret",
        "password",
        "passwd",
        "passphrase",
        "authorization",
        "proxy_authorization",
        "assertion",
        "client_assertion",
        "private_key",
        "cookie",
        "set_cookie",
        "credential",
        "credentials",
        "api_key",
        "code_verifier",
        "device_code",
        # Vault logins.
        "vault_token",
        "client_token",
        "secret_id",
        "jwt",
    }
)
# Secret names that also count with a prefix ("new_refresh_token", "seed_password").
_SECRET_SUFFIXES = (
    "_access_token",
    "_refresh_token",
    "_id_token",
    "_client_secret",
    "_secret",
    "_password",
    "_authorization",
    "_assertion",
    "_private_key",
    "_api_key",
)


def is_secret_key(key: str) -> bool:
    """Whether a field called ``key`` holds a secret (its value is then redacted)."""
    name = key.lower().replace("-", "_")
    return name in _SECRET_KEYS or name.endswith(_SECRET_SUFFIXES)


_CREDENTIAL_IN_TEXT = re.compile(r"\b(Bearer|Basic)\s+[A-Za-z0-9._~+/=-]+", re.IGNORECASE)


class _SecretRegistry:
    """Values to scrub from any log text.

    Text is cut into token-shaped words and each is looked up in a set, so the cost
    per log line does not grow with the number of accounts (100,000 tokens would
    make one big alternation regex slow to rebuild on every refresh).

    A secret with characters outside the word pattern (``s3cr:et/+&%=``) is not one
    word. It is found through its longest word that other characters bound on both
    sides (such a word is cut out of any text holding the secret exactly as it is cut
    out of the secret), then replaced whole; one without such a word (short client
    secrets full of punctuation) is matched by a regex of all of them, which stays
    small: most such secrets come from the config, not from the IdP.
    """

    _MIN_LENGTH = 8
    _WORD = re.compile(r"[A-Za-z0-9._~+/=-]{8,}")

    def __init__(self) -> None:
        self._values: set[str] = set()
        # Inner word -> the secrets (with other characters) that contain it; tuples,
        # replaced rather than changed, so a scrub in another thread never sees one
        # change under it.
        self._anchored: dict[str, tuple[str, ...]] = {}
        self._loose: set[str] = set()
        self._loose_pattern: re.Pattern[str] | None = None
        self._lock = threading.Lock()

    @classmethod
    def _anchor(cls, value: str) -> str | None:
        inner = [
            match.group(0)
            for match in cls._WORD.finditer(value)
            if match.start() > 0 and match.end() < len(value)
        ]
        return max(inner, key=len) if inner else None

    def add(self, value: str) -> None:
        if len(value) < self._MIN_LENGTH:
            return
        with self._lock:
            if self._WORD.fullmatch(value):
                self._values.add(value)
                return
            anchor = self._anchor(value)
            if anchor is not None:
                holders = self._anchored.get(anchor, ())
                if value not in holders:
                    self._anchored[anchor] = (*holders, value)
            elif value not in self._loose:
                self._loose.add(value)
                self._loose_pattern = None

    def discard(self, value: str) -> None:
        with self._lock:
            self._values.discard(value)
            anchor = self._anchor(value)
            if anchor is not None and value in self._anchored.get(anchor, ()):
                rest = tuple(v for v in self._anchored[anchor] if v != value)
                if rest:
                    self._anchored[anchor] = rest
                else:
                    del self._anchored[anchor]
            if value in self._loose:
                self._loose.discard(value)
                self._loose_pattern = None

    def _loose_regex(self) -> re.Pattern[str] | None:
        pattern = self._loose_pattern
        if pattern is None and self._loose:
            with self._lock:
                # Longest first: a secret inside another must not cut the longer one.
                ordered = sorted(self._loose, key=len, reverse=True)
                pattern = self._loose_pattern = re.compile("|".join(map(re.escape, ordered)))
        return pattern

    def scrub(self, text: str) -> str:
        if len(text) < self._MIN_LENGTH or not (self._values or self._anchored or self._loose):
            return text
        values = self._values
        anchored = self._anchored
        found: list[str] = []
        loose = self._loose_regex()
        if loose is not None:
            text = loose.sub(REDACTED, text)

        def replace(match: re.Match[str]) -> str:
            word = match.group(0)
            if word in values:
                return REDACTED
            holders = anchored.get(word)
            if holders:
                found.extend(holders)
            # "refresh_token=SECRET" in a URL-encoded body or a repr is one word.
            key, sep, rest = word.partition("=")
            if sep and rest in values:
                return key + sep + REDACTED
            return word

        text = self._WORD.sub(replace, text)
        for secret in sorted(found, key=len, reverse=True):
            text = text.replace(secret, REDACTED)
        return text


_secrets = _SecretRegistry()


def register_secret(value: str | None) -> None:
    """Make sure ``value`` never appears in a log line, whatever carries it."""
    if value:
        _secrets.add(value)


def register_long_lived_secret(value: str | None) -> None:
    """Like :func:`register_secret`, also for the forms a secret takes on the wire
    (form- and percent-encoded), for client secrets and key material that an error
    text might quote as they were sent."""
    if value:
        from urllib.parse import quote, quote_plus

        for form in {value, quote_plus(value, safe=""), quote(value, safe="")}:
            _secrets.add(form)


def forget_secret(value: str | None) -> None:
    if value:
        _secrets.discard(value)


def redact(value: Any, key: str | None = None) -> Any:
    """``value`` with every secret replaced (recursively through dicts and lists)."""
    if key is not None and is_secret_key(key):
        # Flags and counts ("retry_same_token_now", "token_valid") carry no secret.
        if value is None or value == "" or isinstance(value, bool | int | float):
            return value
        return REDACTED
    if isinstance(value, str):
        return _CREDENTIAL_IN_TEXT.sub(r"\1 " + REDACTED, _secrets.scrub(value))
    if isinstance(value, Mapping):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [redact(v) for v in value]
    if isinstance(value, int | float | bool) or value is None:
        return value
    return redact(str(value))


def _redact_processor(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key, value in list(event_dict.items()):
        event_dict[key] = redact(value, key)
    return event_dict


def _format_exception_without_locals(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    exc_info = event_dict.pop("exc_info", None)
    if exc_info:
        if exc_info is True:
            exc_info = sys.exc_info()
        elif isinstance(exc_info, BaseException):
            exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
        if exc_info and exc_info[0] is not None:
            import traceback

            event_dict["exception"] = "".join(traceback.format_exception(*exc_info))
    return event_dict


def _orjson_dumps(obj: Any, default: Any = None) -> str:
    return orjson.dumps(obj, default=str).decode()


_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure(level: str = "info", fmt: str = "json", stream: TextIO | None = None) -> None:
    """Set up structlog for the process: call once at start (and again on reload)."""
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _format_exception_without_locals,
        # Last before rendering, so everything added above is redacted too.
        _redact_processor,
    ]
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    else:
        renderer = structlog.processors.JSONRenderer(serializer=_orjson_dumps)
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.WriteLoggerFactory(file=stream or sys.stderr),
        cache_logger_on_first_use=False,
    )
    # Libraries log through the standard library (the scheduler, httpx): render
    # their records as the same redacted JSON lines, and keep their chatter out.
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=processors,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(_LEVELS[level])
    # APScheduler says "Running job", "Added job" and more at info on every wake of
    # the refresh timer: four lines per refresh.
    for noisy in ("httpx", "httpcore", "asyncio", "apscheduler"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def get_logger(**initial: Any) -> structlog.typing.FilteringBoundLogger:
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(**initial)
    return logger
