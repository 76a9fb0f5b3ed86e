"""Errors of reclaimd's QMP layer.

::

    QMPSessionError
     +-- ConnectFailed        could not connect or negotiate (cause kept in __cause__)
     +-- CommandTimeout       a command got no reply in time: the monitor is hung
     +-- CommandFailed        QEMU answered with an error (error class and description kept)
     +-- SessionLost          the connection dropped, or the peer broke the protocol

``asyncio.CancelledError`` is never wrapped or swallowed.
"""

from __future__ import annotations


class QMPSessionError(Exception):
    """Base of every error the QMP layer raises."""


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
        super().__init__(f"{command}: {error_class}: {description}")
        self.command = command
        self.error_class = error_class
        self.description = description


class SessionLost(QMPSessionError):
    """The QMP connection is gone or unusable (hang-up, malformed data, protocol violation)."""
