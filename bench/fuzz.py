"""``python -m bench fuzz [--cases N] [--only TARGET ...] [--engine E]``: fuzz every input
surface tokend reads from outside.

Engines: ``atheris`` (coverage-guided, libFuzzer mutating bytes from seed inputs; the
default when it is installed: ``pip install -e '.[bench]'``), each target in a child
process, or ``hypothesis`` (structured random inputs, slower per case; what the test
suite runs briefly).

Targets:

``socket``     request bytes, in random chunks, through the connection layer of the
               socket server (parser, pipelining, limits) with a stub transport;
``config``     config files: random YAML, and valid configs with values replaced by
               random ones, through ``load_config``;
``token``      token endpoint responses (status, headers, body) through
               ``classify_response``;
``discovery``  discovery documents through ``token_endpoint_from_metadata``.

A case *crashes* when it raises anything but the error the surface is documented to
raise (or breaks an invariant: an unbounded field, a buffer past its limit), and
*hangs* when it takes longer than ``--hang-after`` seconds (default 1). Failing cases
are counted, not stopped at, and the first few are printed. Exit status 1 if any
target had a crash or a hang.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

TARGETS = ("socket", "config", "token", "discovery")
_ROUND = 500


@dataclass
class Target:
    strategy: st.SearchStrategy[Any]
    check: Callable[[Any], None]
    # For byte-mutating engines: bytes -> the value ``check`` takes, and seed inputs.
    from_bytes: Callable[[bytes], Any]
    seeds: list[bytes]


@dataclass
class Tally:
    name: str
    cases: int = 0
    crashes: int = 0
    hangs: int = 0
    slowest: float = 0.0
    examples: list[str] = field(default_factory=list)

    def record(
        self, run: Callable[[], None], hang_after: float, describe: Callable[[], str]
    ) -> None:
        started = time.perf_counter()
        try:
            run()
        except Exception:
            self.crashes += 1
            if len(self.examples) < 5:
                self.examples.append(f"crash on {describe()}:\n{traceback.format_exc()}")
        elapsed = time.perf_counter() - started
        if elapsed > hang_after:
            # Once more, alone: on a loaded machine one slow case is often the
            # scheduler's doing, not the input's. A hang is slow both times.
            started = time.perf_counter()
            with contextlib.suppress(Exception):
                run()
            elapsed = min(elapsed, time.perf_counter() - started)
        self.slowest = max(self.slowest, elapsed)
        if elapsed > hang_after:
            self.hangs += 1
            if len(self.examples) < 5:
                self.examples.append(f"hang ({elapsed:.2f} s) on {describe()}")
        self.cases += 1


def drive(
    tally: Tally,
    strategy: st.SearchStrategy[Any],
    check: Callable[[Any], None],
    cases: int,
    hang_after: float,
) -> None:
    """Run ``check`` on ``cases`` values drawn from ``strategy`` (in rounds, since
    hypothesis may end a round early when it believes the space is exhausted)."""
    rounds = 0
    while tally.cases < cases and rounds < 1000:
        rounds += 1
        # Rounds of a bounded size: hypothesis' bookkeeping of what it has tried grows
        # with a round, and slows every example down once it is large.
        remaining = min(cases - tally.cases, _ROUND)

        @settings(
            max_examples=remaining,
            deadline=None,
            database=None,
            derandomize=False,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(strategy)
        def one(value: Any) -> None:
            tally.record(lambda: check(value), hang_after, lambda: repr(value)[:300])

        one()


# -- socket ----------------------------------------------------------------------------------


class _StubTransport(asyncio.Transport):
    """Records what the connection writes; reports pause/resume and closing."""

    def __init__(self) -> None:
        super().__init__()
        self.written = 0
        self.closed = False
        self.reading = True
        self.high_water = 64 * 1024

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += len(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.high_water = high or self.high_water

    def get_write_buffer_size(self) -> int:
        return 0


def _socket_target() -> Target:
    import socket

    from tokend.publish._http import HttpError, HttpListener, Limits, _Connection, parse_head

    limits = Limits(max_connections=8, idle_timeout=30.0, max_header_bytes=1024)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    answers = [b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"]

    def handler(request: Any, peer: Any) -> bytes:
        assert isinstance(request.path, bytes) and request.path.startswith(b"/")
        return answers[0]

    listener = HttpListener(sock, handler, limits)
    pieces = st.sampled_from(
        [
            b"GET /v1/tokens/alice HTTP/1.1\r\n",
            b"POST /v1/tokens/a/refresh HTTP/1.0\r\n",
            b"Host: x\r\n",
            b"Host: y\r\n",
            b"Connection: close\r\n",
            b"Connection: keep-alive, Upgrade\r\n",
            b"Content-Length: 0\r\n",
            b"Content-Length: 5\r\n",
            b"Content-Length: 00000000000000000000\r\n",
            b"Transfer-Encoding: chunked\r\n",
            b"Accept: text/plain\r\n",
            b"X-Big: " + b"a" * 2000 + b"\r\n",
            b" folded\r\n",
            b"\r\n",
            b"\r",
            b"\n",
            b"\x00",
            b"\xff",
            b":",
            b"GET / HTTP/1.1\r\n\r\n",
        ]
    )
    stream = st.lists(pieces | st.binary(max_size=64), max_size=24).map(b"".join)
    requests = st.tuples(
        stream,
        st.lists(st.integers(min_value=1, max_value=4096), min_size=1, max_size=8),
        st.booleans(),
    )

    def check(value: tuple[bytes, list[int], bool]) -> None:
        data, cuts, eof = value
        # The parser alone: a Request or an HttpError, nothing else.
        head = data.partition(b"\r\n\r\n")[0]
        try:
            parse_head(head)
        except HttpError as exc:
            assert exc.status in (400, 413, 431)
        # The connection layer: the bytes in chunks, maybe the writer pausing.
        connection = _Connection(listener, None)
        transport = _StubTransport()
        connection.connection_made(transport)
        offset = 0
        for i, cut in enumerate(cuts * 4):
            if offset >= len(data) or connection._closed:
                break
            connection.data_received(data[offset : offset + cut])
            offset += cut
            if i == 1:
                connection.pause_writing()
            if i == 3:
                connection.resume_writing()
            held = len(connection._buffer)
            assert held <= limits.max_header_bytes + 64 * 1024 + 4096, held
        if eof and not connection._closed:
            connection.eof_received()
        connection.connection_lost(None)

    def from_bytes(data: bytes) -> tuple[bytes, list[int], bool]:
        # First byte: end of input or not, and where the stream is cut into reads.
        first = data[0] if data else 0
        cuts = [1 + (first >> 1) % 7, 1 + first * 37 % 1500, 4096]
        return data[1:], cuts, bool(first & 1)

    seeds = [
        b"\x00GET /v1/tokens/alice HTTP/1.1\r\nHost: t\r\n\r\n" * 3,
        b"\x05POST /v1/tokens/a/refresh HTTP/1.0\r\nContent-Length: 0\r\n\r\n",
        b"\x10GET / HTTP/1.1\r\nConnection: close\r\nAccept: text/plain\r\n\r\n",
        b"\x03\r\n\r\nGET /healthz HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
    ]
    return Target(requests, check, from_bytes, seeds)


# -- config ----------------------------------------------------------------------------------

_VALID_CONFIG: dict[str, Any] = {
    "state": {"backend": "sqlite", "path": "./state/tokend.db"},
    "serve": {"socket": "./tokend.sock", "token_dir": "./tokens", "idle_timeout": "30s"},
    "log": {"level": "info"},
    "refresh": {"min_margin": "60s", "at_fraction": 0.75},
    "providers": {
        "idp": {
            "issuer": "https://idp.example",
            "client_id": "client",
            "client_secret": "secret-value-123",
            "auth_method": "client_secret_basic",
            "timeout": "10s",
            "backoff": {"initial": "1s", "max": "5m"},
        }
    },
    "accounts": {
        "alice": {
            "provider": "idp",
            "refresh_token": "seed-refresh-token-1234",
            "outputs": [{"file": "auth", "template": "Bearer {access_token}"}],
        }
    },
}


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(value, dict):
        for key, inner in value.items():
            found += _paths(inner, (*prefix, key))
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            found += _paths(inner, (*prefix, index))
    return found


def _replace(document: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    copy: Any = dict(document) if isinstance(document, dict) else list(document)
    copy[path[0]] = _replace(copy[path[0]], path[1:], new)
    return copy


def _config_target() -> Target:
    import yaml

    from tokend.config import ConfigError, load_config

    scalars = (
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2**70), max_value=2**70)
        | st.floats()
        | st.text(max_size=40)
        | st.sampled_from(
            ["0640", "${HOME}", "${NOPE:-x}", "$${", "~/x", "1e999", "5m", "-1s", "..", "\x00"]
        )
    )
    values = st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=3)
        ),
        max_leaves=6,
    )
    paths = _paths(_VALID_CONFIG)
    mutated = st.lists(st.tuples(st.sampled_from(paths), values), min_size=1, max_size=4).map(
        lambda changes: _apply(changes)
    )

    def _apply(changes: list[tuple[tuple[Any, ...], Any]]) -> bytes:
        document: Any = _VALID_CONFIG
        for path, new in changes:
            with contextlib.suppress(KeyError, IndexError, TypeError):
                document = _replace(document, path, new)
        return yaml.safe_dump(document, allow_unicode=True).encode("utf-8", "surrogatepass")

    raw_yaml = st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")) | st.binary(
        max_size=300
    )
    # In memory where there is a tmpfs for it: the file is rewritten for every case.
    shm = Path("/dev/shm")
    directory = Path(tempfile.mkdtemp(prefix="tokend-fuzz-", dir=shm if shm.is_dir() else None))
    path = directory / "config.yaml"
    environ = {"HOME": "/home/x"}

    def check(raw: bytes) -> None:
        path.write_bytes(raw)
        try:
            load_config(path, environ=environ)
        except ConfigError as exc:
            for issue in exc.errors:
                str(issue)

    seeds = [
        yaml.safe_dump(_VALID_CONFIG).encode(),
        json.dumps(_VALID_CONFIG).encode(),
        b"providers: {}\naccounts: {}\n",
        b"serve: {socket: ${SOCK:-./s}, token_file_mode: 0640}\nproviders: {}\n",
    ]
    return Target(mutated | raw_yaml, check, lambda data: data, seeds)


# -- token responses ---------------------------------------------------------------------------


def _token_target() -> Target:
    from tokend.oauth import TokenFailure, TokenResponse
    from tokend.oauth._parse import (
        MAX_DESCRIPTION_CHARS,
        MAX_EXPIRES_IN_SECONDS,
        MAX_RETRY_AFTER_SECONDS,
        MAX_SCOPE_CHARS,
        MAX_TOKEN_CHARS,
        classify_response,
    )

    json_values = st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats()
        | st.text(max_size=40)
        | st.sampled_from(["Bearer", "bearer\r\nX: y", "read write", "1e12", "NaN", "-5"]),
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3)
        ),
        max_leaves=8,
    )
    bodies = st.fixed_dictionaries(
        {},
        optional={
            key: json_values
            for key in (
                "access_token",
                "token_type",
                "expires_in",
                "refresh_token",
                "scope",
                "error",
                "error_description",
                "id_token",
            )
        },
    ).map(lambda body: json.dumps(body).encode())
    raw_numbers = st.sampled_from(
        [b"1e400", b"-1e400", b"NaN", b"Infinity", b"1" * 5000, b"-0"]
    ).map(lambda n: b'{"access_token": "at", "expires_in": ' + n + b"}")
    headers = st.dictionaries(
        st.sampled_from(["Retry-After", "retry-after", "Content-Type", "Location", "X"]),
        st.text(max_size=40),
        max_size=4,
    )
    cases = st.tuples(
        st.integers(min_value=100, max_value=999),
        headers,
        bodies | raw_numbers | st.binary(max_size=2048),
        st.booleans(),
    )

    def check(value: tuple[int, dict[str, str], bytes, bool]) -> None:
        status, hdrs, body, truncated = value
        outcome = classify_response(
            status, hdrs, body, now=1.7e9, truncated=truncated, secrets=("s3cr:et/+&%=",)
        )
        if isinstance(outcome, TokenFailure):
            assert 1 <= len(outcome.reason) <= 64
            assert outcome.description is None or len(outcome.description) <= MAX_DESCRIPTION_CHARS
            assert (
                outcome.retry_after is None or 0 <= outcome.retry_after <= MAX_RETRY_AFTER_SECONDS
            )
            assert "s3cr:et/+&%=" not in outcome.summary()
            return
        assert isinstance(outcome, TokenResponse) and 200 <= status < 300
        for token in (outcome.access_token, outcome.refresh_token):
            if token is not None:
                assert 0 < len(token) <= MAX_TOKEN_CHARS
                assert all("\x21" <= ch <= "\x7e" for ch in token)
        assert outcome.expires_in is None or 0 < outcome.expires_in <= MAX_EXPIRES_IN_SECONDS
        assert outcome.token_type.isascii() and outcome.token_type.isprintable()
        assert " " not in outcome.token_type
        if outcome.scope is not None:
            assert len(outcome.scope) <= MAX_SCOPE_CHARS
            assert outcome.scope.isascii() and outcome.scope.isprintable()

    def from_bytes(data: bytes) -> tuple[int, dict[str, str], bytes, bool]:
        # Two bytes of status, one of flags, then the body.
        head = data[:3].ljust(3, b"\0")
        status = 100 + int.from_bytes(head[:2], "big") % 500
        flags = head[2]
        headers: dict[str, str] = {}
        if flags & 2:
            headers["Retry-After"] = "7"
        if flags & 4:
            headers["Content-Type"] = "text/html"
        elif flags & 8:
            headers["Content-Type"] = "application/json"
        return status, headers, data[3:], bool(flags & 1)

    ok = b"\x00\x64\x08"  # 200, JSON
    seeds = [
        ok + b'{"access_token":"at","token_type":"Bearer","expires_in":3600,'
        b'"refresh_token":"rt","scope":"read write"}',
        ok + b'{"access_token":"at","expires_in":1e12,"token_type":"DPoP"}',
        b"\x01\x2c\x08" + b'{"error":"invalid_grant","error_description":"gone"}',
        b"\x00\xcf\x06" + b"<html><title>Blocked</title></html>",
        b"\x01\x91\x0a" + b'{"error":"temporarily_unavailable"}',
    ]
    return Target(cases, check, from_bytes, seeds)


# -- discovery documents -------------------------------------------------------------------------


def _discovery_target() -> Target:
    from tokend.oauth._discovery import DiscoveryError, token_endpoint_from_metadata

    endpoints = st.text(max_size=60) | st.sampled_from(
        [
            "https://idp.example/token",
            "http://idp.example/token",
            "https://",
            "https://[::1/token",
            "https://user:pw@idp.example:99999/token",
            "javascript:alert(1)",
            "https://idp.example/\r\nX: y",
            "//idp.example/token",
        ]
    )
    documents = st.one_of(
        st.fixed_dictionaries({"token_endpoint": endpoints | st.integers() | st.none()}).map(
            lambda d: json.dumps(d).encode()
        ),
        st.binary(max_size=512),
        st.just(b"[" * 10000),
    )
    issuer_names = ["https://idp.example", "http://127.0.0.1:8080", "https://x/"]
    issuers = st.sampled_from(issuer_names)

    def check(value: tuple[bytes, str]) -> None:
        body, issuer = value
        try:
            endpoint = token_endpoint_from_metadata(body, issuer)
        except DiscoveryError as exc:
            assert len(str(exc)) < 1000
            return
        # Schemes are case-insensitive (urlsplit lowers them).
        assert endpoint.lower().startswith(("https://", "http://"))

    def from_bytes(data: bytes) -> tuple[bytes, str]:
        return data[1:], issuer_names[(data[0] if data else 0) % len(issuer_names)]

    seeds = [
        b"\x00"
        + json.dumps(
            {
                "issuer": "https://idp.example",
                "token_endpoint": "https://idp.example/token",
                "revocation_endpoint": "https://idp.example/revoke",
                "device_authorization_endpoint": "https://idp.example/device",
            }
        ).encode(),
        b'\x01{"token_endpoint": "http://127.0.0.1:8080/token"}',
    ]
    return Target(st.tuples(documents, issuers), check, from_bytes, seeds)


_BUILDERS = {
    "socket": _socket_target,
    "config": _config_target,
    "token": _token_target,
    "discovery": _discovery_target,
}


def _has_atheris() -> bool:
    import importlib.util

    return importlib.util.find_spec("atheris") is not None


def quiet() -> None:
    """Send tokend's log lines (connections dropped on purpose, say) nowhere."""
    from tokend import logs

    logs.configure(stream=open(os.devnull, "w"))  # noqa: SIM115 - for the process


def fuzz(name: str, cases: int, hang_after: float = 1.0) -> Tally:
    """Run ``name`` for ``cases`` hypothesis cases, in this process."""
    target = _BUILDERS[name]()
    tally = Tally(name)
    drive(tally, target.strategy, target.check, cases, hang_after)
    return tally


def _atheris_child(name: str, cases: int, hang_after: float) -> None:
    """In a child process: fuzz ``name`` with atheris, print one JSON line of counts
    when ``cases`` inputs have run (libFuzzer then exits the process)."""
    import atheris

    quiet()
    with atheris.instrument_imports(include=["tokend"]):
        target = _BUILDERS[name]()
    tally = Tally(name)
    corpus = Path(tempfile.mkdtemp(prefix=f"tokend-fuzz-{name}-"))
    for i, seed in enumerate(target.seeds):
        (corpus / f"seed{i}").write_bytes(seed)

    def one_input(data: bytes) -> None:
        tally.record(
            lambda: target.check(target.from_bytes(data)), hang_after, lambda: repr(data[:300])
        )
        if tally.cases == cases:
            report = {
                "target": name,
                "cases": tally.cases,
                "crashes": tally.crashes,
                "hangs": tally.hangs,
                "slowest": tally.slowest,
                "examples": tally.examples,
            }
            print("FUZZ-RESULT " + json.dumps(report), flush=True)

    # -timeout: libFuzzer's own watchdog, for a case that never returns at all.
    argv = [sys.argv[0], f"-runs={cases}", "-timeout=30", "-max_len=4096", str(corpus)]
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


def fuzz_atheris(name: str, cases: int, hang_after: float) -> Tally:
    """Run ``name`` under atheris in a child process; a child that dies without its
    counts (libFuzzer's watchdog killed a case that never returned) counts as a hang."""
    import subprocess

    command = [
        sys.executable,
        "-m",
        "bench.fuzz",
        "--child",
        name,
        "--cases",
        str(cases),
        "--hang-after",
        str(hang_after),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    tally = Tally(name)
    for line in result.stdout.splitlines():
        if line.startswith("FUZZ-RESULT "):
            report = json.loads(line.removeprefix("FUZZ-RESULT "))
            tally.cases, tally.crashes, tally.hangs = (
                report["cases"],
                report["crashes"],
                report["hangs"],
            )
            tally.slowest = report["slowest"]
            tally.examples = report["examples"]
            return tally
    tally.hangs = 1
    tally.examples = [f"the fuzzing process ended without a result:\n{result.stderr[-3000:]}"]
    return tally


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench fuzz", description=__doc__)
    parser.add_argument("--cases", type=int, default=100_000, help="cases per target")
    parser.add_argument("--only", nargs="+", choices=TARGETS, metavar="TARGET")
    parser.add_argument("--hang-after", type=float, default=1.0, metavar="SECONDS")
    parser.add_argument("--engine", choices=("atheris", "hypothesis"), default=None)
    parser.add_argument("--child", choices=TARGETS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _atheris_child(args.child, args.cases, args.hang_after)
        return 0
    engine = args.engine or ("atheris" if _has_atheris() else "hypothesis")
    print(f"engine: {engine}, {args.cases} cases per target", file=sys.stderr)
    quiet()
    print("| target | cases | crashes | hangs | slowest case | time |")
    print("|---|---|---|---|---|---|")
    failed = False
    for name in args.only or TARGETS:
        started = time.monotonic()
        if engine == "atheris":
            tally = fuzz_atheris(name, args.cases, args.hang_after)
        else:
            tally = fuzz(name, args.cases, args.hang_after)
        elapsed = time.monotonic() - started
        print(
            f"| {name} | {tally.cases} | {tally.crashes} | {tally.hangs} | "
            f"{tally.slowest * 1e3:.1f} ms | {elapsed:.0f} s |",
            flush=True,
        )
        for example in tally.examples:
            print(example, file=sys.stderr)
        failed = failed or bool(tally.crashes or tally.hangs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
