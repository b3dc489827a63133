"""Token files on a real filesystem: atomic versions seen by a reader in another
process, modes and ownership, templates, expiry, withdrawal and the restart skip."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from tokend.config import OutputConfig
from tokend.model import TokenSet
from tokend.publish import files as files_module
from tokend.publish.files import DATA, PLACEHOLDERS, Template, TokenFiles


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


NOW = 1_750_000_000.0


class FixedClock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now


def make_token(access: str = "tok-abcdefgh", expires_at: float = NOW + 3600, **kw: Any) -> TokenSet:
    fields: dict[str, Any] = {
        "token_type": "Bearer",
        "issued_at": NOW,
        "scope": "read write",
        **kw,
    }
    return TokenSet(access_token=access, expires_at=expires_at, **fields)


async def wait_for(predicate: Callable[[], Any], within: float = 15.0, what: str = "") -> Any:
    deadline = time.monotonic() + within
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what or predicate}")
        await anyio.sleep(0.01)


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def versions(account_dir: Path) -> list[str]:
    return sorted(
        p.name
        for p in account_dir.iterdir()
        if p.name.startswith("..") and p.is_dir() and not p.is_symlink()
    )


# -- a reader in another process --------------------------------------------------------

# Token i is "T<i>-<x * length(i)>-<i>E": a torn, empty or mixed read cannot match.
READER = r"""
import json, os, re, sys

account_dir, last, ready = sys.argv[1], int(sys.argv[2]), sys.argv[3]
pattern = re.compile(r"T(\d+)-(x*)-(\d+)E")

def index(text, where):
    m = pattern.fullmatch(text)
    if not m or m[1] != m[3] or len(m[2]) != (int(m[1]) * 37) % 500:
        sys.exit(f"{where}: bad content {text[:40]!r}... ({len(text)} chars)")
    return int(m[1])

def read(path):
    with open(path, "rb") as f:
        return f.read().decode()

stats = {"reads": 0, "missing": 0, "version_missing": 0, "seen": set()}
newest = -1
while True:
    stats["reads"] += 1
    try:
        token = read(os.path.join(account_dir, "token"))
        document = read(os.path.join(account_dir, "token.json"))
    except FileNotFoundError:
        stats["missing"] += 1
        continue
    i = index(token, "token")
    if i < newest:
        sys.exit(f"token went back from {newest} to {i}")
    newest = i
    try:
        j = index(json.loads(document)["access_token"], "token.json")
    except ValueError:
        sys.exit(f"token.json does not parse: {document[:60]!r}")
    # One version: resolve ..data once and read both files from it.
    version = os.path.realpath(os.path.join(account_dir, "..data"))
    try:
        token = read(os.path.join(version, "token"))
        document = read(os.path.join(version, "token.json"))
    except FileNotFoundError:
        stats["version_missing"] += 1
        continue
    k = index(token, "version token")
    if json.loads(document)["access_token"] != token:
        sys.exit(f"mixed version: token {k}, token.json {document[:40]!r}")
    stats["seen"].add(k)
    if len(stats["seen"]) == 1:
        open(ready, "w").close()
    if k == last:
        break
stats["seen"] = len(stats["seen"])
print(json.dumps(stats))
"""


def start_reader(account_dir: Path, last: int, ready: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", READER, str(account_dir), str(last), str(ready)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def numbered_token(i: int) -> TokenSet:
    return make_token(f"T{i}-{'x' * ((i * 37) % 500)}-{i}E", expires_at=NOW + 3600 + i)


@pytest.mark.anyio
async def test_reader_never_sees_empty_partial_or_mixed_files(tmp_path: Path) -> None:
    files = TokenFiles(tmp_path / "tokens")
    await files.publish("acct", numbered_token(0))
    ready = tmp_path / "reader-ready"
    last = 1000
    reader = start_reader(tmp_path / "tokens" / "acct", last, ready)
    try:
        await wait_for(ready.exists, what="the reader's first read")
        started = time.perf_counter()
        for i in range(1, last + 1):
            await files.publish("acct", numbered_token(i))
        elapsed = time.perf_counter() - started
        out, err = await anyio.to_thread.run_sync(lambda: reader.communicate(timeout=60))
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    assert reader.returncode == 0, err
    stats = json.loads(out)
    # The reader really raced the writer: it saw many versions go by.
    assert stats["seen"] > 20, stats
    # Current and previous versions only; every older one is gone.
    assert len(versions(tmp_path / "tokens" / "acct")) == 2
    print(f"\n1000 publishes in {elapsed:.2f}s; reader: {stats}")


# -- modes and ownership ------------------------------------------------------------------


@pytest.mark.anyio
async def test_default_modes_and_contents(tmp_path: Path) -> None:
    files = TokenFiles(tmp_path / "tokens", clock=FixedClock())
    await files.publish("acct", make_token())
    account_dir = tmp_path / "tokens" / "acct"
    for name in ("token", "token.json"):
        assert os.readlink(account_dir / name) == f"{DATA}/{name}"
        assert stat.S_IMODE(os.stat(account_dir / name).st_mode) == 0o640
    assert stat.S_IMODE(account_dir.stat().st_mode) == 0o750
    assert stat.S_IMODE((account_dir / DATA).stat().st_mode) == 0o750
    assert (account_dir / "token").read_text() == "tok-abcdefgh"
    assert json.loads((account_dir / "token.json").read_text()) == {
        "access_token": "tok-abcdefgh",
        "token_type": "Bearer",
        "expires_at": int(NOW + 3600),
        "expires_in": 3600,
        "scope": "read write",
        "version": int(NOW * 1_000_000),
    }
    assert (account_dir / "..version").read_text() == f"{int(NOW * 1_000_000)}\n"


@pytest.mark.anyio
async def test_configured_modes_owner_and_group_set_before_any_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown to another user needs root")
    seen: list[tuple[int, int, int]] = []
    original = files_module._write_all

    def spy(fd: int, data: bytes) -> None:
        # The file as it is when its first byte is about to be written.
        st_ = os.fstat(fd)
        seen.append((stat.S_IMODE(st_.st_mode), st_.st_uid, st_.st_gid))
        original(fd, data)

    monkeypatch.setattr(files_module, "_write_all", spy)
    old_umask = os.umask(0)  # the widest umask: the mode must not depend on it
    try:
        files = TokenFiles(
            tmp_path / "tokens",
            0o600,
            owner=65534,
            group="65534",
            outputs={
                "acct": [
                    OutputConfig(file="env", template="TOKEN={access_token}\n"),
                    OutputConfig(file="header", template="Bearer {access_token}", mode=0o644),
                ]
            },
            clock=FixedClock(),
        )
        await files.publish("acct", make_token())
    finally:
        os.umask(old_umask)
    # token, token.json, env and ..version; header has a mode of its own.
    assert sorted(seen) == sorted([(0o600, 65534, 65534)] * 4 + [(0o644, 65534, 65534)])
    account_dir = tmp_path / "tokens" / "acct"
    expected = {"token": 0o600, "token.json": 0o600, "env": 0o600, "header": 0o644}
    for name, mode in expected.items():
        st_ = os.stat(account_dir / name)
        assert (stat.S_IMODE(st_.st_mode), st_.st_uid, st_.st_gid) == (mode, 65534, 65534), name
    # An output readable by others makes its directories traversable by others.
    for directory in (account_dir, account_dir / DATA, tmp_path / "tokens"):
        st_ = os.stat(directory)
        assert (stat.S_IMODE(st_.st_mode), st_.st_uid, st_.st_gid) == (0o755, 65534, 65534)
    # Nothing under the account is wider than its configured mode.
    for path in account_dir.rglob("*"):
        if not path.is_symlink() and path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) & ~0o644 == 0


def test_owner_and_group_by_name_and_unknown_names(tmp_path: Path) -> None:
    files = TokenFiles(tmp_path, owner="nobody", group="nogroup")
    assert (files.uid, files.gid) == (65534, 65534)
    with pytest.raises(ValueError, match=r"serve.token_file_owner: unknown user 'no-such-user'"):
        TokenFiles(tmp_path, owner="no-such-user")
    with pytest.raises(ValueError, match=r"serve.token_file_group: unknown group 'no-such-grp'"):
        TokenFiles(tmp_path, group="no-such-grp")


# -- templates ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_templates_render(tmp_path: Path) -> None:
    files = TokenFiles(
        tmp_path,
        outputs={
            "acct": [
                OutputConfig(file="header", template="Authorization: Bearer {access_token}"),
                OutputConfig(
                    file="env",
                    template="TOKEN={access_token}\nTYPE={token_type}\nAT={expires_at}\n"
                    "IN={expires_in}\nSCOPE={scope}\nACCOUNT={account}\n{{literal}}\n",
                ),
            ]
        },
        clock=FixedClock(),
    )
    await files.publish("acct", make_token(expires_at=NOW + 100))
    await files.publish("other", make_token("tok-other-1"))
    assert (tmp_path / "acct" / "header").read_text() == "Authorization: Bearer tok-abcdefgh"
    assert (tmp_path / "acct" / "env").read_text() == (
        f"TOKEN=tok-abcdefgh\nTYPE=Bearer\nAT={int(NOW + 100)}\nIN=100\n"
        "SCOPE=read write\nACCOUNT=acct\n{literal}\n"
    )
    assert not (tmp_path / "other" / "header").exists()


@pytest.mark.parametrize(
    "template",
    [
        "{access_token.__class__}",
        "{access_token.__class__.__mro__}",
        "{access_token[0]}",
        "{0}",
        "{}",
        "{secret}",
        "{access_token!r}",
        "{expires_at:>20}",
        "{expires_at:{access_token}}",
        "Bearer {access_token",
        "Bearer }",
    ],
)
def test_malicious_or_broken_templates_are_rejected(tmp_path: Path, template: str) -> None:
    # The config rejects it (so `tokend check` reports it with its line)...
    with pytest.raises(ValueError) as at_config:
        OutputConfig(file="header", template=template)
    # ...and the publisher refuses it too, should an unchecked one reach it.
    unchecked = OutputConfig.model_construct(file="header", template=template, mode=None)
    with pytest.raises(ValueError, match=r"account 'acct', output 'header': ") as caught:
        TokenFiles(tmp_path, outputs={"acct": [unchecked]})
    if template == "{access_token.__class__}":
        assert "{access_token.__class__} is not allowed" in str(caught.value)
        assert "{access_token.__class__} is not allowed" in str(at_config.value)


@pytest.mark.parametrize("name", ["..data", "..x", "token", "token.json"])
def test_reserved_output_names_are_rejected(tmp_path: Path, name: str) -> None:
    output = OutputConfig.model_construct(file=name, template="{access_token}", mode=None)
    with pytest.raises(ValueError, match="reserved"):
        TokenFiles(tmp_path, outputs={"acct": [output]})


_literal = st.text(st.characters(blacklist_characters="{}", blacklist_categories=["Cs"]))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_literal, st.sampled_from(PLACEHOLDERS))), _literal)
def test_templates_render_like_format_for_allowed_names(
    pieces: list[tuple[str, str]], tail: str
) -> None:
    text = "".join(f"{lit}{{{name}}}" for lit, name in pieces) + tail
    values = {name: f"<{name}>" for name in PLACEHOLDERS}
    assert Template(text).render(values) == text.format_map(values)


# -- expiry, withdrawal ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_expire_hides_the_token_and_a_new_publish_restores_it(tmp_path: Path) -> None:
    clock = FixedClock()
    outputs = {"acct": [OutputConfig(file="header", template="Bearer {access_token}")]}
    files = TokenFiles(tmp_path, outputs=outputs, clock=clock)
    account_dir = tmp_path / "acct"
    expires_at = NOW + 60
    await files.publish("acct", make_token(expires_at=expires_at))

    assert await files.expire("acct", now=expires_at - 1) is False  # still valid
    assert (account_dir / "token").read_text() == "tok-abcdefgh"

    assert await files.expire("acct", now=expires_at + 1) is True
    for name in ("token", "header"):
        assert (account_dir / name).is_symlink()  # dangling: opening it fails
        with pytest.raises(FileNotFoundError):
            (account_dir / name).read_bytes()
    assert json.loads((account_dir / "token.json").read_text()) == {
        "access_token": None,
        "token_type": "Bearer",
        "expires_at": int(expires_at),
        "expires_in": 0,
        "scope": "read write",
        "version": int(NOW * 1_000_000) + 1,
        "expired": True,
    }
    assert (account_dir / "..version").read_text() == f"{int(NOW * 1_000_000) + 1}\n"
    assert await files.expire("acct", now=expires_at + 2) is False  # already expired

    await files.publish("acct", make_token("tok-new-12345", expires_at=NOW + 7200))
    assert (account_dir / "token").read_text() == "tok-new-12345"
    assert (account_dir / "header").read_text() == "Bearer tok-new-12345"
    assert json.loads((account_dir / "token.json").read_text())["access_token"] == "tok-new-12345"
    # A timer that fired for the old token does not hide the new one.
    assert await files.expire("acct", now=expires_at + 3) is False
    assert (account_dir / "token").read_text() == "tok-new-12345"

    # Files left by an earlier process: expire() looks at them on disk.
    later = TokenFiles(tmp_path, outputs=outputs, clock=clock)
    assert await later.expire("acct", now=NOW + 7200 - 1) is False
    assert await later.expire("acct", now=NOW + 7201) is True
    assert json.loads((account_dir / "token.json").read_text())["expired"] is True
    assert await later.expire("never-published") is False
    assert not (tmp_path / "never-published").exists()


@pytest.mark.anyio
async def test_withdraw_removes_the_account(tmp_path: Path) -> None:
    files = TokenFiles(tmp_path)
    await files.publish("acct", make_token())
    await files.publish("keep", make_token("tok-keep-1234"))
    await files.withdraw("acct")
    assert listing(tmp_path) == ["keep"]
    await files.withdraw("acct")  # gone already: fine
    # Publishing again after a withdrawal writes the files again.
    await files.publish("acct", make_token())
    assert (tmp_path / "acct" / "token").read_text() == "tok-abcdefgh"


# -- skipping what is already on disk -------------------------------------------------------


@pytest.mark.anyio
async def test_unchanged_token_is_not_rewritten_even_after_a_restart(tmp_path: Path) -> None:
    files = TokenFiles(tmp_path, clock=FixedClock())
    token = make_token()
    await files.publish("acct", token)
    first = os.readlink(tmp_path / "acct" / DATA)
    await files.publish("acct", token)
    assert os.readlink(tmp_path / "acct" / DATA) == first

    restarted = TokenFiles(tmp_path, clock=FixedClock(NOW + 5))
    await restarted.publish("acct", token)
    assert os.readlink(tmp_path / "acct" / DATA) == first

    # Files damaged by hand while tokend was down are repaired by the same token.
    (tmp_path / "acct" / "token").unlink()
    repairing = TokenFiles(tmp_path, clock=FixedClock(NOW + 5))
    await repairing.publish("acct", token)
    assert (tmp_path / "acct" / "token").read_text() == "tok-abcdefgh"
    assert os.readlink(tmp_path / "acct" / DATA) == first
    await restarted.publish("acct", make_token("tok-changed-1"))
    assert os.readlink(tmp_path / "acct" / DATA) != first

    # Another mode is another set of files: rewritten.
    current = os.readlink(tmp_path / "acct" / DATA)
    stricter = TokenFiles(tmp_path, 0o600, clock=FixedClock())
    await stricter.publish("acct", make_token("tok-changed-1"))
    assert os.readlink(tmp_path / "acct" / DATA) != current
    assert stat.S_IMODE(os.stat(tmp_path / "acct" / "token").st_mode) == 0o600


@pytest.mark.anyio
async def test_old_layout_and_dropped_outputs_are_cleaned_up(tmp_path: Path) -> None:
    account_dir = tmp_path / "acct"
    account_dir.mkdir()
    (account_dir / "token").write_text("old")
    (account_dir / "token.json").write_text('{"access_token": "old"}')
    with_header = TokenFiles(
        tmp_path, outputs={"acct": [OutputConfig(file="header", template="{access_token}")]}
    )
    await with_header.publish("acct", make_token())
    assert (account_dir / "token").is_symlink()
    assert (account_dir / "token").read_text() == "tok-abcdefgh"
    assert (account_dir / "header").read_text() == "tok-abcdefgh"

    without = TokenFiles(tmp_path)
    await without.publish("acct", make_token("tok-second-1"))
    assert "header" not in listing(account_dir)
    assert (account_dir / "token").read_text() == "tok-second-1"


@pytest.mark.anyio
async def test_a_failing_account_is_logged_and_does_not_raise(tmp_path: Path) -> None:
    (tmp_path / "blocked").write_text("a file where the account directory should be")
    files = TokenFiles(tmp_path)
    with structlog.testing.capture_logs() as logs:
        await files.publish("blocked", make_token("tok-secret-value"))
        await files.publish("fine", make_token())
    failures = [e for e in logs if e["event"] == "token_file_write_failed"]
    assert [e["account"] for e in failures] == ["blocked"]
    assert "tok-secret-value" not in repr(logs)
    assert (tmp_path / "fine" / "token").read_text() == "tok-abcdefgh"
