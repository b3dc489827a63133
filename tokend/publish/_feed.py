"""Token changes pushed to the socket's waiting connections.

The engine tells :class:`TokenFeed` of every token it publishes and of every
published token that expires unreplaced, like any publisher (it comes after the token
files, so a program woken here already finds the files written). The feed answers:

* long-polls (``GET /v1/tokens/ACCOUNT?after=VERSION&wait=30s``, see _api): each is
  answered the moment its account holds a valid token other than ``VERSION``, or at
  the wait's end;
* event streams (``GET /v1/events``): server-sent events, one per change.

Every waiting connection is one :class:`~tokend.publish._http.Push`: no task wakes up
for it; the publish writes the answer straight to its connection. What one costs is
bounded: at most ``max_waiters`` at once (beyond that, 503 ``too_many_waiters``), a
stream whose client stops reading is cut off at the connection's write limit, and
every wait ends (a long-poll at its ``wait``, a stream after ``_STREAM_LIFETIME``,
from which clients reconnect).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import orjson

from tokend.model import TokenSet
from tokend.publish._http import PushSink

if TYPE_CHECKING:
    from tokend.engine import Account, Engine

_monotonic = time.monotonic
# A comment line every so often: a stream's client can tell a quiet daemon from a
# dead connection, and tokend finds clients that went away.
_HEARTBEAT = 15.0
_STREAM_LIFETIME = 3600.0
_HEARTBEAT_LINE = b": keep-alive\n\n"
# Sent first on every stream: reconnect after one second when the stream ends.
_STREAM_PREAMBLE = b"retry: 1000\n\n"

TOKEN_EVENT = "token"  # a new token was published
EXPIRED_EVENT = "expired"  # the published token expired and nothing replaced it
REMOVED_EVENT = "removed"  # the account was removed from the config


class TokenFeed:
    """Wakes connections waiting for token changes (a publisher; see the module doc)."""

    # Tokens restored at a start are no change: the engine need not hand them over.
    republishes = False

    def __init__(self, engine: Engine, max_waiters: int) -> None:
        self._engine = engine
        self._now = engine.clock.time
        self.max_waiters = max_waiters
        # Connections waiting now (long-polls and streams).
        self.waiting = 0
        self._watchers: dict[str, set[_Watcher]] = {}
        self._streams: set[EventStream] = set()
        # While streams of every account are open: the token each account's last
        # event showed, so a republished token (at a reload, say) is not announced
        # again. Empty otherwise: nothing per account is kept for nobody.
        self._announced: dict[str, TokenSet | None] = {}

    @property
    def full(self) -> bool:
        return self.waiting >= self.max_waiters

    # -- Publisher ------------------------------------------------------------------------

    async def publish(self, account: str, token: TokenSet) -> None:
        self._changed(account, TOKEN_EVENT, token)

    async def expire(self, account: str, now: float | None = None) -> bool:
        self._changed(account, EXPIRED_EVENT, None)
        return False

    async def withdraw(self, account: str) -> None:
        self._changed(account, REMOVED_EVENT, None)
        self._announced.pop(account, None)

    def _changed(self, account: str, kind: str, token: TokenSet | None) -> None:
        watchers = self._watchers.get(account)
        if watchers:
            # A copy: an answered long-poll leaves the set while it is walked.
            for watcher in list(watchers):
                watcher.changed(kind)
        if self._streams:
            if kind == TOKEN_EVENT:
                if self._announced.get(account) is token:
                    return
                self._announced[account] = token
            event = self.event(account, kind)
            for stream in list(self._streams):
                stream.sink_send(event)

    # -- events ---------------------------------------------------------------------------

    def event(self, name: str, kind: str, *, with_token: bool = False) -> bytes:
        """One server-sent event: the account's token version, expiry and state, and
        the token itself only when ``with_token`` (the caller checked the ACL)."""
        account = self._engine.accounts.get(name)
        payload: dict[str, object] = {"account": name}
        if account is None or kind == REMOVED_EVENT:
            kind = REMOVED_EVENT
        else:
            payload.update(_account_fields(account, self._now(), with_token))
        data = orjson.dumps(payload)
        return b"event: %s\ndata: %s\n\n" % (kind.encode(), data)

    def snapshot(self, names: list[str]) -> bytes:
        return b"".join(self.event(name, TOKEN_EVENT) for name in names)

    # -- registration (by the pushes) -----------------------------------------------------------

    def _watch(self, account: str, watcher: _Watcher) -> None:
        self._watchers.setdefault(account, set()).add(watcher)
        self.waiting += 1

    def _unwatch(self, account: str, watcher: _Watcher) -> None:
        watchers = self._watchers.get(account)
        if watchers is not None and watcher in watchers:
            watchers.discard(watcher)
            if not watchers:
                del self._watchers[account]
            self.waiting -= 1

    def _add_stream(self, stream: EventStream) -> None:
        if not self._streams:
            for name, account in self._engine.accounts.items():
                self._announced[name] = account.published
        self._streams.add(stream)
        self.waiting += 1

    def _remove_stream(self, stream: EventStream) -> None:
        if stream in self._streams:
            self._streams.discard(stream)
            self.waiting -= 1
            if not self._streams:
                self._announced.clear()


def _account_fields(account: Account, now: float, with_token: bool) -> dict[str, object]:
    token = account.published
    valid = token is not None and token.is_valid(now)
    fields: dict[str, object] = {
        "version": token.version if token is not None else None,
        "expires_at": int(token.expires_at) if token is not None else None,
        "state": account.state.value,
        "token_valid": valid,
    }
    if with_token and valid and token is not None:
        fields["access_token"] = token.access_token
        fields["token_type"] = token.token_type
        fields["expires_in"] = int(token.expires_at - now)
        fields["scope"] = token.scope
    return fields


class _Watcher:
    """Waits on one account's changes."""

    __slots__ = ()

    def changed(self, kind: str) -> None:
        raise NotImplementedError


class LongPoll(_Watcher):
    """``GET /v1/tokens/ACCOUNT?after=VERSION``: answered by ``answer()`` once the
    account holds a valid token of another version, or when ``deadline`` comes.
    ``ready()`` says whether such a token is there now."""

    __slots__ = ("_account", "_answer", "_feed", "_ready", "_sink", "deadline")

    def __init__(
        self,
        feed: TokenFeed,
        account: str,
        deadline: float,
        ready: Callable[[], bool],
        answer: Callable[[], bytes],
    ) -> None:
        self._feed = feed
        self._account = account
        self.deadline = deadline
        self._ready = ready
        self._answer = answer
        self._sink: PushSink | None = None

    def attach(self, sink: PushSink) -> None:
        self._sink = sink
        self._feed._watch(self._account, self)

    def changed(self, kind: str) -> None:
        # An expiry is not an answer: the application waits on for the next token.
        if kind == REMOVED_EVENT or (kind == TOKEN_EVENT and self._ready()):
            self._finish()

    def on_deadline(self) -> None:
        self._finish()

    def _finish(self) -> None:
        sink = self._sink
        if sink is not None:
            sink.finish(self._answer())

    def detach(self) -> None:
        self._feed._unwatch(self._account, self)
        self._sink = None


class EventStream(_Watcher):
    """``GET /v1/events``: server-sent events for one account (``account``) or every
    account (``None``), with the token itself when ``with_token``."""

    __slots__ = (
        "_account",
        "_announced",
        "_end",
        "_feed",
        "_head",
        "_sink",
        "_with_token",
        "deadline",
    )

    def __init__(
        self, feed: TokenFeed, account: str | None, head: bytes, *, with_token: bool = False
    ) -> None:
        self._feed = feed
        self._account = account
        self._head = head
        self._with_token = with_token
        now = _monotonic()
        self.deadline = now + _HEARTBEAT
        self._end = now + _STREAM_LIFETIME
        self._sink: PushSink | None = None
        # One account's stream: the token its last event showed. The engine sets an
        # account's token before telling the publishers, so a stream that starts in
        # between already showed it.
        self._announced: TokenSet | None = None

    def attach(self, sink: PushSink) -> None:
        self._sink = sink
        feed = self._feed
        if self._account is None:
            names = sorted(feed._engine.accounts)
            first = feed.snapshot(names)
            feed._add_stream(self)
        else:
            account = feed._engine.accounts.get(self._account)
            self._announced = account.published if account is not None else None
            first = feed.event(self._account, TOKEN_EVENT, with_token=self._with_token)
            feed._watch(self._account, self)
        sink.send(self._head + _STREAM_PREAMBLE + first)

    def changed(self, kind: str) -> None:
        assert self._account is not None
        if kind == TOKEN_EVENT:
            account = self._feed._engine.accounts.get(self._account)
            token = account.published if account is not None else None
            if token is self._announced:
                return
            self._announced = token
        event = self._feed.event(self._account, kind, with_token=self._with_token)
        self.sink_send(event)
        if kind == REMOVED_EVENT and self._sink is not None:
            self._sink.finish(None)

    def sink_send(self, event: bytes) -> None:
        if self._sink is not None:
            self._sink.send(event)

    def on_deadline(self) -> None:
        sink = self._sink
        if sink is None:
            return
        now = _monotonic()
        if now >= self._end:
            sink.finish(None)
            return
        self.deadline = min(now + _HEARTBEAT, self._end)
        sink.send(_HEARTBEAT_LINE)

    def detach(self) -> None:
        if self._account is None:
            self._feed._remove_stream(self)
        else:
            self._feed._unwatch(self._account, self)
        self._sink = None
