"""What a libvirt domain's poll cycle reads, through libvirt's API only.

At attach (:func:`read_domain`): the live domain XML (identity, memory sizes, balloon with free
page reporting, deflate-on-oom and stats period, memory backing, agent channel, and Nova's
labels where they are asked for), QEMU's pid (for the host view), and the stats period set
when it is 0 and configured to.
Each poll (:class:`LibvirtMonitor`): ``virDomainGetInfo`` (run state) and ``memoryStats()``
(the balloon's actual size and the guest's statistics, which libvirtd reads from QEMU as
reclaimd would over QMP; the names are translated in ``daemon.libvirt.stats``).

libvirt gives no ``x-query-ramblock``. The host view needs to know which mappings of QEMU hold
guest RAM, so the RAM blocks the domain's XML implies are written in the same table form
(:func:`ram_layout`): one block per NUMA cell (libvirt names their backends ``ram-node<N>``),
or the machine's default block, each as large as the RAM it holds; the host view then finds
their mappings by size and kind (anonymous, memfd or file) as it does with QEMU's own table.
"""

from __future__ import annotations

import time

from daemon import libvirt as lv
from daemon.fleet import VMOptions, VMState
from daemon.qmp.probe import keep_guest_stats
from daemon.untrusted import one_line

MAX_LABEL = 256
_DEVICE_MODELS_IN_MEMORY = frozenset({"dimm", "nvdimm", "virtio-pmem", "virtio-mem"})


def ram_layout(facts: lv.DomainFacts) -> tuple[str, list[dict[str, object]]] | None:
    """(x-query-ramblock-style table, query-memdev-style backends) of the domain's boot RAM,
    or None when the XML does not tell its size."""
    if facts.numa_cells_bytes:
        blocks = [(f"ram-node{i}", size) for i, size in enumerate(facts.numa_cells_bytes)]
    elif facts.memory_bytes is not None:
        # <memory> counts the memory devices too; boot RAM is what is left.
        plugged = sum(
            d.size_bytes or 0 for d in facts.memory_devices if d.model in _DEVICE_MODELS_IN_MEMORY
        )
        blocks = [("pc.ram", facts.memory_bytes - plugged)]
    else:
        return None
    page = 4096
    if facts.backing.hugepages:
        page = facts.backing.hugepages[0].size_bytes or 2 << 20
    access = facts.backing.access
    share = True if access == "shared" else False if access == "private" else None
    rows = ["Block Name    PSize              Offset               Used              Total"]
    memdevs: list[dict[str, object]] = []
    offset = 0
    for name, size in blocks:
        rows.append(f"{name} {page // 1024} KiB 0x{offset:016x} 0x{size:016x} 0x{size:016x}")
        memdev: dict[str, object] = {"id": name, "size": size}
        if share is not None:
            memdev["share"] = share
        memdevs.append(memdev)
        offset += size
    return "\n".join(rows), memdevs


def options_of(facts: lv.DomainFacts) -> VMOptions:
    """The VM's reclaim options from reclaimd's element in the domain's metadata."""
    given = facts.options
    if not given.present:
        return VMOptions()
    return VMOptions(given.reclaim, given.minimum_bytes, "libvirt metadata")


def labels_of(facts: lv.DomainFacts, *, nova: bool) -> dict[str, str]:
    """The extra labels of ``qemu_vm_info``: OpenStack Nova's (instance name, flavor, project,
    user) when ``nova`` asks for them and the domain has them, else none."""
    return facts.nova.labels() if nova and facts.nova is not None else {}


def apply_facts(vm: VMState, facts: lv.DomainFacts, *, nova: bool = False) -> None:
    """Write what the domain XML says into the VM's record (Nova's labels with ``nova``)."""
    vm.uuid = facts.uuid
    vm.options = options_of(facts)
    vm.qemu_name = one_line(facts.name, MAX_LABEL)
    vm.labels = labels_of(facts, nova=nova)
    memory = vm.memory
    layout = ram_layout(facts)
    if layout is not None:
        memory.ramblock_text, memory.memdevs = layout
        memory.base_bytes = sum(int(str(d["size"])) for d in memory.memdevs)
        plugged = (facts.memory_bytes or 0) - memory.base_bytes
        memory.plugged_bytes = plugged if plugged > 0 else None
    else:
        memory.ramblock_text, memory.memdevs = None, []
    memory.mtree_text = None  # guest-physical addresses need QMP's "info mtree"
    memory.mem_paths = {}
    balloon, spec = vm.balloon, facts.balloon
    if spec is None or spec.model == "none":
        balloon.present = False
        balloon.problem = "no virtio-balloon device"
        return
    balloon.present = True
    balloon.problem = None
    balloon.device_type = f"{spec.model}-balloon"
    balloon.qom_path = spec.alias
    # An attribute libvirt leaves out is QEMU's default: off.
    balloon.free_page_reporting = spec.free_page_reporting is True
    balloon.deflate_on_oom = spec.deflate_on_oom is True
    balloon.free_page_hint = None
    balloon.stats_polling_interval = spec.stats_period or 0


async def read_domain(
    source: lv.LibvirtSource,
    domain: lv.DomainRef,
    vm: VMState,
    *,
    stats_interval: int,
    nova: bool = False,
) -> lv.DomainFacts:
    """Everything read once when a domain's session (re)attaches. Raises LibvirtSourceError."""
    facts = await source.domain_facts(domain.uuid)
    apply_facts(vm, facts, nova=nova)
    vm.pid = await source.qemu_pid(domain)
    if vm.balloon.present and vm.balloon.stats_polling_interval == 0 and stats_interval > 0:
        await source.set_memory_stats_period(domain.uuid, stats_interval)
        vm.balloon.stats_polling_interval = stats_interval
    return facts


class LibvirtMonitor:
    """The ``Monitor`` (``daemon.vmcycle``) of one running domain."""

    def __init__(self, source: lv.LibvirtSource, uuid: str, vm: VMState) -> None:
        self.source = source
        self.uuid = uuid
        self.vm = vm

    @property
    def connected(self) -> bool:
        return self.source.connected and self.vm.up

    async def poll(self) -> None:
        """Run state, then balloon and guest statistics in one ``memoryStats()``."""
        vm = self.vm
        changes = vm.balloon.changes
        info = await self.source.info(self.uuid)
        vm.status = info.state
        vm.running = info.state == "running"
        try:
            stats = await self.source.memory_stats(
                self.uuid, ram_bytes=vm.memory.ram_bytes, now=time.time()
            )
        except lv.Unsupported as exc:  # a driver or domain without balloon statistics
            vm.guest_stats, vm.guest_stats_error = None, str(exc)
            vm.last_poll = time.time()
            return
        if vm.balloon.present and vm.balloon.changes == changes:
            # (A BALLOON_CHANGE that came in while libvirtd answered is newer than its answer.)
            self._balloon(stats.balloon_actual_bytes, stats.problems)
        keep_guest_stats(vm, stats.guest)
        if not vm.balloon.present:
            vm.guest_stats_error = vm.balloon.problem
        vm.last_poll = time.time()

    async def read_balloon(self) -> None:
        """The balloon's size as libvirt knows it from QEMU's BALLOON_CHANGE events (no call
        into QEMU)."""
        if self.vm.balloon.present:
            changes = self.vm.balloon.changes
            info = await self.source.info(self.uuid)
            if self.vm.balloon.changes == changes:
                self._balloon(info.memory_bytes, ())

    def _balloon(self, actual: int | None, problems: tuple[str, ...]) -> None:
        balloon, ram = self.vm.balloon, self.vm.memory.ram_bytes
        if actual is None or (ram is not None and actual > ram):
            balloon.actual_bytes = None
            balloon.problem = "; ".join(problems) or f"balloon actual {actual} is not a size"
            return
        balloon.actual_bytes = actual
        balloon.problem = None
