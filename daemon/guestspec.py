"""What a test or demo guest is, whichever kind runs it.

``daemon.simguest`` runs simulated guests (``SimGuestSpec``) and ``daemon.testguest`` boots the
real test guest under QEMU (``QemuGuestSpec``). Both start from this description of the guest,
the same for both kinds, and add the options only their kind has.
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1 << 20


@dataclass(frozen=True, kw_only=True)
class GuestSpec:
    """A guest to start: its identity, its RAM, what it runs and how its balloon is set up."""

    name: str
    ram_bytes: int
    uuid: str | None = None  # None: the kind picks one
    # What the guest does; each kind has its own workloads (a model workload's name for a
    # simulated guest, the test guest's ``reclaimd.workload=`` steps under QEMU).
    workload: str | None = None
    free_page_reporting: bool = True
    page_reporting_order: int | None = None  # None: the guest's own (pageblock_order, 9)
    deflate_on_oom: bool = False
    # A guest agent (qemu-ga) on a virtio-serial port; ``agent_block_rpcs`` as its
    # ``--block-rpcs`` (RHEL-family guests block guest-file-* by default).
    agent: bool = True
    agent_block_rpcs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.ram_bytes <= 0 or self.ram_bytes % (4 * MiB):
            raise ValueError("ram_bytes must be a positive multiple of 4 MiB")
        if self.page_reporting_order is not None and not 0 <= self.page_reporting_order <= 10:
            raise ValueError(f"page_reporting_order {self.page_reporting_order}: not 0..10")
