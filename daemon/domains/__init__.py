"""libvirt domains as reclaimd VMs: the libvirt source wired into the poll cycle.

``daemon.libvirt`` talks to libvirtd (events, calls, domain XML); this package makes each
running domain a VM of the fleet with the same poll cycle as a QMP-attached one
(``daemon.vmcycle``):

- ``host``: :class:`LibvirtHost`, which follows one libvirt URI's domains and adds, keeps and
  removes their VMs as lifecycle and connection events say;
- ``session``: :class:`LibvirtSession`, one domain's session (a ``SessionBase`` with its own
  transition table), which attaches, runs the cycle and reattaches after libvirtd comes back;
- ``monitor``: what the cycle reads through libvirt (``memoryStats()``, the balloon, the domain
  XML's memory facts);
- ``agent``: the guest agent through ``virDomainQemuAgentCommand``;
- ``passthrough``: what only QMP tells (the memory map, file backends' paths, free page
  hinting), through ``virDomainQemuMonitorCommand``, only with ``libvirt_qmp_passthrough``:
  it taints the domain.
"""

from daemon.domains.agent import LibvirtAgentTransport
from daemon.domains.host import LibvirtHost
from daemon.domains.monitor import LibvirtMonitor, read_domain
from daemon.domains.session import LIBVIRT_TRANSITIONS, LibvirtSession

__all__ = [
    "LIBVIRT_TRANSITIONS",
    "LibvirtAgentTransport",
    "LibvirtHost",
    "LibvirtMonitor",
    "LibvirtSession",
    "read_domain",
]
