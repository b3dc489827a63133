"""Who is on the other end of a unix socket: the kernel's record (``SO_PEERCRED``).

The credentials are those of the process that called ``connect()``, taken at that
moment; a process cannot forge them, and they do not change if it later passes the
connection on. uid 0 gets no special treatment anywhere in tokend.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

# struct ucred { pid_t pid; uid_t uid; gid_t gid; }: a signed and two unsigned 32-bit ints.
_UCRED = struct.Struct("iII")


@dataclass(frozen=True, slots=True)
class PeerCred:
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCred | None:
    """The connecting process's pid, uid and primary gid, or ``None`` where the
    platform or socket family has no such record (then no ACL can be satisfied)."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None or sock.family != socket.AF_UNIX:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, option, _UCRED.size)
    except OSError:
        return None
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCred(pid=pid, uid=uid, gid=gid)
