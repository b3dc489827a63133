"""The load client: raw sockets, no HTTP library, so it is never the bottleneck.

Run as a subprocess (``python -m bench._load ...``) so that its work does not share
a GIL with whatever the orchestrating process does. Prints one JSON object: the
number of requests, the time they took, the client's own CPU time, the number of
non-200 answers and, with ``--latencies``, each request's start time
(``time.monotonic``, comparable across processes) and latency in seconds.

Modes:

``keepalive``  ``--conns N`` keep-alive connections, each sending its next request
               as soon as the previous answer is complete (closed loop), for
               ``--count`` requests or ``--duration`` seconds, whichever is first.
``newconn``    a new connection per request (connect, send, read to the end, close).
"""

from __future__ import annotations

import argparse
import json
import resource
import select
import socket
import sys
import time

_monotonic = time.monotonic
_perf = time.perf_counter


def response_end(data: bytes | bytearray) -> int:
    """The length of the first complete response in ``data``, or -1 if incomplete."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return -1
    i = data.find(b"Content-Length: ", 0, end)
    length = int(data[i + 16 : data.index(b"\r\n", i)]) if i >= 0 else 0
    total = end + 4 + length
    return total if len(data) >= total else -1


def exchange(sock: socket.socket, request: bytes) -> bytes:
    """Send ``request`` on a blocking socket and return the whole response."""
    sock.sendall(request)
    data = sock.recv(65536)
    while True:
        total = response_end(data)
        if total >= 0:
            return data[:total]
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("connection closed mid-response")
        data += chunk


def connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    return sock


def run_newconn(path: str, request: bytes, count: int, duration: float, record: bool) -> dict:
    starts: list[float] = []
    lats: list[float] = []
    bad = 0
    n = 0
    t0 = _perf()
    deadline = t0 + duration
    while n < count and _perf() < deadline:
        started = _monotonic()
        s0 = _perf()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        response = exchange(sock, request)
        sock.close()
        lat = _perf() - s0
        if not response.startswith(b"HTTP/1.1 200"):
            bad += 1
        if record:
            starts.append(started)
            lats.append(lat)
        n += 1
    return {"n": n, "elapsed": _perf() - t0, "bad": bad, "starts": starts, "lats": lats}


def run_single(path: str, request: bytes, count: int, duration: float, record: bool) -> dict:
    sock = connect(path)
    exchange(sock, request)  # warm the connection (and the server's parse cache)
    starts: list[float] = []
    lats: list[float] = []
    bad = 0
    n = 0
    t0 = _perf()
    deadline = t0 + duration
    while n < count:
        if n % 64 == 0 and _perf() > deadline:
            break
        s0 = _perf()
        response = exchange(sock, request)
        lat = _perf() - s0
        if not response.startswith(b"HTTP/1.1 200"):
            bad += 1
        if record:
            starts.append(s0)
            lats.append(lat)
        n += 1
    elapsed = _perf() - t0
    sock.close()
    # perf_counter and monotonic are the same clock on Linux; say so explicitly.
    offset = _monotonic() - _perf()
    return {
        "n": n,
        "elapsed": elapsed,
        "bad": bad,
        "starts": [s + offset for s in starts],
        "lats": lats,
    }


def run_many(path: str, request: bytes, conns: int, count: int, duration: float) -> dict:
    socks = [connect(path) for _ in range(conns)]
    for sock in socks:
        exchange(sock, request)
        sock.setblocking(False)
    by_fd = {sock.fileno(): sock for sock in socks}
    buffers = {fd: b"" for fd in by_fd}
    poller = select.epoll()
    for fd in by_fd:
        poller.register(fd, select.EPOLLIN)
    n = bad = 0
    t0 = _perf()
    deadline = t0 + duration
    stopping = False
    outstanding = conns
    for sock in socks:
        sock.send(request)
    while outstanding:
        for fd, _ in poller.poll(1.0):
            sock = by_fd[fd]
            data = buffers[fd] + sock.recv(65536)
            total = response_end(data)
            if total < 0:
                buffers[fd] = data
                continue
            if not data.startswith(b"HTTP/1.1 200"):
                bad += 1
            buffers[fd] = data[total:]
            n += 1
            if not stopping and (n >= count or (n & 255 == 0 and _perf() > deadline)):
                stopping = True
                elapsed = _perf() - t0
                done = n
            if stopping:
                outstanding -= 1
            else:
                sock.send(request)
        if _perf() > deadline + 5:
            break
    if not stopping:
        elapsed, done = _perf() - t0, n
    for sock in socks:
        sock.close()
    return {"n": done, "elapsed": elapsed, "bad": bad, "starts": [], "lats": []}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["keepalive", "newconn"])
    parser.add_argument("--socket", required=True)
    parser.add_argument("--request", required=True, help="the request head, with \\r\\n escapes")
    parser.add_argument("--conns", type=int, default=1)
    parser.add_argument("--count", type=int, default=10**9)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--latencies", action="store_true")
    parser.add_argument("--start-at", type=float, default=0.0, help="monotonic time to begin")
    args = parser.parse_args(argv)
    request = args.request.encode().decode("unicode_escape").encode("latin-1")
    wait = args.start_at - _monotonic()
    if wait > 0:
        time.sleep(wait)
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    if args.mode == "newconn":
        result = run_newconn(args.socket, request, args.count, args.duration, args.latencies)
    elif args.conns == 1:
        result = run_single(args.socket, request, args.count, args.duration, args.latencies)
    else:
        result = run_many(args.socket, request, args.conns, args.count, args.duration)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    result["cpu"] = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
