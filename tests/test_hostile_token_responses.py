"""Token endpoint answers that are well-formed HTTP but hostile or absurd: every field
is bounded and checked, an unusable answer is a classified failure, and tokend keeps
serving. Unit tests of the parser, then real answers through the test IdP's fault
switch to a tokend subprocess."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.idp_harness import IdP
from tests.test_socket_api import (
    RawClient,
    add_account,
    short_dir,
    socket_config,
    start,
    wait_for_token,
)
from tokend.oauth import FailureKind, TokenFailure, TokenResponse
from tokend.oauth._discovery import DiscoveryError, token_endpoint_from_metadata
from tokend.oauth._parse import (
    MAX_EXPIRES_IN_SECONDS,
    MAX_TOKEN_CHARS,
    classify_response,
)
from tokend.policy import is_lost_response

NOW = 1_700_000_000.0
JSON = {"Content-Type": "application/json"}
YEAR = 365 * 24 * 3600
HEADER_TEMPLATE = "Authorization: {token_type} {access_token}\n"

__all__ = ["short_dir"]  # the fixture, imported to be used here


def classify(body: object = None, *, raw: bytes | None = None) -> TokenResponse | TokenFailure:
    content = raw if raw is not None else json.dumps(body).encode()
    return classify_response(200, JSON, content, now=NOW)


def unusable(outcome: TokenResponse | TokenFailure) -> TokenFailure:
    assert isinstance(outcome, TokenFailure), outcome
    # Transient with the 2xx status: the policy treats it as a possibly lost rotation.
    assert (outcome.kind, outcome.reason, outcome.status) == (
        FailureKind.TRANSIENT,
        "invalid_token_response",
        200,
    )
    assert outcome.description
    return outcome


# -- the parser ------------------------------------------------------------------------------


@pytest.mark.parametrize("expires_in", [1e12, 10**15, "99999999999", 2 * YEAR])
def test_expires_in_beyond_a_year_is_a_year_and_said_so(expires_in: object) -> None:
    outcome = classify({"access_token": "at", "expires_in": expires_in})
    assert isinstance(outcome, TokenResponse)
    assert outcome.expires_in == MAX_EXPIRES_IN_SECONDS == YEAR
    assert len(outcome.notes) == 1 and "one year" in outcome.notes[0]


@pytest.mark.parametrize(
    "raw_expires_in", [b"-5", b"0", b"NaN", b"-Infinity", b"Infinity", b"1e400", b'"soon"', b"[]"]
)
def test_unreadable_expires_in_is_missing_and_said_so(raw_expires_in: bytes) -> None:
    outcome = classify(raw=b'{"access_token": "at", "expires_in": ' + raw_expires_in + b"}")
    assert isinstance(outcome, TokenResponse)
    assert outcome.expires_in is None
    assert len(outcome.notes) == 1 and "default_lifetime" in outcome.notes[0]


def test_a_plain_answer_has_no_notes() -> None:
    outcome = classify({"access_token": "at", "expires_in": 3600, "scope": "a b"})
    assert isinstance(outcome, TokenResponse) and outcome.notes == ()


@pytest.mark.parametrize(
    "token_type",
    ["Bearer\r\nX-Injected: 1", "Bearer\n", "Bea\x00rer", "Bearer x", "Bearer\u2028", "x" * 65],
)
def test_token_type_that_cannot_go_into_a_header_is_refused(token_type: str) -> None:
    failure = unusable(classify({"access_token": "at", "token_type": token_type}))
    assert failure.description is not None and "token_type" in failure.description
    assert "\n" not in failure.summary() and "Injected" not in failure.summary()


@pytest.mark.parametrize(
    "scope",
    ["read\r\nwrite", "read\twrite", "read\x1b[31m", 'read "write"', "read  write", "a" * 5000],
)
def test_scope_with_control_characters_is_refused(scope: str) -> None:
    failure = unusable(classify({"access_token": "at", "scope": scope}))
    assert failure.description is not None and "scope" in failure.description


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("access_token", "at\r\nX-Injected: 1"),
        ("access_token", "a b"),
        ("access_token", "t\u00f6ken"),
        ("access_token", "a" * (MAX_TOKEN_CHARS + 1)),
        ("refresh_token", "rt\n"),
        ("refresh_token", "r" * (MAX_TOKEN_CHARS + 1)),
    ],
)
def test_tokens_that_are_not_visible_ascii_or_too_long_are_refused(field: str, value: str) -> None:
    body = {"access_token": "at", field: value}
    failure = unusable(classify(body))
    assert failure.description is not None and field in failure.description
    # The offending value is never quoted back.
    assert value[:20] not in failure.summary()


def test_a_refused_answer_keeps_a_usable_rotated_refresh_token_out_of_sight() -> None:
    failure = unusable(classify({"access_token": "at\n", "refresh_token": "rt-new-1234"}))
    assert failure.rotated_refresh_token == "rt-new-1234"
    assert "rt-new-1234" not in repr(failure) and "rt-new-1234" not in failure.summary()
    assert not is_lost_response(failure)
    # A refresh token that cannot be used either: nothing to keep, and the answer counts
    # as lost (the IdP may have rotated to a token tokend never saw).
    both_bad = unusable(classify({"access_token": "at\n", "refresh_token": "rt\n"}))
    assert both_bad.rotated_refresh_token is None and is_lost_response(both_bad)
    no_refresh = unusable(classify({"access_token": "at", "scope": "a\tb"}))
    assert no_refresh.rotated_refresh_token is None and is_lost_response(no_refresh)


def test_the_longest_token_allowed_is_kept_whole() -> None:
    long_token = "a" * MAX_TOKEN_CHARS
    outcome = classify({"access_token": long_token, "refresh_token": long_token})
    assert isinstance(outcome, TokenResponse)
    assert outcome.access_token == long_token and outcome.refresh_token == long_token


# -- real answers through the IdP ----------------------------------------------------------------


def outputs_are_clean(workdir: Path) -> None:
    for path in (workdir / "tokens").rglob("*"):
        if path.is_file():
            text = path.read_bytes()
            assert b"Injected" not in text, path
            if path.name == "auth-header":
                assert text.count(b"\n") == 1 and b"\r" not in text


def test_hostile_answers_from_the_idp_are_refused_or_bounded(
    fresh_idp: IdP, tokend_factory: Any, short_dir: Path
) -> None:
    fresh_idp.configure(access_token_ttl=60)
    sock = short_dir / "tokend.sock"
    config = socket_config(fresh_idp, sock, force_refresh_interval=0)
    add_account(
        config,
        fresh_idp,
        "alice",
        outputs=[
            {"file": "auth-header", "template": "Authorization: {token_type} {access_token}\n"}
        ],
    )
    tokend = start(tokend_factory(config), sock)
    wait_for_token(sock, "alice")
    client = RawClient(sock)

    # Refused answers: each one a classified failure, then the next refresh works.
    # These never reach the provider, so the refresh token it knows is unchanged.
    refused: list[tuple[dict[str, Any], str]] = [
        ({"body": {"access_token": "at-x", "token_type": "Bearer\r\nX-Injected: 1"}}, "token_type"),
        ({"body": {"access_token": "at-x", "scope": "read\r\nX-Injected: 1"}}, "scope"),
        ({"body": {"access_token": "at-x\r\nX-Injected: 1"}}, "access_token"),
        ({"body": {"access_token": "a" * (MAX_TOKEN_CHARS + 10)}}, "access_token"),
        ({"raw": '{"access_token": "' + "a" * 300_000 + '"}'}, "response_too_large"),
        ({"raw": "[" * 100_000}, "invalid_json"),
    ]
    for count, (fault, what) in enumerate(refused, start=1):
        fresh_idp.fault("respond_with", count=1, **fault)
        answer = client.request("POST", "/v1/tokens/alice/refresh")
        assert answer.status == 503, answer
        assert answer.json()["error"] == "refresh_failed"
        assert what in answer.json()["last_error"], answer.json()
        assert b"Injected" not in answer.body
        failed = tokend.wait_event("refresh", account="alice", outcome="transient", count=count)
        assert "Injected" not in json.dumps(failed[-1])
        outputs_are_clean(tokend.workdir)
        assert client.request("POST", "/v1/tokens/alice/refresh").status == 200

    # expires_in of 1e12 on a real, rotating answer: the token is kept for one year,
    # the adjustment is logged, and tokend goes on serving (it used to crash here).
    fresh_idp.fault("override", count=1, fields={"expires_in": 1e12})
    assert client.request("POST", "/v1/tokens/alice/refresh").status == 200
    adjusted = tokend.wait_event("token_response_adjusted", provider="idp")
    assert "one year" in adjusted[0]["notes"][0]
    saved = tokend.token_json("alice")
    assert saved is not None
    assert abs(saved["expires_at"] - time.time() - YEAR) < 120
    # NaN on a real answer: the provider's default lifetime applies.
    fresh_idp.fault("override", count=1, raw_fields={"expires_in": "NaN"})
    assert client.request("POST", "/v1/tokens/alice/refresh").status == 200
    tokend.wait_event("token_response_adjusted", provider="idp", count=2)
    assert client.request("POST", "/v1/tokens/alice/refresh").status == 200
    client.close()
    assert tokend.proc is not None and tokend.proc.poll() is None
    assert tokend.stop() == 0
    assert tokend.events("_non_json") == []
    assert tokend.events("request_failed") == []


def test_a_refused_answer_that_rotated_keeps_its_refresh_token(
    fresh_idp: IdP, tokend_factory: Any, short_dir: Path
) -> None:
    """A 2xx whose access token (or type, or scope) cannot be used, but whose rotated
    refresh token can: the IdP has already spent the old one, so tokend saves the new
    one and goes on with it. With no reuse grace, sending the old one again would be a
    reuse the IdP punishes by revoking the grant."""
    fresh_idp.configure(access_token_ttl=60, reuse_grace_seconds=0)
    sock = short_dir / "tokend.sock"
    config = socket_config(fresh_idp, sock, force_refresh_interval=0)
    add_account(config, fresh_idp, "alice")
    tokend = start(tokend_factory(config), sock)
    wait_for_token(sock, "alice")
    client = RawClient(sock)
    bad_fields: list[dict[str, Any]] = [
        {"access_token": "at-x\r\nX-Injected: 1"},
        {"token_type": "Bearer\r\nX-Injected: 1"},
        {"scope": "read\twrite"},
    ]
    for count, fields in enumerate(bad_fields, start=1):
        fresh_idp.clear_log()
        # "override": oidc-provider handles the request (rotating the refresh token),
        # then the answer's fields are replaced.
        fresh_idp.fault("override", count=1, fields=fields)
        answer = client.request("POST", "/v1/tokens/alice/refresh")
        assert answer.status == 503, answer
        assert "refresh token was kept" in answer.json()["last_error"], answer.json()
        tokend.wait_event("refresh", account="alice", outcome="transient", count=count)
        # The next refresh presents the rotated token, and the IdP accepts it.
        assert client.request("POST", "/v1/tokens/alice/refresh").status == 200
        sent = [entry for entry in fresh_idp.log() if entry["grant_type"] == "refresh_token"]
        assert [entry["status"] for entry in sent] == [200, 200], sent
        assert sent[0]["refresh_token_sha256"] != sent[1]["refresh_token_sha256"]
        assert not any(entry["grace_reuse"] or entry["error"] for entry in sent)
    accounts = client.request("GET", "/v1/accounts").json()["accounts"]
    assert [(each["name"], each["state"]) for each in accounts] == [("alice", "valid")]
    client.close()
    assert tokend.stop() == 0
    outputs_are_clean(tokend.workdir)


@pytest.mark.parametrize(
    "endpoint",
    [
        "https://[::1/token",
        "https://idp.example:99999/token",
        "https://idp.example:port/token",
        "https://idp.example/token\r\nX-Injected: 1",
        "https://idp.example/\ttoken",
        "https:///token",
    ],
)
def test_discovery_documents_with_broken_token_endpoints_are_refused(endpoint: str) -> None:
    body = json.dumps({"token_endpoint": endpoint}).encode()
    with pytest.raises(DiscoveryError) as info:
        token_endpoint_from_metadata(body, "https://idp.example")
    assert "unusable token_endpoint" in str(info.value)
    assert "\n" not in str(info.value)
