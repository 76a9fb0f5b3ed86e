"""QEMU's pid from the QMP socket it serves: SO_PEERCRED on a connected Unix socket.

``peer_pid(sock)`` is called by the QMP session on its connected socket. Over TCP there are no
peer credentials: the pid must be configured (``VMConfig.pid``), and ``peer_pid`` returns None.
The kernel records the peer's credentials at ``connect()``/``socketpair()`` time, so the answer
is the process that created the listening socket (QEMU), even if it has since forked.
"""

from __future__ import annotations

import socket
import struct

# struct ucred { pid_t pid; uid_t uid; gid_t gid; }
_UCRED = struct.Struct("iII")


def peer_pid(sock: socket.socket) -> int | None:
    """The pid of the process at the other end of a connected Unix socket, else None.

    None when the socket is not AF_UNIX, not connected, or the peer is in another pid namespace
    (the kernel then reports 0).
    """
    if sock.family != socket.AF_UNIX:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return None
    pid, _uid, _gid = _UCRED.unpack(raw)
    return pid if pid > 0 else None
