from __future__ import annotations

import errno

import pytest

from daemon.host.unavailable import Reason, from_os_error


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (errno.ENOENT, Reason.NO_PROCESS),
        (errno.ESRCH, Reason.NO_PROCESS),
        (errno.EACCES, Reason.NO_PERMISSION),
        (errno.EPERM, Reason.NO_PERMISSION),
        (errno.ENOTTY, Reason.UNSUPPORTED),
        (errno.EIO, Reason.IO_ERROR),
    ],
)
def test_os_errors_become_reasons(code: int, reason: Reason) -> None:
    u = from_os_error(OSError(code, "x"), "/proc/1/pagemap")
    assert u.reason is reason
    assert u.detail.startswith("/proc/1/pagemap: ")
    assert str(u).startswith(f"{reason}: ")
