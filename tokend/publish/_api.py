"""The HTTP API's routes.

On the unix socket::

    GET  /v1/tokens/{account}[?min_valid=N]
        200 {"access_token", "token_type", "expires_at", "expires_in", "scope",
        "version"} (expires_at unix seconds; expires_in whole seconds left; version
        an integer that grows with every new token of the account), or the raw token
        with "Accept: text/plain" (its version in a Token-Version header). Without
        min_valid the answer is immediate: the token, or 503 if tokend holds no valid
        one. With min_valid (seconds, 0 or more) and no token valid that much longer,
        tokend refreshes (rate limited, see Api) and waits up to
        serve.request_wait_max; 503 if it still has none.
    GET  /v1/tokens/{account}?after=VERSION[&wait=30s]
        A long-poll: answered (as above) as soon as tokend holds a valid token whose
        version is not VERSION, normally the next one; else when the wait ends
        (default 30 s, at most 300 s) with the current token, or 503 if none is valid.
        An expiry does not end the wait: it goes on until a new token comes.
    GET  /v1/events[?account=NAME[&token=1]]
        Server-sent events (text/event-stream): first one event per account (or for
        NAME) with its current version, then one per change: "token" (a new token),
        "expired" (it expired and nothing replaced it yet), "removed" (the account
        left the config). Data: {"account", "version", "expires_at", "state",
        "token_valid"}; with token=1 (one account, which the peer may read) also
        "access_token", "token_type", "expires_in", "scope". A comment line every
        15 s; the stream ends after an hour (clients reconnect; "retry: 1000").
        Long-polls and streams count against serve.max_waiters: beyond it, 503
        {"error": "too_many_waiters"} with Retry-After.
    POST /v1/tokens/{account}/refresh
        The application got a 401 before expiry: refresh now. 200 with the new token
        (as above), 503 {"error": "refresh_failed", ...} if none came, 429 with
        Retry-After within serve.force_refresh_interval of the last refresh an
        application caused (the token tokend holds is then likely the new one).
    GET  /v1/accounts
        200 {"accounts": [{"name", "provider", "state", "required", "token_valid",
        "expires_at", "version", "last_refresh_at", "next_refresh_at", "last_error",
        "publish_error", "reauth_deadline", "reauth_warning"}]}, sorted by name; never
        a token. publish_error: why the account's token files do not show its current
        token (null when they do). reauth_deadline (unix seconds, null when unknown):
        when the account's refresh token stops working however often it is refreshed
        (its provider's refresh_token_max_age, an expiry the IdP reported that
        refreshes do not move, and while it cannot be refreshed, its idle limit);
        reauth_warning: true once that is within the provider's reauth_warning.
        With replicas sharing accounts (state.backend etcd) also "owner" (the id of
        the replica that refreshes the account, null while none does) and
        "owned_here" (whether that is this replica).
    PUT  /v1/accounts/{account}/seed    body {"refresh_token": "..."}
        A new seed from a sign-in (``tokend login``), accepted only from the daemon's
        own uid or root (SO_PEERCRED). Written to the account's seed file when it has
        one, committed as a new chain (needs_reauth clears), then refreshed (bounded
        wait): 200 with the account as in /v1/accounts, never the token; 403
        {"error": "forbidden"}, 400 (not JSON, no refresh_token, a client_credentials
        account), 503 {"error": "store_unavailable"} when it could not be committed.
    POST /v1/accounts/{account}/revoke
        ``tokend revoke`` while the daemon runs, from the same peers as a seed: the
        refresh token (then the access token) is revoked at the provider (RFC 7009),
        the record keeps neither, and the account is needs_reauth. 200 with the account
        as in /v1/accounts plus "message"; 502 {"error": "revoke_failed", "detail"}
        when the provider did not revoke (nothing changed); 503 "store_unavailable".
    GET  /healthz   200 while the process and its event loop answer.
    GET  /readyz    200 {"ready": true}, or 503 {"ready": false, "not_ready": [...]}
                    while a required account holds no valid token or its token
                    files cannot be written (then also "publish_errors": {name: why}).
    GET  /metrics   the Prometheus exposition (gzip if Accept-Encoding allows it).

Errors are JSON: 404 {"error": "unknown_account"} or {"error": "not_found"}, 403
{"error": "forbidden"} (the account's allow: list names neither the peer's uid nor
its gid), 503 {"error": "token_unavailable", "state", "last_error"}, 400
{"error": "bad_request", "detail"}, 405 with Allow. The connection layer adds 408,
413, 431 and 503 {"error": "overloaded"} (see _http). A token that is not valid is
never handed out, and no error body ever carries a token.

The TCP port serves /healthz, /readyz and /metrics only.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import anyio
import orjson

from tokend.config import ServeConfig
from tokend.model import AccountState, TokenSet
from tokend.policy import reauth_warning
from tokend.publish._base import ReportingPublisher
from tokend.publish._feed import EventStream, LongPoll, TokenFeed
from tokend.publish._http import (
    TEXT_TYPE,
    Reply,
    Request,
    encode_response,
    error_response,
    json_response,
)
from tokend.publish._peercred import PeerCred
from tokend.store import SharedStore

if TYPE_CHECKING:
    from tokend.engine import Account, Engine
    from tokend.publish.metrics import Metrics

_VALID = AccountState.VALID
_TOKENS_PREFIX = b"/v1/tokens/"
_REFRESH_SUFFIX = b"/refresh"
_ACCOUNTS_PREFIX = b"/v1/accounts/"
_SEED_SUFFIX = b"/seed"
_REVOKE_SUFFIX = b"/revoke"
_SECONDS = re.compile(rb"[0-9]{1,9}(?:\.[0-9]{1,6})?")
_VERSION = re.compile(rb"[0-9]{1,19}")
_WAIT = re.compile(rb"([0-9]{1,9}(?:\.[0-9]{1,6})?)s?")
_DEFAULT_WAIT = 30.0
_MAX_WAIT = 300.0
_EVENTS_PATH = b"/v1/events"
_EVENTS_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
    b"Cache-Control: no-store\r\nConnection: close\r\n\r\n"
)

# Accounts whose publish error /readyz spells out (/v1/accounts has them all).
_MAX_PUBLISH_ERRORS_SHOWN = 100

_NOT_FOUND = error_response(404, "not_found")
_UNKNOWN_ACCOUNT = error_response(404, "unknown_account")
_FORBIDDEN = error_response(403, "forbidden")
_HEALTHY = json_response(200, {"status": "ok"})
_READY = json_response(200, {"ready": True})
_ALLOW_GET = b"Allow: GET\r\n"
_ALLOW_POST = b"Allow: POST\r\n"
_GET_ONLY = json_response(405, {"error": "method_not_allowed"}, _ALLOW_GET)
_POST_ONLY = json_response(405, {"error": "method_not_allowed"}, _ALLOW_POST)
_PUT_ONLY = json_response(405, {"error": "method_not_allowed"}, b"Allow: PUT\r\n")


@dataclass(slots=True)
class _Gate:
    """The last refresh an application caused for one account."""

    started: float  # monotonic seconds
    # Set while that refresh is awaited; later requests join it instead of adding one.
    done: anyio.Event | None


# What a request asks for, decided from the request alone (method, path, query,
# Accept) once per distinct request head and kept in ``Request.memo``.
_TOKEN, _REFRESH, _ACCOUNTS, _HEALTHZ, _READYZ, _METRICS, _FIXED, _SEED, _EVENTS, _REVOKE = range(
    10
)
# /v1/accounts/{account}/...: suffix -> (kind, route name, method, answer to another).
_ACCOUNT_ACTIONS = {
    _SEED_SUFFIX: (_SEED, "seed", b"PUT", _PUT_ONLY),
    _REVOKE_SUFFIX: (_REVOKE, "revoke", b"POST", _POST_ONLY),
}


@dataclass(frozen=True, slots=True)
class _Plan:
    kind: int
    route: str  # the route name requests are counted under
    account: str = ""
    min_valid: float | None = None
    as_text: bool = False
    # A long-poll: the version the client holds, and how long it waits (seconds).
    after: int | None = None
    wait: float = _DEFAULT_WAIT
    # An event stream: one account (``account``) or all; with the token itself.
    with_token: bool = False
    # _FIXED: the answer does not depend on any state.
    status: int = 0
    response: bytes = b""


def _fixed(route: str, status: int, response: bytes) -> _Plan:
    return _Plan(_FIXED, route, status=status, response=response)


def _no_count(route: str, status: int) -> None:
    pass


class Api:
    """Answers requests from the engine's in-memory view.

    Requests an application makes can cause refreshes (``?min_valid`` and
    ``POST .../refresh``). Per account, at most one such refresh starts per
    ``serve.force_refresh_interval``; requests arriving while it is in flight wait for
    it. Within the interval a forced refresh is answered 429 with Retry-After, and a
    ``min_valid`` the current token cannot meet is answered 503: a client asking for
    more than the IdP's token lifetime, in a loop, must not turn into one IdP request
    (and one refresh-token rotation) per call.
    """

    def __init__(
        self,
        engine: Engine,
        serve: ServeConfig,
        metrics: Metrics,
        *,
        tokens: bool,
        feed: TokenFeed | None = None,
    ) -> None:
        self._engine = engine
        self._feed = feed
        self._now = engine.clock.time
        self._monotonic = engine.clock.monotonic
        self._metrics = metrics
        self._tokens = tokens
        self._wait_max = serve.request_wait_max
        self._force_interval = serve.force_refresh_interval
        # Only the socket API is counted; the TCP port serves scrapes and probes.
        self._count: Callable[[str, int], None] = metrics.socket_request if tokens else _no_count
        self._gates: dict[str, _Gate] = {}
        # The last token response per account, reused while the same token would be
        # encoded to the same bytes (JSON: same whole seconds left); see _token_reply.
        self._json_cache: dict[str, tuple[TokenSet, int, bytes]] = {}
        self._text_cache: dict[str, tuple[TokenSet, bytes]] = {}

    def count_protocol_error(self, status: int) -> None:
        """Counts answers the connection layer gives without a route (400, 408, ...)."""
        self._count("other", status)

    def _reply(self, route: str, status: int, response: bytes) -> bytes:
        self._count(route, status)
        return response

    def handle(self, request: Request, peer: PeerCred | None, body: bytes = b"") -> Reply:
        plan = request.memo
        if not isinstance(plan, _Plan):
            plan = request.memo = self._plan(request)
        kind = plan.kind
        if kind == _TOKEN:
            return self._token(plan, peer)
        if kind == _FIXED:
            self._count(plan.route, plan.status)
            return plan.response
        if kind == _REFRESH:
            return self._refresh(plan, peer)
        if kind == _EVENTS:
            return self._events(plan, peer)
        if kind == _ACCOUNTS:
            return self._reply("accounts", 200, self._accounts())
        if kind == _SEED:
            return self._seed(plan.account, peer, body)
        if kind == _REVOKE:
            return self._revoke(plan.account, peer)
        if kind == _READYZ:
            return self._readyz()
        if kind == _METRICS:
            return self._render_metrics(request.accept_encoding)
        # Answering at all shows the process and its event loop are alive.
        return self._reply("healthz", 200, _HEALTHY)

    def _plan(self, request: Request) -> _Plan:
        path, method = request.path, request.method
        if self._tokens and path.startswith(_TOKENS_PREFIX):
            return _token_plan(request, path[len(_TOKENS_PREFIX) :])
        if self._tokens and path.startswith(_ACCOUNTS_PREFIX):
            for suffix, (kind, route, allowed, refusal) in _ACCOUNT_ACTIONS.items():
                if not path.endswith(suffix):
                    continue
                name = path[len(_ACCOUNTS_PREFIX) : -len(suffix)]
                if not name or b"/" in name:
                    return _fixed("other", 404, _NOT_FOUND)
                if method != allowed:
                    return _fixed(route, 405, refusal)
                return _Plan(kind, route, name.decode("ascii"))
        if self._tokens and path == _EVENTS_PATH:
            return _events_plan(request)
        routes = _TOKEN_ROUTES if self._tokens else _PROBE_ROUTES
        found = routes.get(path)
        if found is None:
            return _fixed("other", 404, _NOT_FOUND)
        kind, route = found
        if method != b"GET":
            return _fixed(route, 405, _GET_ONLY)
        return _Plan(kind, route)

    # -- tokens ---------------------------------------------------------------------------

    def _token(self, plan: _Plan, peer: PeerCred | None) -> Reply:
        name = plan.account
        account = self._engine.accounts.get(name)
        if account is None:
            return self._reply("token", 404, _UNKNOWN_ACCOUNT)
        if account.config.allow is not None and not _allowed(account, peer):
            return self._reply("token", 403, _FORBIDDEN)
        if plan.after is not None:
            return self._long_poll(plan)
        min_valid = plan.min_valid
        now = self._now()
        token = account.published
        if token is not None and token.expires_at - now > (min_valid or 0.0):
            self._count("token", 200)
            return self._token_reply(name, token, now, plan.as_text)
        if min_valid is None:
            # Without min_valid a request never waits, and never causes a refresh.
            return self._reply("token", 503, _unavailable(account))
        return self._token_after_refresh(name, min_valid, plan.as_text)

    def _long_poll(self, plan: _Plan) -> Reply:
        name, after = plan.account, plan.after

        def ready() -> bool:
            account = self._engine.accounts.get(name)
            token = account.published if account is not None else None
            return token is not None and token.version != after and token.is_valid(self._now())

        def answer() -> bytes:
            account = self._engine.accounts.get(name)
            if account is None:
                return self._reply("token", 404, _UNKNOWN_ACCOUNT)
            now = self._now()
            token = account.published
            if token is not None and token.is_valid(now):
                self._count("token", 200)
                return self._token_reply(name, token, now, plan.as_text)
            return self._reply("token", 503, _unavailable(account))

        if ready() or self._feed is None:
            return answer()
        if self._feed.full:
            return self._reply("token", 503, self._too_many_waiters())
        return LongPoll(self._feed, name, self._monotonic() + plan.wait, ready, answer)

    def _events(self, plan: _Plan, peer: PeerCred | None) -> Reply:
        feed = self._feed
        if feed is None:
            return self._reply("events", 404, _NOT_FOUND)
        name: str | None = plan.account or None
        if name is not None:
            account = self._engine.accounts.get(name)
            if account is None:
                return self._reply("events", 404, _UNKNOWN_ACCOUNT)
            if plan.with_token and not _allowed(account, peer):
                return self._reply("events", 403, _FORBIDDEN)
        if feed.full:
            return self._reply("events", 503, self._too_many_waiters())
        self._count("events", 200)
        return EventStream(feed, name, _EVENTS_HEAD, with_token=plan.with_token)

    def _too_many_waiters(self) -> bytes:
        assert self._feed is not None
        return json_response(
            503,
            {
                "error": "too_many_waiters",
                "max_waiters": self._feed.max_waiters,
                "detail": "tokend holds as many waiting connections as serve.max_waiters "
                "allows; retry later, or read the token without waiting",
            },
            b"Retry-After: 1\r\n",
        )

    def _token_reply(self, name: str, token: TokenSet, now: float, as_text: bool) -> bytes:
        """The 200 response carrying ``token`` (valid at ``now``)."""
        if as_text:
            cached_text = self._text_cache.get(name)
            if cached_text is not None and cached_text[0] is token:
                return cached_text[1]
            response = encode_response(
                200,
                token.access_token.encode(),
                TEXT_TYPE,
                b"Token-Version: %d\r\n" % token.version,
            )
            self._text_cache[name] = (token, response)
            return response
        expires_in = int(token.expires_at - now)
        cached = self._json_cache.get(name)
        if cached is not None and cached[0] is token and cached[1] == expires_in:
            return cached[2]
        response = json_response(
            200,
            {
                "access_token": token.access_token,
                "token_type": token.token_type,
                "expires_at": int(token.expires_at),
                "expires_in": expires_in,
                "scope": token.scope,
                "version": token.version,
            },
        )
        self._json_cache[name] = (token, expires_in, response)
        return response

    def _refresh(self, plan: _Plan, peer: PeerCred | None) -> Reply:
        account = self._engine.accounts.get(plan.account)
        if account is None:
            return self._reply("refresh", 404, _UNKNOWN_ACCOUNT)
        if not _allowed(account, peer):
            return self._reply("refresh", 403, _FORBIDDEN)
        if account.state is AccountState.NEEDS_REAUTH:
            return self._reply("refresh", 503, _unavailable(account, "refresh_failed"))
        retry_after = self._rate_limited_for(account.name)
        if retry_after is not None:
            return self._reply("refresh", 429, _rate_limited(retry_after))
        return self._refresh_and_wait(account.name, account.published, plan.as_text)

    async def _token_after_refresh(self, name: str, min_valid: float, as_text: bool) -> bytes:
        await self._app_refresh(name, partial(self._engine.wait_fresh, name, min_valid))
        account = self._engine.accounts.get(name)
        if account is None:
            return self._reply("token", 404, _UNKNOWN_ACCOUNT)
        now = self._now()
        token = account.published
        if token is not None and token.is_valid(now, min_valid):
            self._count("token", 200)
            return self._token_reply(name, token, now, as_text)
        return self._reply("token", 503, _unavailable(account))

    async def _refresh_and_wait(self, name: str, before: TokenSet | None, as_text: bool) -> bytes:
        refreshed = await self._app_refresh(name, partial(self._engine.force_refresh, name))
        account = self._engine.accounts.get(name)
        if account is None:
            return self._reply("refresh", 404, _UNKNOWN_ACCOUNT)
        now = self._now()
        token = account.published
        # Only a token committed after the request counts: the old one just got a 401.
        if token is not None and token is not before and token.is_valid(now):
            self._count("refresh", 200)
            return self._token_reply(name, token, now, as_text)
        if not refreshed:
            return self._reply("refresh", 429, _rate_limited(self._rate_limited_for(name) or 1.0))
        return self._reply("refresh", 503, _unavailable(account, "refresh_failed"))

    def _rate_limited_for(self, name: str) -> float | None:
        """Seconds until an application may cause another refresh of ``name``; ``None``
        if it may now (or may join one in flight)."""
        gate = self._gates.get(name)
        if gate is None or gate.done is not None:
            return None
        remaining = self._force_interval - (self._monotonic() - gate.started)
        return remaining if remaining > 0 else None

    async def _app_refresh(self, name: str, refresh: Callable[[float], Awaitable[Account]]) -> bool:
        """Join the refresh of ``name`` an application already caused, or cause one
        with ``refresh(max_wait)`` unless the rate limit forbids it (then ``False``)."""
        gate = self._gates.get(name)
        if gate is not None and gate.done is not None:
            with anyio.move_on_after(self._wait_max):
                await gate.done.wait()
            return True
        if self._rate_limited_for(name) is not None:
            return False
        done = anyio.Event()
        started = self._monotonic()
        gate = self._gates[name] = _Gate(started=started, done=done)
        try:
            account = self._engine.accounts[name]
            before = account.published
            account = await refresh(self._wait_max)
            remaining = self._wait_max - (self._monotonic() - started)
            # Same token, and no failure: the engine let this request share a refresh
            # that was already under way and whose token had been published before the
            # request came, so no attempt was made for it. Ask once more.
            if remaining > 0 and account.published is before and account.state is _VALID:
                await refresh(remaining)
        except KeyError:
            pass  # the account was removed by a reload meanwhile; the caller looks again
        finally:
            gate.done = None
            done.set()
        return True

    # -- a new seed from a sign-in --------------------------------------------------------------

    def _seed(self, name: str, peer: PeerCred | None, body: bytes) -> Reply:
        account = self._engine.accounts.get(name)
        if account is None:
            return self._reply("seed", 404, _UNKNOWN_ACCOUNT)
        # The seed decides whose tokens every reader gets: only the daemon's own user
        # (or root) may set it, whatever the account's allow: list says.
        if peer is None or peer.uid not in (0, os.getuid()):
            return self._reply("seed", 403, _FORBIDDEN)
        if account.config.grant != "refresh_token":
            return self._reply(
                "seed",
                400,
                error_response(400, "bad_request", detail="this account takes no refresh token"),
            )
        seed = _seed_from(body)
        if seed is None:
            return self._reply(
                "seed",
                400,
                error_response(
                    400, "bad_request", detail='expected a JSON body {"refresh_token": "..."}'
                ),
            )
        return self._replace_seed(name, seed)

    async def _replace_seed(self, name: str, seed: str) -> bytes:
        from tokend.seed import SeedFileError
        from tokend.store import StoreError

        try:
            await self._engine.replace_seed(name, seed)
        except KeyError:
            return self._reply("seed", 404, _UNKNOWN_ACCOUNT)
        except (StoreError, SeedFileError) as exc:
            return self._reply(
                "seed", 503, error_response(503, "store_unavailable", detail=str(exc))
            )
        try:
            account = await self._engine.force_refresh(name, self._wait_max)
        except KeyError:
            return self._reply("seed", 404, _UNKNOWN_ACCOUNT)
        view = _account_view(
            account, self._now(), self._publish_failures().get(name), self._shared_store()
        )
        return self._reply("seed", 200, json_response(200, view))

    # -- revocation -------------------------------------------------------------------------------

    def _revoke(self, name: str, peer: PeerCred | None) -> Reply:
        if name not in self._engine.accounts:
            return self._reply("revoke", 404, _UNKNOWN_ACCOUNT)
        # Ending the grant ends every reader's tokens: the same peers as a new seed.
        if peer is None or peer.uid not in (0, os.getuid()):
            return self._reply("revoke", 403, _FORBIDDEN)
        return self._revoke_account(name)

    async def _revoke_account(self, name: str) -> bytes:
        from tokend.revoke import RevokeError
        from tokend.store import StoreError

        try:
            message = await self._engine.revoke(name)
        except KeyError:
            return self._reply("revoke", 404, _UNKNOWN_ACCOUNT)
        except RevokeError as exc:
            return self._reply("revoke", 502, error_response(502, "revoke_failed", detail=str(exc)))
        except StoreError as exc:
            detail = f"revoked at the provider, but the store could not be updated: {exc}"
            return self._reply(
                "revoke", 503, error_response(503, "store_unavailable", detail=detail)
            )
        account = self._engine.accounts.get(name)
        if account is None:
            return self._reply("revoke", 404, _UNKNOWN_ACCOUNT)
        view = _account_view(
            account, self._now(), self._publish_failures().get(name), self._shared_store()
        )
        return self._reply("revoke", 200, json_response(200, {**view, "message": message}))

    # -- state, probes, metrics -----------------------------------------------------------------

    def _publish_failures(self) -> dict[str, str]:
        failures: dict[str, str] = {}
        for publisher in self._engine.publishers:
            if isinstance(publisher, ReportingPublisher):
                for name, why in publisher.failures().items():
                    failures.setdefault(name, why)
        return failures

    def _shared_store(self) -> SharedStore | None:
        store = self._engine.store
        return store if isinstance(store, SharedStore) else None

    def _accounts(self) -> bytes:
        now = self._now()
        accounts = self._engine.accounts
        failures = self._publish_failures()
        shared = self._shared_store()
        return json_response(
            200,
            {
                "accounts": [
                    _account_view(accounts[name], now, failures.get(name), shared)
                    for name in sorted(accounts)
                ]
            },
        )

    def _readyz(self) -> bytes:
        not_ready = self._engine.not_ready()
        store_problem = self._engine.store_problem
        # Shown, but not a reason to stop serving: the rotated tokens are stored locally.
        pending = self._engine.writeback_pending()
        accounts = self._engine.accounts
        failing = {
            name: why
            for name, why in sorted(self._publish_failures().items())
            if (account := accounts.get(name)) is not None and account.config.required
        }
        if not not_ready and store_problem is None and not failing:
            if pending:
                ready = {"ready": True, "vault_writeback_pending": pending}
                return self._reply("readyz", 200, json_response(200, ready))
            return self._reply("readyz", 200, _READY)
        answer: dict[str, object] = {"ready": False, "not_ready": sorted({*not_ready, *failing})}
        if store_problem is not None:
            answer["store"] = {"degraded": True, "error": store_problem}
        if pending:
            answer["vault_writeback_pending"] = pending
        if failing:
            # Bounded: a dead token volume fails every account at once.
            answer["publish_errors"] = dict(list(failing.items())[:_MAX_PUBLISH_ERRORS_SHOWN])
        return self._reply("readyz", 503, json_response(503, answer))

    async def _render_metrics(self, accept_encoding: bytes | None) -> bytes:
        encoding = accept_encoding.decode("latin-1") if accept_encoding is not None else None
        body, headers = await self._metrics.render(encoding)
        content_type = b"text/plain; version=0.0.4; charset=utf-8"
        extra = []
        for name, value in headers.items():
            lowered = name.lower()
            if lowered == "content-type":
                content_type = value.encode("latin-1")
            elif lowered != "content-length":
                extra.append(f"{name}: {value}\r\n".encode("latin-1"))
        if any(name.lower() == "content-encoding" for name in headers):
            extra.append(b"Vary: Accept-Encoding\r\n")
        return self._reply(
            "metrics", 200, encode_response(200, body, content_type, b"".join(extra))
        )


_TOKEN_ROUTES = {
    b"/v1/accounts": (_ACCOUNTS, "accounts"),
    b"/healthz": (_HEALTHZ, "healthz"),
    b"/readyz": (_READYZ, "readyz"),
    b"/metrics": (_METRICS, "metrics"),
}
# The TCP port: probes and metrics, never anything about tokens or accounts.
_PROBE_ROUTES = {path: found for path, found in _TOKEN_ROUTES.items() if found[0] != _ACCOUNTS}


def _token_plan(request: Request, rest: bytes) -> _Plan:
    """/v1/tokens/{account} and /v1/tokens/{account}/refresh."""
    if rest.endswith(_REFRESH_SUFFIX):
        kind, route, method = _REFRESH, "refresh", b"POST"
        rest = rest[: -len(_REFRESH_SUFFIX)]
    else:
        kind, route, method = _TOKEN, "token", b"GET"
    if not rest or b"/" in rest:
        return _fixed("other", 404, _NOT_FOUND)
    if request.method != method:
        return _fixed(route, 405, _POST_ONLY if kind == _REFRESH else _GET_ONLY)
    min_valid = after = None
    wait = _DEFAULT_WAIT
    if kind == _TOKEN:
        try:
            min_valid, after, wait = _token_query(request.query)
        except ValueError as exc:
            return _fixed(route, 400, error_response(400, "bad_request", detail=str(exc)))
    # The request line admits visible ASCII only, so decoding cannot fail.
    return _Plan(
        kind,
        route,
        rest.decode("ascii"),
        min_valid,
        as_text=_wants_text(request.accept),
        after=after,
        wait=wait,
    )


def _events_plan(request: Request) -> _Plan:
    """/v1/events[?account=NAME[&token=1]]."""
    if request.method != b"GET":
        return _fixed("events", 405, _GET_ONLY)
    account, with_token = "", False
    try:
        for key, value in _query_pairs(request.query):
            if key == b"account" and value and b"/" not in value:
                account = value.decode("ascii")
            elif key == b"token" and value in (b"0", b"1"):
                with_token = value == b"1"
            else:
                raise ValueError("/v1/events takes account=NAME and token=1 (with account)")
        if with_token and not account:
            raise ValueError("token=1 needs account=NAME: tokens are streamed one account only")
    except ValueError as exc:
        return _fixed("events", 400, error_response(400, "bad_request", detail=str(exc)))
    return _Plan(_EVENTS, "events", account, with_token=with_token)


def _query_pairs(query: bytes | None) -> list[tuple[bytes, bytes]]:
    pairs = []
    for pair in query.split(b"&") if query else ():
        if pair:
            key, _, value = pair.partition(b"=")
            pairs.append((key, value))
    return pairs


def _seed_from(body: bytes) -> str | None:
    """The refresh token of a seed request's body, or None if there is no usable one."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    seed = document.get("refresh_token") if isinstance(document, dict) else None
    if not isinstance(seed, str) or not seed.strip() or not seed.isprintable():
        return None
    return seed.strip()


def _allowed(account: Account, peer: PeerCred | None) -> bool:
    allow = account.config.allow
    if allow is None:
        return True
    if peer is None:
        return False
    return peer.uid in allow.uids or peer.gid in allow.gids


def _wants_text(accept: bytes | None) -> bool:
    # Deliberately simple: text/plain named without application/json; no q-values.
    return accept is not None and b"text/plain" in accept and b"application/json" not in accept


def _token_query(query: bytes | None) -> tuple[float | None, int | None, float]:
    """``min_valid``, ``after`` and ``wait`` from the query string. Raises ``ValueError``
    with a message for the client; the message never echoes what was sent."""
    min_valid: float | None = None
    after: int | None = None
    wait: float | None = None
    for key, value in _query_pairs(query):
        if key == b"min_valid":
            if _SECONDS.fullmatch(value) is None:
                raise ValueError("min_valid must be a number of seconds, such as 30")
            min_valid = float(value)
        elif key == b"after":
            if _VERSION.fullmatch(value) is None:
                raise ValueError("after must be a token version (an integer), such as 0")
            after = int(value)
        elif key == b"wait":
            match = _WAIT.fullmatch(value)
            if match is None or not 0 < float(match[1]) <= _MAX_WAIT:
                raise ValueError(f"wait must be seconds, such as 30s, at most {_MAX_WAIT:.0f}s")
            wait = float(match[1])
        else:
            raise ValueError(
                "unknown query parameter (this endpoint takes min_valid, or after and wait)"
            )
    if after is not None and min_valid is not None:
        raise ValueError("after (a long-poll) and min_valid cannot be combined")
    if wait is not None and after is None:
        raise ValueError("wait needs after=VERSION (the version the client holds)")
    return min_valid, after, _DEFAULT_WAIT if wait is None else wait


def _unavailable(account: Account, error: str = "token_unavailable") -> bytes:
    return error_response(503, error, state=account.state.value, last_error=account.last_error)


def _rate_limited(retry_after: float) -> bytes:
    seconds = max(1, math.ceil(retry_after))
    return json_response(
        429,
        {"error": "rate_limited", "retry_after": seconds},
        b"Retry-After: %d\r\n" % seconds,
    )


def _epoch(ts: float | None) -> int | None:
    return None if ts is None else int(ts)


def _account_view(
    account: Account,
    now: float,
    publish_error: str | None = None,
    shared: SharedStore | None = None,
) -> dict[str, object]:
    token = account.published
    deadline = account.reauth_deadline
    view: dict[str, object] = {
        "name": account.name,
        "provider": account.provider,
        "state": account.state.value,
        "required": account.config.required,
        "token_valid": token is not None and token.is_valid(now),
        "expires_at": _epoch(token.expires_at) if token is not None else None,
        "version": token.version if token is not None else None,
        "last_refresh_at": _epoch(account.last_refresh_at),
        # The next attempt the engine has scheduled: the planned refresh while the
        # token is fine, the retry after a failure; null when none is (needs_reauth).
        "next_refresh_at": _epoch(account.next_attempt_at),
        "last_error": account.last_error,
        "publish_error": publish_error,
        "reauth_deadline": _epoch(deadline),
        "reauth_warning": reauth_warning(account.lifetime, deadline, now),
    }
    if account.config.writes_back:
        view["vault_writeback_pending"] = account.writeback_pending
    if shared is not None:
        view["owner"] = shared.owner_of(account.name)
        view["owned_here"] = shared.owns(account.name)
    return view
