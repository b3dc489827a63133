"""What the benchmarks share: the result row, percentiles, starting tokend, the echo
server and the IdP as subprocesses, the load client, and reading /proc."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from bench._load import connect, exchange

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Options:
    quick: bool = False
    verbose: bool = False


@dataclass
class Row:
    """One line of the results table."""

    figure: str
    measured: str
    reference: str = "-"
    ratio: str = "-"
    goal: str = "-"
    met: bool | None = None
    notes: list[str] = field(default_factory=list)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f} ms" if seconds < 0.01 else f"{seconds * 1000:.1f} ms"


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0-100), linear between the closest ranks."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def log(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def workdir(name: str) -> Iterator[Path]:
    """A fresh temporary directory (short path: unix socket paths are limited)."""
    path = Path(tempfile.mkdtemp(prefix=f"tb-{name}-", dir="/tmp"))
    try:
        yield path
    finally:
        if os.environ.get("BENCH_KEEP"):
            log(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


# -- /proc -------------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` (all its threads) from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is the state (field 3); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def filesystem_of(path: Path) -> str:
    """The type of the filesystem holding ``path`` (from /proc/mounts), e.g. ext4."""
    best, kind = "", "unknown"
    with contextlib.suppress(OSError), open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            inside = len(fields) > 3 and os.fspath(path.resolve()).startswith(fields[1])
            if inside and len(fields[1]) > len(best):
                best, kind = fields[1], f"{fields[2]} ({fields[3].split(',')[0]}"
                kind += ", discard)" if "discard" in fields[3] else ")"
    return kind


def machine_facts() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = "unknown"
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    load = "unknown"
    with contextlib.suppress(OSError), open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    return {
        "tmpfs_type": filesystem_of(Path(tempfile.gettempdir())),
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "memory": mem,
        "python": sys.version.split()[0],
        "kernel": os.uname().release,
        "loadavg": load,
    }


# -- the raw HTTP client -------------------------------------------------------------------


def request_head(method: str, path: str, extra: str = "") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: tokend\r\n{extra}\r\n".encode()


def http(sock_path: Path | str, method: str, path: str, timeout: float = 30.0) -> tuple[int, bytes]:
    """One request on a new connection: (status, body)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(os.fspath(sock_path))
        response = exchange(sock, request_head(method, path, "Connection: close\r\n"))
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


_C_CLIENT: list[Path | None] = []


def c_client() -> Path | None:
    """bench/_load.c compiled (once per run), or None without a C compiler."""
    if not _C_CLIENT:
        compiler = shutil.which("cc") or shutil.which("gcc")
        built: Path | None = None
        if compiler is not None:
            directory = tempfile.mkdtemp(prefix="tb-cc-", dir="/tmp")
            atexit.register(shutil.rmtree, directory, ignore_errors=True)
            target = Path(directory) / "load"
            result = subprocess.run(
                [compiler, "-O2", "-o", os.fspath(target), os.fspath(ROOT / "bench" / "_load.c")],
                capture_output=True,
            )
            built = target if result.returncode == 0 else None
        _C_CLIENT.append(built)
    return _C_CLIENT[0]


def run_c_load(
    sock_path: Path | str, request: bytes, *, conns: int, duration: float
) -> subprocess.Popen[str]:
    client = c_client()
    assert client is not None
    args = [os.fspath(client), os.fspath(sock_path), str(conns), str(duration)]
    return subprocess.Popen([*args, request.decode("latin-1")], stdout=subprocess.PIPE, text=True)


def run_load(
    mode: str,
    sock_path: Path | str,
    request: bytes,
    *,
    conns: int = 1,
    count: int = 10**9,
    duration: float = 10.0,
    latencies: bool = False,
    start_at: float = 0.0,
) -> subprocess.Popen[str]:
    """Start the load client (bench/_load.py); ``load_result`` collects its output."""
    args = [
        PYTHON,
        "-m",
        "bench._load",
        mode,
        "--socket",
        os.fspath(sock_path),
        "--request",
        request.decode("latin-1").encode("unicode_escape").decode("ascii"),
        "--conns",
        str(conns),
        "--count",
        str(count),
        "--duration",
        str(duration),
        "--start-at",
        str(start_at),
    ]
    if latencies:
        args.append("--latencies")
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, text=True)


def load_result(proc: subprocess.Popen[str], timeout: float = 120.0) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"load client failed ({proc.returncode})")
    result: dict[str, Any] = json.loads(out)
    return result


def measure(mode: str, sock_path: Path | str, request: bytes, **kw: Any) -> dict[str, Any]:
    return load_result(run_load(mode, sock_path, request, **kw))


# -- processes ---------------------------------------------------------------------------


def wait_for(predicate: Any, timeout: float, interval: float = 0.002, what: str = "") -> float:
    """Poll ``predicate`` until true; returns the time it became true (perf_counter)."""
    deadline = time.perf_counter() + timeout
    while True:
        with contextlib.suppress(OSError, ValueError):
            if predicate():
                return time.perf_counter()
        if time.perf_counter() > deadline:
            raise TimeoutError(f"not within {timeout} s: {what}")
        time.sleep(interval)


def stop_process(proc: subprocess.Popen[Any], timeout: float = 15.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


class Echo:
    """The reference server (bench/_echo.py) on a unix socket in ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.socket = directory / "echo.sock"
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> Echo:
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "bench._echo", os.fspath(self.socket)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "READY":
            raise RuntimeError("echo server did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop_process(self.proc)


class Tokend:
    """``python -m tokend run -c CONFIG`` as a user would start it."""

    def __init__(self, config: Path, socket_path: Path | None) -> None:
        self.config = config
        self.socket = socket_path
        self.log_path = config.parent / "tokend.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Tokend:
        env = dict(os.environ)
        env.pop("TOKEND_CONFIG", None)
        with open(self.log_path, "ab") as logfile:
            self.started_at = time.perf_counter()
            self.proc = subprocess.Popen(
                [PYTHON, "-m", "tokend", "run", "-c", os.fspath(self.config)],
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=logfile,
                stderr=logfile,
                env=env,
            )
        return self

    def ready(self) -> bool:
        assert self.proc is not None and self.socket is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"tokend exited with {self.proc.returncode}:\n{self.log_tail()}")
        if not self.socket.exists():
            return False
        status, _ = http(self.socket, "GET", "/readyz")
        return status == 200

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Seconds from start until /readyz answered 200."""
        at = wait_for(self.ready, timeout, what="tokend ready")
        return at - self.started_at

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=30)

    def __enter__(self) -> Tokend:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def write_config(directory: Path, config: dict[str, Any]) -> Path:
    """Config files are written as JSON, which is YAML too."""
    path = directory / "config.yaml"
    path.write_text(json.dumps(config, indent=1) + "\n")
    return path


def serve_section(directory: Path, **extra: Any) -> dict[str, Any]:
    return {
        "socket": os.fspath(directory / "t.sock"),
        "token_dir": os.fspath(directory / "tokens"),
        "metrics_listen": None,
        **extra,
    }


def populate_store(
    db: Path, names: Sequence[str], *, token_bytes: int = 40, ttl: float = 3600
) -> None:
    """Store a valid access token for each of ``names`` (as a previous run would)."""
    from tokend.model import StoredAccount, TokenSet
    from tokend.store.sqlite import SqliteStore

    async def fill() -> None:
        store = SqliteStore(db)
        await store.open()
        try:
            now = time.time()
            pad = "x" * max(0, token_bytes - 12)
            records = [
                StoredAccount(
                    account=name,
                    token=TokenSet(f"at-{i:08d}{pad}", "Bearer", now + ttl, now, "read"),
                    updated_at=now,
                )
                for i, name in enumerate(names)
            ]
            for i in range(0, len(records), 10_000):
                await store.put_many(records[i : i + 10_000])
        finally:
            await store.close()

    anyio.run(fill)


# -- the IdP -------------------------------------------------------------------------------

IDP_CLIENTS = [
    {
        "client_id": client_id,
        "client_secret": secret,
        "token_endpoint_auth_method": "client_secret_basic",
        "grant_types": ["refresh_token", "authorization_code", "client_credentials"],
        "redirect_uris": ["http://127.0.0.1/cb"],
        "response_types": ["code"],
        "scope": "openid offline_access read write",
    }
    for client_id, secret in (("bench-a", "secret-a"), ("bench-b", "secret-b"))
]
SECRETS = {c["client_id"]: c["client_secret"] for c in IDP_CLIENTS}


def start_idp(directory: Path, access_token_ttl: int = 3600) -> Any:
    sys.path.insert(0, os.fspath(ROOT))
    from tests.idp_harness import IdP

    return IdP(directory, clients=IDP_CLIENTS, access_token_ttl=access_token_ttl).start()


def provider_section(idp: Any, client_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "token_endpoint": idp.token_endpoint,
        "client_id": client_id,
        "client_secret": SECRETS[client_id],
        **extra,
    }


def keepalive_client(sock_path: Path | str) -> socket.socket:
    return connect(os.fspath(sock_path))
