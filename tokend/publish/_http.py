"""HTTP/1.1 plumbing shared by tokend's listeners (the unix socket and the TCP port):
a strict request-head parser, response encoding, and connection handling with
keep-alive, pipelining, bounded heads, an idle timeout and a connection cap.

Why not h11: one h11 request/response cycle costs about 70 us of CPU here, while a
whole round trip to a plain asyncio echo server takes about 20 us, and the token API
must stay within twice that. tokend's requests are bodiless heads (GET, and a POST
without a body), which the parser below handles in a few microseconds. It accepts a
strict subset of RFC 9112 and answers anything else with 400, 413 or 431 and closes
the connection: a request it cannot frame exactly is never guessed at. The one
exception to bodiless requests is PUT, whose small body (``MAX_BODY_BYTES``, framed
by Content-Length alone) is read before the handler is called.

Why asyncio protocols rather than anyio streams: a stream costs a task wake-up and
epoll re-registrations per request (about 85 us per round trip against 33 us here).
A request that can be answered from memory (the common token read) is answered in
the data callback without any task switch; a request that has to wait (a refresh,
the metrics exposition) runs in its connection's task, a child of the listener's
task group, so nothing is fire-and-forget and cancellation closes every connection.
"""

from __future__ import annotations

import asyncio
import errno
import re
import socket
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
import orjson

from tokend.logs import get_logger
from tokend.publish._peercred import PeerCred, peer_credentials

_log = get_logger(component="http")
# The clock asyncio's default loop uses, called directly: cheaper than loop.time().
_monotonic = time.monotonic

_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
# origin-form targets only ("/path?query"); HTTP/1.0 and 1.1.
_REQUEST_LINE = rb"(" + _TOKEN + rb") (/[!-~]*) HTTP/1\.([01])"
# Field values may hold visible ASCII, space, tab and obs-text. NUL, a bare CR or LF
# and other controls are how header injection and request smuggling begin. A name
# must be followed by its colon at once, and a line cannot start with whitespace
# (no obs-fold continuation lines).
_FIELD_LINE = rb"\r\n" + _TOKEN + rb":[\t\x20-\x7e\x80-\xff]*"
# The whole head is validated by one match (a few times faster than line by line);
# the fields are then split apart knowing that every line is well formed.
_HEAD = re.compile(_REQUEST_LINE + rb"((?:" + _FIELD_LINE + rb")*)")
_REQUEST_LINE_ONLY = re.compile(_REQUEST_LINE + rb"(?:\r\n.*)?", re.DOTALL)
_DIGITS = re.compile(rb"[0-9]{1,18}")

# The few request headers tokend acts on; every other header is checked, then skipped.
_ACCEPT, _ACCEPT_ENCODING, _CONNECTION, _CONTENT_LENGTH, _TRANSFER_ENCODING, _HOST = range(6)
_WANTED_HEADERS = {
    b"accept": _ACCEPT,
    b"accept-encoding": _ACCEPT_ENCODING,
    b"connection": _CONNECTION,
    b"content-length": _CONTENT_LENGTH,
    b"transfer-encoding": _TRANSFER_ENCODING,
    b"host": _HOST,
}

# The largest request body tokend reads (a PUT carrying a refresh token).
MAX_BODY_BYTES = 16 * 1024

JSON_TYPE = b"application/json"
TEXT_TYPE = b"text/plain; charset=utf-8"

_REASONS = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
}
_STATUS_LINES = {
    code: f"HTTP/1.1 {code} {reason}\r\n".encode() for code, reason in _REASONS.items()
}


def encode_response(
    status: int,
    body: bytes,
    content_type: bytes = JSON_TYPE,
    headers: bytes = b"",
    *,
    close: bool = False,
) -> bytes:
    """A complete response. ``headers`` is zero or more pre-encoded ``Name: value\\r\\n``
    lines. Every response says ``no-store``: most of them describe or carry a token."""
    return b"".join(
        (
            _STATUS_LINES[status],
            b"Content-Type: ",
            content_type,
            b"\r\nContent-Length: %d\r\nCache-Control: no-store\r\n" % len(body),
            headers,
            b"Connection: close\r\n\r\n" if close else b"\r\n",
            body,
        )
    )


def json_response(
    status: int, payload: object, headers: bytes = b"", *, close: bool = False
) -> bytes:
    return encode_response(status, orjson.dumps(payload), JSON_TYPE, headers, close=close)


def error_response(status: int, error: str, *, close: bool = False, **fields: object) -> bytes:
    return json_response(status, {"error": error, **fields}, close=close)


class HttpError(Exception):
    """A request that cannot be served as sent; the connection is closed after the
    answer, since what follows it on the wire cannot be trusted to be framed right."""

    def __init__(self, status: int, error: str, detail: str | None = None) -> None:
        super().__init__(detail or error)
        self.status = status
        self.response = (
            error_response(status, error, close=True, detail=detail)
            if detail
            else error_response(status, error, close=True)
        )


@dataclass(slots=True)
class Request:
    """What tokend needs from a request head.

    One object stands for every request with the same head bytes (see
    :class:`HttpListener`): treat the fields as read-only. ``memo`` belongs to the
    handler, for what it derives from the request alone (the route, say), so that a
    client repeating a request costs neither a parse nor a routing decision."""

    method: bytes
    path: bytes
    query: bytes | None
    accept: bytes | None
    accept_encoding: bytes | None
    keep_alive: bool
    # Bytes of body that follow the head (PUT only; else 0).
    content_length: int = 0
    memo: object = None


def parse_head(head: bytes) -> Request:
    """Parse a request head (without its final blank line) or raise :class:`HttpError`."""
    match = _HEAD.fullmatch(head)
    if match is None:
        if _REQUEST_LINE_ONLY.fullmatch(head) is None:
            raise HttpError(400, "bad_request", "malformed request line")
        raise HttpError(400, "bad_request", "malformed header line")
    method, target, minor, fields = match.groups()
    accept: bytes | None = None
    accept_encoding: bytes | None = None
    close = False
    keep_alive_asked = False
    host_seen = False
    content_length: int | None = None
    # fields starts with CRLF: the first piece is empty and skipped by the lookup.
    for line in fields.split(b"\r\n") if fields else ():
        name, _, value = line.partition(b":")
        kind = _WANTED_HEADERS.get(name.lower())
        if kind is None:
            continue
        value = value.strip(b" \t")
        if kind == _ACCEPT:
            accept = value
        elif kind == _ACCEPT_ENCODING:
            accept_encoding = value
        elif kind == _CONNECTION:
            for option in value.lower().split(b","):
                option = option.strip(b" \t")
                if option == b"close":
                    close = True
                elif option == b"keep-alive":
                    keep_alive_asked = True
        elif kind == _CONTENT_LENGTH:
            if _DIGITS.fullmatch(value) is None:
                raise HttpError(400, "bad_request", "invalid Content-Length")
            if content_length is not None:
                # Two lengths frame the same bytes two ways (RFC 9112 6.3).
                raise HttpError(400, "bad_request", "more than one Content-Length header")
            content_length = int(value)
            if content_length and method != b"PUT":
                raise HttpError(413, "body_not_allowed", "requests to tokend carry no body")
            if content_length > MAX_BODY_BYTES:
                raise HttpError(413, "body_too_large", f"at most {MAX_BODY_BYTES} bytes")
        elif kind == _HOST:
            # Two Hosts is a request meant to be read differently by different servers
            # (RFC 9112 3.2). A missing Host is tolerated: on a unix socket there is no
            # host to name, and a client that leaves it out is not ambiguous.
            if host_seen:
                raise HttpError(400, "bad_request", "more than one Host header")
            host_seen = True
        else:
            raise HttpError(413, "body_not_allowed", "requests to tokend carry no body")
    path, question, query = target.partition(b"?")
    # Positional: keyword arguments cost twice as much, on every request.
    return Request(
        method,
        path,
        query if question else None,
        accept,
        accept_encoding,
        not close and (minor == b"1" or keep_alive_asked),
        content_length or 0,
    )


class PushSink(Protocol):
    """What a :class:`Push` sends through: its connection."""

    def send(self, data: bytes) -> bool:
        """Write part of a streamed answer. False when the connection is gone (or was
        just cut off because its client does not read what it is sent)."""
        ...

    def finish(self, response: bytes | None) -> None:
        """End the push: send ``response`` as the complete answer and go on serving
        the connection, or (``None``) close the connection after what was sent."""
        ...


class Push(Protocol):
    """An answer sent when something happens rather than at once: a long-poll (one
    response, later) or an event stream (a head, then events). No task waits for it:
    whatever causes the answer calls the sink, so a thousand waiting connections
    cost no task wake-ups when they are answered."""

    # When (monotonic seconds) ``on_deadline`` is to be called, unless finished.
    deadline: float

    def attach(self, sink: PushSink) -> None:
        """Start: the connection is ready to send (this may already finish)."""
        ...

    def on_deadline(self) -> None:
        """``deadline`` has come: finish, or send something and move ``deadline``."""
        ...

    def detach(self) -> None:
        """The push is over (finished, or the connection is gone): stop calling the
        sink and let go of what it holds. Called exactly once."""
        ...


Reply = bytes | Coroutine[Any, Any, bytes] | Push
# Answers a request (with its body, empty but for a PUT): the response at once, a
# coroutine producing it (run in the connection's task; it must bound its own
# waiting), or a push.
Handler = Callable[[Request, PeerCred | None, bytes], Reply]


@dataclass(frozen=True, slots=True)
class Limits:
    max_connections: int
    # Longest a connection may sit between requests, and the longest a request head
    # may take to arrive completely (a slow client's trickle does not extend it).
    idle_timeout: float
    max_header_bytes: int


# Parsed heads kept per listener, by their bytes: an application polling its token
# sends the same head again and again. Bounded, and emptied when full, so a client
# sending endless distinct heads only costs itself the parse.
_PARSED_MAX_ENTRIES = 512
_PARSED_MAX_HEAD = 2048

_OVERLOADED = error_response(503, "overloaded", close=True)
_REQUEST_TIMEOUT = error_response(408, "request_timeout", close=True)
_INTERNAL_ERROR = error_response(500, "internal_error", close=True)
_HEADERS_TOO_LARGE = error_response(431, "headers_too_large", close=True)
# accept() failures that say "not now" (out of descriptors or memory), not "broken".
_ACCEPT_BACKOFF = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_ACCEPT_SKIP = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM}
# Connections taken per readiness callback before the loop runs anything else.
_ACCEPT_BATCH = 64
# Answers buffered per connection before tokend stops reading that connection's
# requests (asyncio's pause_writing threshold), and where it starts again.
_WRITE_HIGH_WATER = 64 * 1024
_WRITE_LOW_WATER = 16 * 1024
# Unanswered request bytes a connection may hold while its answers are not being
# read, beyond one request head. A client that pipelines more than this without
# reading is not waiting for answers: it is filling tokend's memory, and is cut off.
_MAX_HELD_INPUT = 64 * 1024
_DROP_LOG_INTERVAL = 10.0


class HttpListener:
    """Serves HTTP/1.1 on a listening socket with ``handler``, within ``limits``."""

    def __init__(
        self,
        sock: socket.socket,
        handler: Handler,
        limits: Limits,
        *,
        on_error: Callable[[int], None] = lambda status: None,
        with_peer_credentials: bool = False,
    ) -> None:
        self.sock = sock
        self.handler = handler
        self.limits = limits
        # Told the status of every answer the connection layer gives by itself
        # (malformed or oversized requests, timeouts, overload, internal errors).
        self.on_error = on_error
        self._with_peer_credentials = with_peer_credentials
        self.active = 0
        self._refusing = False
        self.parsed: dict[bytes, Request] = {}
        self._dropped = 0
        self._drop_logged_at = -_DROP_LOG_INTERVAL

    async def serve(self) -> None:
        """Accept connections until cancelled; each is served in a child task.

        Accepting is a reader callback on the listening socket that takes every
        pending connection at once (as asyncio's own servers do): ``sock_accept``
        costs a future and an epoll registration and removal per connection."""
        loop = asyncio.get_running_loop()
        self.sock.setblocking(False)
        fd = self.sock.fileno()
        failed: list[OSError] = []
        retry: list[asyncio.TimerHandle] = []
        async with anyio.create_task_group() as group:

            def accept() -> None:
                for _ in range(_ACCEPT_BATCH):
                    try:
                        conn, _ = self.sock.accept()
                        conn.setblocking(False)
                    except BlockingIOError:
                        return
                    except OSError as exc:
                        if exc.errno in _ACCEPT_SKIP:
                            continue
                        if exc.errno in _ACCEPT_BACKOFF:
                            _log.error("accept_failed", error=exc.strerror, retry_in_s=0.5)
                            loop.remove_reader(fd)
                            retry[:] = [loop.call_later(0.5, loop.add_reader, fd, accept)]
                            return
                        failed.append(exc)
                        wake.set()
                        return
                    if self.active >= self.limits.max_connections:
                        self._refuse(conn)
                        continue
                    self._refusing = False
                    self.active += 1
                    group.start_soon(self._serve_connection, conn)

            wake = anyio.Event()
            loop.add_reader(fd, accept)
            try:
                await wake.wait()
                raise failed[0]
            finally:
                for handle in retry:
                    handle.cancel()
                loop.remove_reader(fd)

    def note_dropped(self, reason: str, held_input: int, held_output: int) -> None:
        """Log connections cut off for not reading their answers, at most once per
        ``_DROP_LOG_INTERVAL`` (a client reconnecting in a loop must not flood the log)."""
        self._dropped += 1
        now = _monotonic()
        if now - self._drop_logged_at >= _DROP_LOG_INTERVAL:
            self._drop_logged_at = now
            _log.warning(
                "connection_dropped",
                reason=reason,
                held_input_bytes=held_input,
                held_output_bytes=held_output,
                dropped_since_last_log=self._dropped,
            )
            self._dropped = 0

    def _refuse(self, conn: socket.socket) -> None:
        if not self._refusing:
            self._refusing = True
            _log.warning("connection_limit_reached", max_connections=self.limits.max_connections)
        self.on_error(503)
        try:
            conn.setblocking(False)
            conn.send(_OVERLOADED)
        except OSError:
            pass
        finally:
            conn.close()

    async def _serve_connection(self, conn: socket.socket) -> None:
        try:
            try:
                peer = peer_credentials(conn) if self._with_peer_credentials else None
                protocol = _Connection(self, peer)
                await asyncio.get_running_loop().connect_accepted_socket(lambda: protocol, conn)
            except OSError:
                conn.close()
                return  # the peer went away while the connection was being set up
            except BaseException:
                conn.close()
                raise
            await protocol.run()
        finally:
            self.active -= 1


class _Connection(asyncio.Protocol):
    """One client connection: parses request heads as bytes arrive and answers them
    in order. ``run`` (the connection's task) performs the answers that must wait,
    and enforces the idle and head-read deadline."""

    # Slots: a connection waiting for a token change is one of thousands.
    __slots__ = (
        "_attaching",
        "_body_for",
        "_buffer",
        "_busy",
        "_closed",
        "_deadline",
        "_eof",
        "_handler",
        "_idle_timeout",
        "_job",
        "_job_keep_alive",
        "_job_scope",
        "_listener",
        "_max_head",
        "_on_error",
        "_parsed",
        "_peer",
        "_push",
        "_push_keep_alive",
        "_scan_from",
        "_transport",
        "_wake",
        "_write_paused",
    )

    def __init__(self, listener: HttpListener, peer: PeerCred | None) -> None:
        self._listener = listener
        self._handler = listener.handler
        self._parsed = listener.parsed
        self._on_error = listener.on_error
        self._idle_timeout = listener.limits.idle_timeout
        self._max_head = listener.limits.max_header_bytes
        self._peer = peer
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        # Where to resume looking for the end of a head that arrives in pieces, so a
        # trickling client costs linear work, not quadratic.
        self._scan_from = 0
        self._deadline = _monotonic() + self._idle_timeout
        self._job: Coroutine[Any, Any, bytes] | None = None
        self._job_keep_alive = True
        self._job_scope: anyio.CancelScope | None = None
        self._busy = False
        # A request whose body is still arriving (the connection is busy meanwhile).
        self._body_for: Request | None = None
        self._closed = False
        self._eof = False
        self._write_paused = False
        self._wake: anyio.Event | None = None
        self._push: Push | None = None
        self._push_keep_alive = True
        self._attaching = False

    # -- asyncio callbacks ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        transport.set_write_buffer_limits(_WRITE_HIGH_WATER, _WRITE_LOW_WATER)

    def data_received(self, data: bytes) -> None:
        if not (self._buffer or self._busy or self._write_paused or self._closed):
            # The usual case: exactly one whole request head in one read. Answer it
            # straight from ``data``, without copying it through the buffer.
            end = data.find(b"\r\n\r\n")
            if 0 < end == len(data) - 4 and end + 4 <= self._max_head and data[0] != 13:
                self._answer(data[:end])
                if self._eof and not self._busy:
                    self._close()
                return
        self._buffer += data
        if self._body_for is not None:
            if self._take_body() and not (self._busy or self._write_paused):
                self._process()
        elif not (self._busy or self._write_paused):
            self._process()
        elif not self._closed:
            # Reading is paused, but these bytes were read before it was: the limits
            # on what a connection may hold apply while nothing is being answered.
            self._check_held()

    def eof_received(self) -> bool:
        # A client may half-close after its last request: answer what it sent, then close.
        self._eof = True
        if self._body_for is not None:
            self._close()  # the body it announced will never come
            return True
        if self._push is not None:
            # Nobody waits any more (a client does not half-close to wait for events).
            self._end_push()
            self._close()
            return True
        if not self._busy:
            self._process()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._job_scope is not None:
            self._job_scope.cancel()
        self._end_push()
        self._notify()

    def pause_writing(self) -> None:
        # The client is not reading its answers: stop reading its requests, so what
        # it keeps sending waits in the kernel's socket buffers (bounded) and then
        # blocks the client, instead of growing tokend's buffers.
        self._write_paused = True
        if self._push is not None:
            # An event stream nobody reads: what comes next would only pile up.
            self._drop("events_not_read")
            return
        if self._transport is not None and not self._closed:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if not (self._busy or self._closed):
            assert self._transport is not None
            self._transport.resume_reading()
            self._process()

    # -- requests --------------------------------------------------------------------------

    def _process(self) -> None:
        buffer = self._buffer
        while not (self._busy or self._closed or self._write_paused):
            if buffer.startswith(b"\r\n"):
                # Blank lines before a request line are allowed (RFC 9112 2.2).
                del buffer[:2]
                self._scan_from = 0
                continue
            if not buffer:
                break
            end = buffer.find(b"\r\n\r\n", self._scan_from)
            if end < 0:
                if len(buffer) > self._max_head:
                    self._fail(_HEADERS_TOO_LARGE, 431)
                    return
                self._scan_from = max(0, len(buffer) - 3)
                break
            self._scan_from = 0
            if end + 4 > self._max_head:
                self._fail(_HEADERS_TOO_LARGE, 431)
                return
            head = bytes(buffer[:end])
            del buffer[: end + 4]
            self._answer(head)
        if self._eof and not self._busy:
            self._close()

    def _check_held(self) -> None:
        """Enforce, while nothing is answered, the limits ``_process`` enforces as it
        answers: a head no longer than the limit, and no more held input than
        ``_MAX_HELD_INPUT`` beyond one head."""
        buffer = self._buffer
        start = 0
        while buffer.startswith(b"\r\n", start):
            start += 2
        if len(buffer) - start > self._max_head and (
            buffer.find(b"\r\n\r\n", start, start + self._max_head) < 0
        ):
            self._fail(_HEADERS_TOO_LARGE, 431)
        elif len(buffer) > self._max_head + _MAX_HELD_INPUT:
            self._drop("pipelined_input_limit")

    def _answer(self, head: bytes) -> None:
        request = self._parsed.get(head)
        if request is None:
            try:
                request = parse_head(head)
            except HttpError as exc:
                self._fail(exc.response, exc.status)
                return
            if len(head) <= _PARSED_MAX_HEAD:
                if len(self._parsed) >= _PARSED_MAX_ENTRIES:
                    self._parsed.clear()
                self._parsed[head] = request
        if request.content_length:
            self._body_for = request
            self._busy = True
            self._deadline = _monotonic() + self._idle_timeout
            self._take_body()
            return
        self._dispatch(request, b"")

    def _take_body(self) -> bool:
        """Answer the request waiting for its body if the body is all there (True)."""
        request = self._body_for
        assert request is not None
        buffer = self._buffer
        if len(buffer) < request.content_length:
            return False
        body = bytes(buffer[: request.content_length])
        del buffer[: request.content_length]
        self._body_for = None
        self._busy = False
        self._dispatch(request, body)
        return True

    def _dispatch(self, request: Request, body: bytes) -> None:
        try:
            reply = self._handler(request, self._peer, body)
        except Exception:
            _log.exception("request_failed")
            self._fail(_INTERNAL_ERROR, 500)
            return
        if isinstance(reply, bytes):
            self._send(reply, request.keep_alive)
            return
        self._busy = True
        assert self._transport is not None
        if isinstance(reply, Coroutine):
            self._transport.pause_reading()
            self._job = reply
            self._job_keep_alive = request.keep_alive
            self._notify()
            return
        # Reading goes on while a push waits, so a client that leaves is noticed at
        # once (what it sends meanwhile is held within the usual limits).
        self._push = reply
        self._push_keep_alive = request.keep_alive
        self._deadline = reply.deadline
        # The task sleeps toward the idle deadline: let it look at the push's.
        self._notify()
        self._attaching = True
        try:
            reply.attach(self)
        except Exception:
            _log.exception("request_failed")
            self._end_push()
            self._fail(_INTERNAL_ERROR, 500)
        finally:
            self._attaching = False

    # -- pushes (PushSink) ----------------------------------------------------------------

    def send(self, data: bytes) -> bool:
        if self._closed or self._push is None:
            return False
        assert self._transport is not None
        self._transport.write(data)
        # pause_writing (called from write past the high-water mark) may have cut
        # the connection off.
        return not self._closed

    def finish(self, response: bytes | None) -> None:
        if self._push is None:
            return
        self._end_push()
        if self._closed:
            return
        if response is None:
            self._close()
            return
        self._busy = False
        self._send(response, self._push_keep_alive)
        self._notify()
        if not (self._closed or self._write_paused):
            assert self._transport is not None
            self._transport.resume_reading()
            # Answered at once (inside attach): the request loop that called attach
            # goes on by itself; calling it here would nest one call per request.
            if not self._attaching:
                self._process()

    def _end_push(self) -> None:
        push, self._push = self._push, None
        if push is not None:
            try:
                push.detach()
            except Exception:
                _log.exception("request_failed")

    def _send(self, data: bytes, keep_alive: bool) -> None:
        assert self._transport is not None
        self._transport.write(data)
        if keep_alive:
            self._deadline = _monotonic() + self._idle_timeout
        else:
            self._close()

    def _fail(self, response: bytes, status: int) -> None:
        self._on_error(status)
        transport = self._transport
        if self._write_paused:
            # The client does not read: the answer would only wait in a buffer.
            self._drop("answers_not_read")
            return
        if transport is not None and not transport.is_closing():
            transport.write(response)
        self._close()

    def _drop(self, reason: str) -> None:
        """Cut off a client that sends without reading: no answer, nothing kept."""
        if not self._closed:
            transport = self._transport
            held_output = transport.get_write_buffer_size() if transport is not None else 0
            self._listener.note_dropped(reason, len(self._buffer), held_output)
            self._on_error(429)
        self._buffer.clear()
        self._closed = True
        if self._transport is not None:
            self._transport.abort()
        self._notify()

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._transport is not None:
                self._transport.close()
        self._notify()

    def _notify(self) -> None:
        if self._wake is not None:
            self._wake.set()

    # -- the connection's task ------------------------------------------------------------

    async def run(self) -> None:
        try:
            while not self._closed:
                job = self._job
                if job is not None:
                    self._job = None
                    await self._run_job(job)
                    continue
                push = self._push
                if push is not None:
                    self._deadline = push.deadline
                delay = self._deadline - _monotonic()
                if delay <= 0:
                    if push is not None:
                        try:
                            push.on_deadline()
                        except Exception:
                            _log.exception("request_failed")
                            self._end_push()
                            self._fail(_INTERNAL_ERROR, 500)
                        continue
                    self._expire()
                    break
                self._wake = wake = anyio.Event()
                with anyio.move_on_after(delay):
                    await wake.wait()
                self._wake = None
        finally:
            if self._job is not None:
                self._job.close()
                self._job = None
            self._closed = True
            self._end_push()
            transport = self._transport
            if transport is not None:
                if not transport.is_closing():
                    transport.close()
                if transport.get_write_buffer_size():
                    # close() waits for the client to read what is still buffered; a
                    # client that never does must not keep that memory forever.
                    asyncio.get_running_loop().call_later(self._idle_timeout, transport.abort)

    async def _run_job(self, job: Coroutine[Any, Any, bytes]) -> None:
        reply: bytes | None = None
        # connection_lost cancels this scope: nobody would read the answer.
        with anyio.CancelScope() as self._job_scope:
            try:
                reply = await job
            except Exception:
                _log.exception("request_failed")
                self._fail(_INTERNAL_ERROR, 500)
                return
            finally:
                self._job_scope = None
        if reply is None or self._closed:
            return
        self._busy = False
        self._send(reply, self._job_keep_alive)
        if not (self._closed or self._write_paused):
            assert self._transport is not None
            self._transport.resume_reading()
            self._process()

    def _expire(self) -> None:
        if self._write_paused:
            # Answers are stuck in a buffer the client does not drain: drop them.
            self._drop("answers_not_read")
        elif self._buffer.strip(b"\r\n"):
            self._fail(_REQUEST_TIMEOUT, 408)
        else:
            self._close()
