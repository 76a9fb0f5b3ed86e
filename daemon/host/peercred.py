"""Who is at the other end of a QMP socket: SO_PEERCRED on a connected Unix socket.

``peer_pid(sock)`` is called by the QMP session on its connected socket: QEMU's pid is how the
host view finds its memory. ``peer_credentials(sock)`` adds the uid and gid, which listen mode
checks before it lets a process attach as a VM. Over TCP there are no peer credentials: the pid
must be configured (``VMConfig.pid``), and both return None. The kernel records the peer's
credentials at ``connect()``/``socketpair()`` time (the process that created the listening
socket, or that connected), so a peer cannot change them afterwards.
"""

from __future__ import annotations

import socket
import struct
from typing import NamedTuple

# struct ucred { pid_t pid; uid_t uid; gid_t gid; }
_UCRED = struct.Struct("iII")


class PeerCredentials(NamedTuple):
    pid: int | None  # None: the peer is in another pid namespace (the kernel reports 0)
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCredentials | None:
    """The credentials of the process at the other end of a connected Unix socket, else None
    (not AF_UNIX, not connected)."""
    if sock.family != socket.AF_UNIX:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return None
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCredentials(pid if pid > 0 else None, uid, gid)


def peer_pid(sock: socket.socket) -> int | None:
    """The pid of the process at the other end of a connected Unix socket, else None.

    None when the socket is not AF_UNIX, not connected, or the peer is in another pid namespace
    (the kernel then reports 0).
    """
    credentials = peer_credentials(sock)
    return credentials.pid if credentials is not None else None


def process_groups(pid: int) -> frozenset[int]:
    """The supplementary groups of process ``pid`` (``/proc/PID/status``); empty when it is
    gone or unreadable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return frozenset(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return frozenset()
