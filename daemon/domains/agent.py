"""The guest agent of a libvirt domain, through ``virDomainQemuAgentCommand``.

libvirt holds the agent's socket, so reclaimd's agent reader (``daemon.agent``) reaches the
agent through libvirt instead: an ``AgentTransport`` whose errors are the agent client's own.
It sends nothing while the domain has no agent channel (``has_channel``, from the domain XML):
libvirt would only refuse, and the first agent command marks the domain "custom-ga-command"
in its log, which should happen only where there is an agent to ask.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from daemon import libvirt as lv
from daemon.agent import AgentTimeout, AgentUnavailable, BadReply, command_error


class LibvirtAgentTransport:
    """One domain's guest agent through the libvirt source."""

    def __init__(self, source: lv.LibvirtSource, uuid: str) -> None:
        self.source = source
        self.uuid = uuid
        self.has_channel = False  # set at attach from the domain XML

    async def command(
        self, name: str, arguments: Mapping[str, object] | None, timeout: float
    ) -> Any:
        if not self.has_channel:
            raise AgentUnavailable("the domain has no guest agent channel")
        seconds = max(1, math.ceil(timeout))  # libvirt takes whole seconds
        try:
            return await self.source.agent_command(self.uuid, name, arguments, timeout=seconds)
        except lv.AgentCommandFailed as exc:
            # libvirt keeps the agent's description in its message, not its error class.
            raise command_error(name, "GenericError", exc.libvirt_message) from None
        except lv.CallTimeout:
            raise AgentTimeout(f"{name}: no reply within {seconds} s") from None
        except lv.BadReply as exc:
            raise BadReply(str(exc)) from None
        except lv.LibvirtSourceError as exc:
            # No agent connected on the channel, libvirtd gone, the domain stopped.
            raise AgentUnavailable(str(exc)) from None

    async def close(self) -> None:
        """Nothing is held: libvirt owns the socket."""
