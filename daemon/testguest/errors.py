"""Errors of the test guest's builder and launcher.

::

    GuestError
     +-- GuestBuildError      a tool or package the build needs is missing, or a step failed
     +-- GuestLaunchError     QEMU could not be started, or its sockets never appeared
     +-- GuestExitedError     QEMU exited while someone waited on it (exit code and log tail kept)
     +-- GuestTimeoutError    the console never showed what was awaited (log tail kept)
     +-- ControlError         the control channel broke, timed out, or the guest answered ERR
"""

from __future__ import annotations


class GuestError(Exception):
    """Base of every error the test guest package raises."""


class GuestBuildError(GuestError):
    """Building the guest image failed; the message says what to install or fix."""


class GuestLaunchError(GuestError):
    """QEMU could not be started or did not come up."""


class GuestExitedError(GuestError):
    """QEMU exited while a caller was waiting on the guest."""

    def __init__(self, message: str, returncode: int | None) -> None:
        super().__init__(message)
        self.returncode = returncode


class GuestTimeoutError(GuestError, TimeoutError):
    """The guest did not reach the awaited state in time."""


class ControlError(GuestError):
    """The control channel failed: no connection, no reply in time, or an ``ERR`` reply."""

    def __init__(self, message: str, reply: str | None = None) -> None:
        super().__init__(message)
        self.reply = reply
