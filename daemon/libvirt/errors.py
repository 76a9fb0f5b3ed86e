"""Errors of reclaimd's libvirt layer, and how the binding's ``libvirtError`` maps onto them.

::

    LibvirtSourceError
     +-- NotConnected           no usable connection to libvirtd (not yet, lost, or closed)
     +-- CallTimeout            a call did not return in time (libvirtd or a domain's monitor hung)
     +-- BadReply               libvirt answered with something of the wrong shape
     +-- CallFailed             libvirt answered with an error (code, domain and message kept)
          +-- DomainNotFound       no such domain: undefined, or a transient one that stopped
          +-- DomainNotRunning     the call needs a running domain
          +-- Unsupported          this libvirt, driver or domain cannot do it (e.g. no balloon)
          +-- PermissionDenied     the connection may not do it (read-only, authentication)
          +-- AgentUnavailable     no guest-agent channel, or no agent answering on it
          +-- AgentCommandFailed   the guest agent answered the command with an error
          +-- MonitorCommandFailed QEMU answered a QMP passthrough command with an error

Every error that wraps a ``libvirt.libvirtError`` keeps it as ``__cause__``.
``asyncio.CancelledError`` is never wrapped or swallowed.
"""

from __future__ import annotations

from typing import Final

import libvirt

__all__ = [
    "AgentCommandFailed",
    "AgentUnavailable",
    "BadReply",
    "CallFailed",
    "CallTimeout",
    "DomainNotFound",
    "DomainNotRunning",
    "LibvirtSourceError",
    "MonitorCommandFailed",
    "NotConnected",
    "PermissionDenied",
    "Unsupported",
    "from_libvirt_error",
]

# libvirt's messages can carry a whole XML document or a guest's reply: keep them short.
MAX_MESSAGE: Final = 400


class LibvirtSourceError(Exception):
    """Base of every error the libvirt layer raises."""


class NotConnected(LibvirtSourceError):
    """There is no usable connection to libvirtd: not connected yet, lost, or closed."""


class CallTimeout(LibvirtSourceError):
    """A call did not return within its timeout, or libvirt itself timed out (a domain job
    lock held by another caller)."""

    def __init__(self, call: str, timeout: float | None, detail: str | None = None) -> None:
        text = f"{call}: no answer within {timeout:g} s" if timeout is not None else call
        super().__init__(f"{text}: {detail}" if detail else text)
        self.call = call
        self.timeout = timeout


class BadReply(LibvirtSourceError):
    """libvirt answered with a value of an unexpected shape."""


class CallFailed(LibvirtSourceError):
    """libvirt answered a call with an error.

    ``code`` and ``error_domain`` are libvirt's ``VIR_ERR_*`` and ``VIR_FROM_*`` numbers (None
    when libvirt set none); ``libvirt_message`` is its message, shortened.
    """

    def __init__(
        self, call: str, code: int | None, error_domain: int | None, libvirt_message: str
    ) -> None:
        super().__init__(f"{call}: {libvirt_message}")
        self.call = call
        self.code = code
        self.error_domain = error_domain
        self.libvirt_message = libvirt_message


class DomainNotFound(CallFailed):
    """No such domain (VIR_ERR_NO_DOMAIN)."""


class DomainNotRunning(CallFailed):
    """The call needs a running domain (VIR_ERR_OPERATION_INVALID, "domain is not running")."""


class Unsupported(CallFailed):
    """This libvirt, its driver or the domain cannot do it (VIR_ERR_NO_SUPPORT,
    VIR_ERR_OPERATION_UNSUPPORTED, VIR_ERR_ARGUMENT_UNSUPPORTED)."""


class PermissionDenied(CallFailed):
    """The connection is not allowed to do it (VIR_ERR_OPERATION_DENIED, VIR_ERR_AUTH_*)."""


class AgentUnavailable(CallFailed):
    """The domain has no guest-agent channel ("QEMU guest agent is not configured"), or no agent
    is connected or answering on it (VIR_ERR_AGENT_UNRESPONSIVE, VIR_ERR_AGENT_UNSYNCED)."""


class AgentCommandFailed(CallFailed):
    """The guest agent answered the command with an error (or libvirt could not use the
    answer)."""


class MonitorCommandFailed(CallFailed):
    """QEMU answered a command passed through libvirt (``virDomainQemuMonitorCommand``) with
    an error: ``error_class`` is QEMU's (``CommandNotFound``, ``GenericError``...)."""

    def __init__(self, call: str, error_class: str, description: str) -> None:
        super().__init__(call, None, None, shorten(f"{error_class}: {description}"))
        self.error_class = error_class


def _codes(*names: str) -> frozenset[int]:
    # A binding built against an older libvirt may lack a newer constant.
    return frozenset(getattr(libvirt, name) for name in names if hasattr(libvirt, name))


_NOT_FOUND: Final = _codes("VIR_ERR_NO_DOMAIN")
_UNSUPPORTED: Final = _codes(
    "VIR_ERR_NO_SUPPORT", "VIR_ERR_OPERATION_UNSUPPORTED", "VIR_ERR_ARGUMENT_UNSUPPORTED"
)
_DENIED: Final = _codes(
    "VIR_ERR_OPERATION_DENIED",
    "VIR_ERR_AUTH_FAILED",
    "VIR_ERR_AUTH_CANCELLED",
    "VIR_ERR_AUTH_UNAVAILABLE",
)
_AGENT_GONE: Final = _codes("VIR_ERR_AGENT_UNRESPONSIVE", "VIR_ERR_AGENT_UNSYNCED")
# For an agent command: "QEMU guest agent is not configured" (the domain has no channel).
_NO_AGENT_CHANNEL: Final = _codes("VIR_ERR_ARGUMENT_UNSUPPORTED")
_TIMED_OUT: Final = _codes("VIR_ERR_OPERATION_TIMEOUT")
_INVALID: Final = _codes("VIR_ERR_OPERATION_INVALID")


def shorten(text: str, limit: int = MAX_MESSAGE) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def from_libvirt_error(
    exc: libvirt.libvirtError, call: str, *, agent: bool = False
) -> CallFailed | CallTimeout:
    """The error of this tree for a ``libvirtError`` raised by ``call`` (raise it ``from exc``).

    ``agent``: the call was a guest-agent command, where "argument unsupported" means the domain
    has no agent channel and an internal error is the agent's own answer.
    """
    code = exc.get_error_code()
    domain = exc.get_error_domain()
    message = shorten(exc.get_error_message() or str(exc) or "unknown libvirt error")
    if code in _TIMED_OUT:
        return CallTimeout(call, None, message)
    kind: type[CallFailed] = CallFailed
    if code in _NOT_FOUND:
        kind = DomainNotFound
    elif agent and (code in _AGENT_GONE or code in _NO_AGENT_CHANNEL):
        kind = AgentUnavailable
    elif agent and code == libvirt.VIR_ERR_INTERNAL_ERROR:
        kind = AgentCommandFailed
    elif code in _INVALID and "not running" in message:
        kind = DomainNotRunning
    elif code in _UNSUPPORTED:
        kind = Unsupported
    elif code in _DENIED:
        kind = PermissionDenied
    return kind(call, code, domain, message)
