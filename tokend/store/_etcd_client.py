"""A small async etcd v3 client on the JSON gateway (``/v3/...``), over httpx.

Why not a library: the maintained async etcd v3 client for Python talks gRPC, which
would bring grpcio and protobuf (large native wheels with their own threads and event
loop integration) into a sidecar that otherwise needs none; the gateway clients are
unmaintained or bring another HTTP stack. tokend already speaks HTTP with httpx, and
the dozen calls it needs (range, txn, lease grant/keep-alive/revoke, watch) map onto
the gateway one to one.

Gateway facts this module handles: keys and values are base64, 64-bit integers are
strings, and proto3 JSON leaves out default values (a failed txn has no ``succeeded``
field, a zero revision no ``mod_revision``).

Deadlines: while a cluster elects a new leader (about 1.5 s after the leader dies) a
write sent to a follower waits until the client gives up. So every request has a short
deadline of its own (``request_timeout``, 0.5 s by default) and a call is retried on the
next endpoint until the call's overall deadline. A write that timed out may still
commit later: callers make writes safe to repeat (a txn that compares revisions, whose
failure branch reads back what is there).
"""

from __future__ import annotations

import base64
import contextlib
import math
import ssl
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import anyio
import httpx
import orjson

from tokend.store._base import StoreError

__all__ = [
    "EtcdClient",
    "EtcdError",
    "EtcdRejected",
    "EtcdUnavailable",
    "KeyValue",
    "LeaseNotFound",
    "TxnResult",
    "WatchCompacted",
    "WatchEvent",
    "prefix_end",
]

# Per-request deadline of a bulk read (a page of records): its transfer, not a leader
# election, is what takes time.
BULK_REQUEST_TIMEOUT: Final = 3.0
# HTTP statuses the gateway maps retryable gRPC codes to: Unavailable, DeadlineExceeded,
# Unknown (a leader change mid-request), ResourceExhausted (too many requests).
_RETRY_STATUS: Final = frozenset({500, 502, 503, 504, 429})


class EtcdError(StoreError):
    """An etcd call failed. The message names the call and the reason, never a value."""


class EtcdUnavailable(EtcdError):
    """No endpoint completed the call before its deadline (no quorum, all down, slow)."""


class EtcdRejected(EtcdError):
    """The cluster answered and refused the call (bad request, permission denied)."""


class LeaseNotFound(EtcdError):
    """The lease named in the call has expired or was revoked."""


class WatchCompacted(EtcdError):
    """A watch asked for revisions the cluster has compacted away."""

    def __init__(self, message: str, compact_revision: int) -> None:
        super().__init__(message)
        self.compact_revision = compact_revision


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: object) -> bytes:
    return base64.b64decode(text) if isinstance(text, str) and text else b""


def _int(value: object) -> int:
    # int64 arrives as a string, a default (0) not at all.
    if value is None:
        return 0
    if isinstance(value, int | str):
        return int(value)
    raise EtcdError(f"etcd answered a number as {type(value).__name__}")


def prefix_end(prefix: bytes) -> bytes:
    """The range end that covers every key starting with ``prefix``."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"  # every key


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int

    @classmethod
    def parse(cls, kv: Mapping[str, Any]) -> KeyValue:
        return cls(
            key=_unb64(kv.get("key")),
            value=_unb64(kv.get("value")),
            create_revision=_int(kv.get("create_revision")),
            mod_revision=_int(kv.get("mod_revision")),
            version=_int(kv.get("version")),
            lease=_int(kv.get("lease")),
        )


@dataclass(frozen=True, slots=True)
class RangeResult:
    kvs: list[KeyValue]
    revision: int
    more: bool
    count: int


@dataclass(frozen=True, slots=True)
class TxnResult:
    succeeded: bool
    revision: int
    # One entry per operation of the branch that ran: the key-values of a range, [] else.
    ranges: list[list[KeyValue]]


@dataclass(frozen=True, slots=True)
class WatchEvent:
    deleted: bool
    kv: KeyValue


# -- request builders (the gateway's JSON shapes) -------------------------------------


def compare_mod(key: bytes, revision: int) -> dict[str, Any]:
    return {"key": b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": str(revision)}


def compare_create(key: bytes, revision: int) -> dict[str, Any]:
    """``revision`` 0: the key does not exist."""
    return {
        "key": b64(key),
        "target": "CREATE",
        "result": "EQUAL",
        "create_revision": str(revision),
    }


def op_put(key: bytes, value: bytes, lease: int = 0) -> dict[str, Any]:
    body: dict[str, Any] = {"key": b64(key), "value": b64(value)}
    if lease:
        body["lease"] = str(lease)
    return {"request_put": body}


def op_range(key: bytes, range_end: bytes | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"key": b64(key)}
    if range_end is not None:
        body["range_end"] = b64(range_end)
    return {"request_range": body}


def op_delete(key: bytes) -> dict[str, Any]:
    return {"request_delete_range": {"key": b64(key)}}


class EtcdClient:
    """Calls on a cluster through any of its endpoints (see the module docstring)."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        request_timeout: float = 0.5,
        call_timeout: float = 5.0,
        ssl_context: ssl.SSLContext | None = None,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        if not endpoints:
            raise ValueError("etcd needs at least one endpoint")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.request_timeout = request_timeout
        self.call_timeout = call_timeout
        self._ssl = ssl_context
        self._username = username
        self._password = password
        self._token: str | None = None
        self._current = 0
        self._http: httpx.AsyncClient | None = None
        self._watch_http: httpx.AsyncClient | None = None
        self.watch_endpoint: str | None = None
        # Counters for metrics and benchmarks: requests sent, bytes sent and received.
        self.requests = 0
        self.writes = 0
        self.bytes_sent = 0
        self.bytes_received = 0

    def __repr__(self) -> str:
        return f"EtcdClient({self.endpoints!r})"

    # -- lifecycle -------------------------------------------------------------------

    async def open(self) -> None:
        if self._http is not None:
            return
        verify: ssl.SSLContext | bool = self._ssl if self._ssl is not None else True
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=32)
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(self.request_timeout), verify=verify, limits=limits
        )
        # Watches stay open for as long as the store runs: no read timeout of their own
        # (the store restarts one that falls behind).
        self._watch_http = httpx.AsyncClient(
            timeout=httpx.Timeout(self.request_timeout, read=None), verify=verify
        )

    async def close(self) -> None:
        http, self._http = self._http, None
        watch_http, self._watch_http = self._watch_http, None
        with anyio.CancelScope(shield=True):
            if http is not None:
                await http.aclose()
            if watch_http is not None:
                await watch_http.aclose()

    # -- the calls -------------------------------------------------------------------

    async def range(
        self,
        key: bytes,
        range_end: bytes | None = None,
        *,
        limit: int = 0,
        revision: int = 0,
        keys_only: bool = False,
        count_only: bool = False,
        min_mod_revision: int = 0,
        budget: float | None = None,
        bulk: bool = False,
    ) -> RangeResult:
        """Keys from ``key`` (to ``range_end``). ``bulk``: a large answer (a page of
        records, every key of a prefix), whose transfer alone may outlast the short
        per-request deadline on a loaded host; it gets :data:`BULK_REQUEST_TIMEOUT`."""
        body: dict[str, Any] = {"key": b64(key)}
        if range_end is not None:
            body["range_end"] = b64(range_end)
        if limit:
            body["limit"] = str(limit)
        if revision:
            body["revision"] = str(revision)
        if keys_only:
            body["keys_only"] = True
        if count_only:
            body["count_only"] = True
        if min_mod_revision:
            body["min_mod_revision"] = str(min_mod_revision)
        answer = await self.call(
            "/v3/kv/range",
            body,
            budget=budget if budget is not None else (self.call_timeout * 2 if bulk else None),
            attempt=max(self.request_timeout, BULK_REQUEST_TIMEOUT) if bulk else None,
        )
        return RangeResult(
            kvs=[KeyValue.parse(kv) for kv in answer.get("kvs", ())],
            revision=_int(answer.get("header", {}).get("revision")),
            more=bool(answer.get("more", False)),
            count=_int(answer.get("count")),
        )

    async def range_all(
        self,
        prefix: bytes,
        *,
        page: int = 500,
        budget: float | None = None,
        revision: int = 0,
        keys_only: bool = False,
    ) -> tuple[list[KeyValue], int]:
        """Every key under ``prefix``, read page by page at one revision (``revision``,
        or the current one) and that revision."""
        end = prefix_end(prefix)

        async def read_from(start: bytes, at: int) -> RangeResult:
            return await self.range(
                start, end, limit=page, revision=at, keys_only=keys_only, budget=budget, bulk=True
            )

        first = await read_from(prefix, revision)
        kvs, revision = list(first.kvs), revision or first.revision
        more = first.more
        while more and kvs:
            nxt = await read_from(kvs[-1].key + b"\0", revision)
            kvs.extend(nxt.kvs)
            more = nxt.more
        return kvs, revision

    async def txn(
        self,
        compare: Sequence[Mapping[str, Any]],
        success: Sequence[Mapping[str, Any]],
        failure: Sequence[Mapping[str, Any]] = (),
        *,
        budget: float | None = None,
    ) -> TxnResult:
        body = {"compare": list(compare), "success": list(success), "failure": list(failure)}
        answer = await self.call("/v3/kv/txn", body, budget=budget, write=True)
        ranges = []
        for response in answer.get("responses", ()):
            found = response.get("response_range")
            ranges.append([KeyValue.parse(kv) for kv in (found or {}).get("kvs", ())])
        return TxnResult(
            succeeded=bool(answer.get("succeeded", False)),
            revision=_int(answer.get("header", {}).get("revision")),
            ranges=ranges,
        )

    async def delete(self, key: bytes, range_end: bytes | None = None) -> int:
        body: dict[str, Any] = {"key": b64(key)}
        if range_end is not None:
            body["range_end"] = b64(range_end)
        answer = await self.call("/v3/kv/deleterange", body, write=True)
        return _int(answer.get("header", {}).get("revision"))

    async def lease_grant(self, ttl: int) -> tuple[int, int]:
        """A new lease: (id, granted ttl)."""
        answer = await self.call("/v3/lease/grant", {"TTL": str(ttl)}, write=True)
        if answer.get("error"):
            raise EtcdRejected(f"etcd lease grant failed: {answer['error']}")
        return _int(answer.get("ID")), _int(answer.get("TTL"))

    async def lease_keepalive(self, lease: int, *, budget: float | None = None) -> tuple[int, int]:
        """Renew ``lease``: (remaining ttl, cluster revision). Raises LeaseNotFound."""
        answer = await self.call(
            "/v3/lease/keepalive", {"ID": str(lease)}, budget=budget, write=True
        )
        result = answer.get("result", answer)
        ttl = _int(result.get("TTL"))
        if ttl <= 0:
            raise LeaseNotFound(f"etcd lease {lease:x} has expired")
        return ttl, _int(result.get("header", {}).get("revision"))

    async def lease_revoke(self, lease: int, *, budget: float | None = None) -> None:
        with contextlib.suppress(LeaseNotFound):
            await self.call("/v3/lease/revoke", {"ID": str(lease)}, budget=budget, write=True)

    async def watch(
        self, key: bytes, range_end: bytes | None, start_revision: int
    ) -> AsyncIterator[tuple[int, list[WatchEvent]]]:
        """Events from ``start_revision`` on, as (revision, events) batches.

        Ends (raises) when the stream breaks; the caller resumes from the last revision
        it saw + 1 on the next endpoint. The first batch is the creation (no events).
        """
        http = self._watch_http
        if http is None:
            raise EtcdError("etcd client is not open")
        create: dict[str, Any] = {"key": b64(key), "start_revision": str(start_revision)}
        if range_end is not None:
            create["range_end"] = b64(range_end)
        endpoint = self.endpoints[self._current % len(self.endpoints)]
        self._current += 1
        self.watch_endpoint = endpoint
        headers = await self._auth_headers()
        payload = orjson.dumps({"create_request": create})
        self.requests += 1
        self.bytes_sent += len(payload)
        try:
            async with http.stream(
                "POST", f"{endpoint}/v3/watch", content=payload, headers=headers
            ) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise self._refusal("/v3/watch", endpoint, response)
                async for line in response.aiter_lines():
                    if not line.strip():
                        continue
                    self.bytes_received += len(line)
                    message = _watch_message(endpoint, line)
                    if "error" in message:
                        error = message["error"]
                        raise EtcdUnavailable(
                            f"etcd watch on {endpoint} ended: {error.get('message', error)}"
                        )
                    result = message.get("result", {})
                    compacted = _int(result.get("compact_revision"))
                    if compacted:
                        raise WatchCompacted(
                            f"etcd watch from revision {start_revision} on {endpoint}: "
                            f"compacted up to {compacted}",
                            compacted,
                        )
                    if result.get("canceled"):
                        raise EtcdUnavailable(
                            f"etcd watch on {endpoint} was canceled: "
                            f"{result.get('cancel_reason', 'no reason given')}"
                        )
                    events = [
                        WatchEvent(
                            deleted=event.get("type") == "DELETE",
                            kv=KeyValue.parse(event.get("kv", {})),
                        )
                        for event in result.get("events", ())
                    ]
                    revision = _int(result.get("header", {}).get("revision"))
                    yield revision, events
        except httpx.HTTPError as exc:
            raise EtcdUnavailable(f"etcd watch on {endpoint} broke: {_reason(exc)}") from None
        raise EtcdUnavailable(f"etcd watch on {endpoint} ended")

    def avoid(self, endpoint: str | None) -> None:
        """Move the next call (or watch) off ``endpoint`` (it misbehaved)."""
        if endpoint is not None and self.endpoints[self._current % len(self.endpoints)] == endpoint:
            self._current += 1

    # -- plumbing --------------------------------------------------------------------

    async def call(
        self,
        path: str,
        body: Mapping[str, Any],
        *,
        budget: float | None = None,
        write: bool = False,
        attempt: float | None = None,
    ) -> dict[str, Any]:
        """POST ``body`` to ``path`` on the current endpoint; on a failure that another
        member might not have, the next one, for up to ``budget`` seconds (default: the
        call timeout)."""
        http = self._http
        if http is None:
            raise EtcdError(f"etcd {path} failed: the client is not open")
        payload = orjson.dumps(body)
        budget = self.call_timeout if budget is None else budget
        deadline = anyio.current_time() + budget
        last = "no endpoint tried"
        pause = 0.02
        reauthenticated = False
        attempt = 0
        while True:
            endpoint = self.endpoints[self._current % len(self.endpoints)]
            left = deadline - anyio.current_time()
            if left <= 0:
                break
            attempt += 1
            try:
                headers = await self._auth_headers()
                self.requests += 1
                if write:
                    self.writes += 1
                self.bytes_sent += len(payload)
                with anyio.fail_after(min(attempt or self.request_timeout, left)):
                    response = await http.post(
                        f"{endpoint}{path}",
                        content=payload,
                        headers={"content-type": "application/json", **headers},
                    )
                self.bytes_received += len(response.content)
            except (httpx.HTTPError, TimeoutError) as exc:
                last = f"{endpoint}: {_reason(exc)}"
            else:
                if response.status_code == 200:
                    return _answer(path, endpoint, response.content)
                message = _error_message(response)
                if response.status_code == 401 and not reauthenticated and self._username:
                    # The auth token expired (etcd drops simple tokens after 5 minutes
                    # idle, and on restart): authenticate again, once per call.
                    self._token = None
                    reauthenticated = True
                    continue
                if "lease not found" in message:
                    raise LeaseNotFound(f"etcd {path} failed: {message}")
                if response.status_code not in _RETRY_STATUS:
                    raise EtcdRejected(f"etcd {path} on {endpoint} refused: {message}")
                last = f"{endpoint}: {message}"
            # Next member; after a whole round, a short pause that doubles.
            self._current += 1
            if attempt % len(self.endpoints) == 0:
                await anyio.sleep(min(pause, max(0.0, deadline - anyio.current_time())))
                pause = min(pause * 2, 0.2)
        raise EtcdUnavailable(
            f"etcd {path} failed: no endpoint answered within {budget:g} s (last: {last})"
        )

    async def _auth_headers(self) -> dict[str, str]:
        if self._username is None:
            return {}
        if self._token is None:
            self._token = await self._authenticate()
        return {"authorization": self._token}

    async def _authenticate(self) -> str:
        http = self._http
        if http is None:
            raise EtcdError("etcd authenticate failed: the client is not open")
        payload = orjson.dumps({"name": self._username, "password": self._password})
        last = ""
        for _ in range(len(self.endpoints)):
            endpoint = self.endpoints[self._current % len(self.endpoints)]
            try:
                with anyio.fail_after(self.request_timeout * 2):
                    response = await http.post(f"{endpoint}/v3/auth/authenticate", content=payload)
            except (httpx.HTTPError, TimeoutError) as exc:
                last = f"{endpoint}: {_reason(exc)}"
                self._current += 1
                continue
            if response.status_code == 200:
                token = response.json().get("token")
                if isinstance(token, str) and token:
                    return token
            message = _error_message(response)
            if response.status_code in _RETRY_STATUS:
                last = f"{endpoint}: {message}"
                self._current += 1
                continue
            raise EtcdRejected(
                f"etcd authentication as {self._username!r} refused: {message} "
                "(check state.username and state.password_file)"
            )
        raise EtcdUnavailable(f"etcd authentication failed: {last}")

    def _refusal(self, path: str, endpoint: str, response: httpx.Response) -> EtcdError:
        message = _error_message(response)
        if response.status_code in _RETRY_STATUS:
            return EtcdUnavailable(f"etcd {path} on {endpoint}: {message}")
        return EtcdRejected(f"etcd {path} on {endpoint} refused: {message}")


def _json_object(content: bytes | str) -> dict[str, Any] | None:
    try:
        document = orjson.loads(content)
    except orjson.JSONDecodeError:
        return None
    return document if isinstance(document, dict) else None


def _answer(path: str, endpoint: str, content: bytes) -> dict[str, Any]:
    answer = _json_object(content)
    if answer is None:
        raise EtcdRejected(f"etcd {path} on {endpoint}: the answer is not a JSON object")
    return answer


def _watch_message(endpoint: str, line: str) -> dict[str, Any]:
    message = _json_object(line)
    if message is None:
        raise EtcdUnavailable(f"etcd watch on {endpoint}: a message that is not a JSON object")
    return message


def _error_message(response: httpx.Response) -> str:
    # The gateway answers {"error": ..., "message": ..., "code": N}; its messages are
    # etcd's fixed texts and never echo a key or value.
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code}"
    if isinstance(body, dict):
        text = body.get("message") or body.get("error")
        if isinstance(text, str) and text:
            return f"{text} (HTTP {response.status_code})"
    return f"HTTP {response.status_code}"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | httpx.TimeoutException):
        return "timed out"
    if isinstance(exc, httpx.ConnectError):
        return "connection refused or unreachable"
    return type(exc).__name__


def ttl_seconds(value: float) -> int:
    """A lease TTL in whole seconds (etcd's unit), at least 2."""
    return max(2, math.ceil(value))
