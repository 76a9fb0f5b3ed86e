"""Errors of the guest agent client, as a small tree. Every error carries a short human
``reason`` (one line, bounded, safe to show per VM) and a ``kind`` that names its branch.

::

    AgentError                  kind
     +-- AgentUnavailable       "absent"     no socket, nothing listening, or the connection dropped
     |    +-- ConnectionDropped              dropped under a command by an overlapping one's
     |                                       failure (that failure is the one to report)
     +-- AgentTimeout           "timeout"    no answer in time: qemu-ga not running in the guest,
     |                                       hung, or another client holds the socket
     +-- CommandBlocked         "blocked"    the agent does not offer the command, or it is
     |                                       disabled (``--block-rpcs``, the RHEL default for
     |                                       ``guest-file-*``)
     +-- CommandFailed          "failed"     the agent ran the command and answered an error
     |                                       (a missing file, a stale handle)
     +-- BadReply               "bad-reply"  the reply breaks the protocol: malformed, wrong
     |                                       shape, larger than the read limit
     +-- GuestDataRejected      "rejected"   the guest's file content failed validation

Everything in a reason may come from the guest: it is cut to one short printable line.
"""

from __future__ import annotations

from typing import ClassVar, Literal

ProblemKind = Literal["absent", "timeout", "blocked", "failed", "bad-reply", "rejected"]

MAX_REASON = 240

# qemu-ga's answer to a command it was built without or that --block-rpcs disabled; the
# disabled text is "Command NAME has been disabled" (qga/main.c, QEMU 7.2).
_BLOCKED_CLASS = "CommandNotFound"
_BLOCKED_TEXT = "has been disabled"


def one_line(text: str, limit: int = MAX_REASON) -> str:
    """``text`` as one printable line of at most ``limit`` characters."""
    flat = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


class AgentError(Exception):
    """Base of every error this package raises for agent or guest trouble."""

    kind: ClassVar[ProblemKind]

    def __init__(self, reason: str) -> None:
        self.reason = one_line(reason)
        super().__init__(self.reason)


class AgentUnavailable(AgentError):
    """No agent to talk to: the socket is missing or refuses, or the connection was lost."""

    kind = "absent"


class ConnectionDropped(AgentUnavailable):
    """The connection was dropped while a command waited, because an overlapping command
    failed; the overlapping command's error says why."""


class AgentTimeout(AgentError):
    """The agent did not answer within the time allowed."""

    kind = "timeout"


class CommandBlocked(AgentError):
    """The agent refuses the command: not offered, or disabled by its configuration."""

    kind = "blocked"

    def __init__(self, command: str, reason: str) -> None:
        super().__init__(reason)
        self.command = command


class CommandFailed(AgentError):
    """The agent answered the command with an error other than "blocked"."""

    kind = "failed"

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"{command}: {error_class}: {desc}")
        self.command = command
        self.error_class = one_line(error_class, 64)
        self.desc = one_line(desc)


class BadReply(AgentError):
    """The agent's reply does not follow the protocol."""

    kind = "bad-reply"


class GuestDataRejected(AgentError):
    """A file the guest handed over is not what that file can honestly contain.

    ``transient``: files that disagree with each other, which an honest guest can show for a
    moment (memory moved between two reads); worth one more read at once.
    """

    kind = "rejected"

    def __init__(self, reason: str, *, transient: bool = False) -> None:
        super().__init__(reason)
        self.transient = transient


def command_error(command: str, error_class: str, desc: str) -> CommandBlocked | CommandFailed:
    """The error for an agent's error reply: ``CommandBlocked`` for a command the agent does
    not have or has disabled, else ``CommandFailed``. Any transport (the socket, libvirt's
    ``virDomainQemuAgentCommand``) maps the agent's error class and text through here."""
    if error_class == _BLOCKED_CLASS or _BLOCKED_TEXT in desc:
        disabled = _BLOCKED_TEXT in desc
        why = "disabled in the agent (--block-rpcs)" if disabled else "not offered by the agent"
        return CommandBlocked(command, f"{command} is {why}")
    return CommandFailed(command, error_class, desc)
