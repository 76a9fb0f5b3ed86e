"""Why the host view of a VM is missing: a typed value, never an exception that escapes.

Every reader in ``daemon.host`` returns either its result or an ``Unavailable`` that says what
went wrong in words an operator can act on. ``reason`` is a stable code for the API and metrics;
``detail`` is the human sentence.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from enum import StrEnum


class Reason(StrEnum):
    """Stable codes for a missing host view."""

    NO_PROCESS = "no_process"  # the QEMU pid is unknown, gone, or was reused
    NO_PERMISSION = "no_permission"  # /proc/PID/* refused us (another uid, no CAP_SYS_PTRACE)
    UNKNOWN_LAYOUT = "unknown_layout"  # no mapping matches a guest-RAM block
    AMBIGUOUS_LAYOUT = "ambiguous_layout"  # several mappings match and nothing tells them apart
    UNSUPPORTED = "unsupported"  # the kernel or the backend lacks what the method needs
    IO_ERROR = "io_error"  # any other failure reading /proc


@dataclass(frozen=True)
class Unavailable:
    """The host view could not be produced; ``detail`` says why."""

    reason: Reason
    detail: str

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


def from_os_error(exc: OSError, what: str) -> Unavailable:
    """Classify an OSError raised while reading ``what`` (a /proc path or an operation)."""
    if exc.errno in (errno.ENOENT, errno.ESRCH):
        return Unavailable(Reason.NO_PROCESS, f"{what}: the process is gone")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return Unavailable(
            Reason.NO_PERMISSION,
            f"{what}: permission denied (run as root, as QEMU's user, or with CAP_SYS_PTRACE)",
        )
    if exc.errno in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
        return Unavailable(Reason.UNSUPPORTED, f"{what}: {exc.strerror or exc}")
    return Unavailable(Reason.IO_ERROR, f"{what}: {exc.strerror or exc}")
