"""Errors of reclaimd's QMP layer.

::

    QMPSessionError
     +-- ConnectFailed        could not connect or negotiate (cause kept in __cause__)
     +-- CommandTimeout       a command got no reply in time: the monitor is hung
     +-- CommandFailed        QEMU answered with an error (error class and description kept)
     +-- SessionLost          the connection dropped, or the peer broke the protocol
     +-- BadReply             QEMU answered with a reply of the wrong shape

    TransitionError           a session was asked for a state change its table forbids (a bug)

A ``QMPSessionError`` is trouble with one VM's monitor: its session records the cause and goes on.
``TransitionError`` is not one of them, so that no handler of VM trouble can hide a bug.
``asyncio.CancelledError`` is never wrapped or swallowed.
"""

from __future__ import annotations

from daemon.untrusted import one_line

#: Bounds of what QEMU's error replies put in a message: they are the peer's text.
MAX_ERROR_CLASS = 64
MAX_DESCRIPTION = 400


class QMPSessionError(Exception):
    """Base of every error the QMP layer raises for trouble with a VM's monitor."""


class ConnectFailed(QMPSessionError):
    """Connecting to, or negotiating with, a QMP server failed."""


class CommandTimeout(QMPSessionError):
    """A command got no reply within its timeout."""

    def __init__(self, command: str, timeout: float) -> None:
        super().__init__(f"{command}: no reply within {timeout:g} s (monitor hung?)")
        self.command = command
        self.timeout = timeout


class CommandFailed(QMPSessionError):
    """QEMU replied with an error to a command."""

    def __init__(self, command: str, error_class: str, description: str) -> None:
        error_class = one_line(str(error_class), MAX_ERROR_CLASS)
        description = one_line(str(description), MAX_DESCRIPTION)
        super().__init__(f"{command}: {error_class}: {description}")
        self.command = command
        self.error_class = error_class
        self.description = description


class SessionLost(QMPSessionError):
    """The QMP connection is gone or unusable (hang-up, malformed data, protocol violation)."""


class BadReply(QMPSessionError):
    """QEMU answered with a reply of the wrong shape."""


class TransitionError(RuntimeError):
    """A session state change that its transition table does not allow."""
