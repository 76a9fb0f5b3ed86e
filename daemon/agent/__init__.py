"""The guest's own free lists, read through the QEMU guest agent (qemu-ga).

Read-only: ``guest-info`` and ``guest-file-open`` (mode "r") / ``guest-file-read`` /
``guest-file-close`` of ``/proc/buddyinfo``, ``/proc/meminfo``, optionally
``/proc/pagetypeinfo``, and ``page_reporting_order``; never ``guest-exec`` nor any write.
Everything the agent says is untrusted guest input: bounded, validated, and turned into a
per-VM reason when it is not usable.

Layers, each usable alone:

- ``transport``: the ``AgentTransport`` seam (``command(name, arguments, timeout)``) and
  ``SocketTransport`` over the agent's Unix socket (qemu.qmp, with a resync on connect).
- ``client``: ``AgentClient.info()`` and ``AgentClient.read_file()``, replies checked.
- ``procfs``: parsers of the guest files; ``freelists``: ``FreeLists`` and its cross-checks.
- ``reader``: ``AgentReader.read(ram_bytes) -> FreeLists | AgentProblem``, bounded in time,
  with backoff, caching and no retry loop on a blocked agent.
- ``errors``: the error tree (absent, timeout, blocked, failed, bad-reply, rejected).
"""

from daemon.agent.client import FILE_COMMANDS, AgentClient, AgentInfo
from daemon.agent.errors import (
    AgentError,
    AgentTimeout,
    AgentUnavailable,
    BadReply,
    CommandBlocked,
    CommandFailed,
    ConnectionDropped,
    GuestDataRejected,
    ProblemKind,
    command_error,
)
from daemon.agent.freelists import FreeLists, build_free_lists, free_slack_bytes
from daemon.agent.procfs import (
    REPORTING_INACTIVE,
    MigrateFree,
    PageTypeInfo,
    ZoneFree,
    parse_buddyinfo,
    parse_meminfo,
    parse_pagetypeinfo,
    parse_reporting_order,
)
from daemon.agent.reader import AgentProblem, AgentReader, ReaderConfig
from daemon.agent.transport import AgentTransport, SocketTransport

__all__ = [
    "FILE_COMMANDS",
    "REPORTING_INACTIVE",
    "AgentClient",
    "AgentError",
    "AgentInfo",
    "AgentProblem",
    "AgentReader",
    "AgentTimeout",
    "AgentTransport",
    "AgentUnavailable",
    "BadReply",
    "CommandBlocked",
    "CommandFailed",
    "ConnectionDropped",
    "FreeLists",
    "GuestDataRejected",
    "MigrateFree",
    "PageTypeInfo",
    "ProblemKind",
    "ReaderConfig",
    "SocketTransport",
    "ZoneFree",
    "build_free_lists",
    "command_error",
    "free_slack_bytes",
    "parse_buddyinfo",
    "parse_meminfo",
    "parse_pagetypeinfo",
    "parse_reporting_order",
]
