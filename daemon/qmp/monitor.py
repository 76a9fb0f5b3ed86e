"""A VM's QMP monitor as its poll cycle sees it: what to read each cycle, over one connection.

The session owns the connection and its events; the poll cycle (``daemon.vmcycle``) decides
what happens in a cycle and calls this for the monitor's part of it. Events flag follow-up
queries (``Followups``) that the next ``poll()`` makes, so the event pump never waits on a
command.
"""

from __future__ import annotations

from daemon.fleet import VMState
from daemon.qmp import probe
from daemon.qmp.connection import QMPConnection
from daemon.qmp.intake import Followups


class QMPMonitor:
    """The monitor of ``vm`` over the attached connection ``conn``."""

    def __init__(
        self, conn: QMPConnection, vm: VMState, followups: Followups | None = None
    ) -> None:
        self.conn = conn
        self.vm = vm
        self.followups = followups or Followups()

    @property
    def connected(self) -> bool:
        return self.conn.connected

    async def poll(self) -> None:
        """What events asked for (memory layout, run state), then balloon and guest stats."""
        followups, vm = self.followups, self.vm
        if followups.memory:
            followups.memory = False
            await probe.read_memory(self.conn, vm)
            await probe.read_ram_layout(self.conn, vm)
        if followups.status:
            followups.status = False
            await probe.read_status(self.conn, vm)
        await probe.poll(self.conn, vm)

    async def read_balloon(self) -> None:
        """The balloon's ``actual`` again (the cycle reads it after a residency scan)."""
        await probe.read_balloon_actual(self.conn, self.vm)
