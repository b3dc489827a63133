"""HTTP plumbing shared by discovery and token requests: a size-capped body read and a
record of how far a request got before it failed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

from tokend._version import __version__
from tokend.oauth._parse import MAX_BODY_BYTES

DEFAULT_USER_AGENT = f"tokend/{__version__}"


@dataclass(frozen=True, slots=True)
class RawResponse:
    status: int
    headers: httpx.Headers
    body: bytes
    # True when the body was longer than the cap and was cut there.
    truncated: bool


async def read_capped(response: httpx.Response, limit: int = MAX_BODY_BYTES) -> RawResponse:
    """Read at most ``limit`` bytes of a streamed response body, then stop reading."""
    body = bytearray()
    truncated = False
    async for chunk in response.aiter_bytes():
        room = limit - len(body)
        if len(chunk) > room:
            body += chunk[:room]
            truncated = True
            break
        body += chunk
    return RawResponse(response.status_code, response.headers, bytes(body), truncated)


class RequestProgress:
    """Watches httpcore's trace events to learn whether a request reached the wire.

    A total-deadline timeout interrupts a request at an unknown point; this tells a
    timeout while connecting (the refresh token was not spent) from one while waiting
    for the answer (it may have been). ``sent`` stays None when the transport emits no
    trace events (a custom transport), and the caller must then assume the worst.
    """

    __slots__ = ("sent",)

    def __init__(self) -> None:
        self.sent: bool | None = None

    async def trace(self, event: str, info: dict[str, Any]) -> None:
        if event.endswith(".send_request_headers.started"):
            self.sent = True
        elif self.sent is None:
            self.sent = False

    @property
    def extensions(self) -> dict[str, Any]:
        return {"trace": self.trace}
