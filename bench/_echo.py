"""The reference server: a plain asyncio unix-socket server answering every request
head (up to the blank line) with a fixed 1 KB HTTP response. No parsing, no routing:
the floor any Python asyncio HTTP server on this machine can reach.

Run as ``python -m bench._echo SOCKET_PATH``; prints ``READY`` once listening and
serves until SIGTERM.
"""

from __future__ import annotations

import asyncio
import signal
import sys

BODY = b"x" * (1024 - 100)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(BODY)
    + BODY
)


class Echo(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        buffer = self.buffer + data
        count = buffer.count(b"\r\n\r\n")
        if count:
            self.transport.write(RESPONSE * count)
            buffer = buffer[buffer.rfind(b"\r\n\r\n") + 4 :]
            if b"Connection: close" in data:
                self.transport.close()
        self.buffer = buffer


async def main(path: str) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_unix_server(Echo, path, backlog=1024)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    print("READY", flush=True)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
