"""The memory facts of a libvirt domain, from its XML (``virDomainGetXMLDesc``).

What reclaimd needs that libvirt says only there: the memory sizes (``<memory>``,
``<currentMemory>``, ``<maxMemory slots>``), NUMA cells and memory devices (DIMMs, virtio-mem),
the balloon (``<memballoon model autodeflate freePageReporting><stats period>``), how guest
RAM is backed (``<memoryBacking>``: memfd, file, anonymous, hugepages), whether a guest-agent
channel exists (and, in the live XML, whether an agent is connected), OpenStack Nova's
instance metadata as labels, and reclaimd's own per-VM options.

The XML comes from libvirtd, but parts of it (metadata, names) are set by whoever may define
domains, so it is parsed as untrusted: size-limited, no DTD or entities (``defusedxml``),
every value checked; a value that does not parse becomes None with a problem, never a crash.
Schema: https://libvirt.org/formatdomain.html.

reclaimd's options live in libvirt metadata under :data:`RECLAIMD_NS`::

    virsh metadata DOMAIN https://reclaimd.dev/xmlns/libvirt/1 --key reclaimd --live --config \\
        --set '<vm><reclaim enabled="no"/><minimum unit="MiB">1024</minimum></vm>'
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final
from xml.etree.ElementTree import Element

import defusedxml.ElementTree as SafeET
from defusedxml import DefusedXmlException

__all__ = [
    "AGENT_CHANNEL",
    "MAX_XML_CHARS",
    "NOVA_NS_PREFIX",
    "RECLAIMD_NS",
    "Balloon",
    "DomainFacts",
    "DomainXMLError",
    "HugePages",
    "MemoryBacking",
    "MemoryDevice",
    "NovaInstance",
    "ReclaimdOptions",
    "parse_domain_xml",
    "scaled_bytes",
]

#: Namespace of reclaimd's per-VM options in a domain's ``<metadata>``.
RECLAIMD_NS: Final = "https://reclaimd.dev/xmlns/libvirt/1"
#: Nova's namespaces are ``.../nova/1.0``, ``1.1``, ``1.2``: any version is read.
NOVA_NS_PREFIX: Final = "http://openstack.org/xmlns/libvirt/nova/"
#: The virtio-serial port name of the QEMU guest agent.
AGENT_CHANNEL: Final = "org.qemu.guest_agent.0"
#: A domain with hundreds of devices is a few hundred KiB of XML.
MAX_XML_CHARS: Final = 8 * 1024 * 1024
#: Labels (Nova names) are cut to this many characters.
MAX_LABEL: Final = 256
MAX_PROBLEMS: Final = 32

# libvirt's scaled integers (docs: "Memory Allocation"): the default unit is KiB.
_UNITS: Final = {
    "b": 1,
    "bytes": 1,
    "kb": 10**3,
    "k": 2**10,
    "kib": 2**10,
    "mb": 10**6,
    "m": 2**20,
    "mib": 2**20,
    "gb": 10**9,
    "g": 2**30,
    "gib": 2**30,
    "tb": 10**12,
    "t": 2**40,
    "tib": 2**40,
    "pb": 10**15,
    "p": 2**50,
    "pib": 2**50,
    "eb": 10**18,
    "e": 2**60,
    "eib": 2**60,
}
_MAX_BYTES: Final = 2**63 - 1
_UUID: Final = re.compile(r"[0-9a-fA-F]{8}-?(?:[0-9a-fA-F]{4}-?){3}[0-9a-fA-F]{12}")
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")


class DomainXMLError(ValueError):
    """The XML cannot be used at all: too large, not well-formed, a DTD or entities, not a
    ``<domain>``, or no name or UUID."""


@dataclass(frozen=True)
class Balloon:
    """``<memballoon>``. ``free_page_reporting`` and ``deflate_on_oom`` (``autodeflate``) are
    None when the attribute is absent (libvirt then leaves QEMU's default: off);
    ``stats_period`` is the guest-stats period in seconds (0: off; None: not set)."""

    model: str
    alias: str | None = None
    free_page_reporting: bool | None = None
    deflate_on_oom: bool | None = None
    stats_period: int | None = None


@dataclass(frozen=True)
class HugePages:
    """One ``<hugepages><page>``: ``size_bytes`` None means the host's default size."""

    size_bytes: int | None
    nodeset: str | None = None


@dataclass(frozen=True)
class MemoryBacking:
    """``<memoryBacking>``. ``source`` is memfd, file or anonymous as written (None: not
    written; libvirt then backs RAM with anonymous memory, or with hugetlbfs files when
    hugepages are asked for). ``hugepages`` empty: no hugepages."""

    source: str | None = None
    hugepages: tuple[HugePages, ...] = ()
    access: str | None = None
    allocation: str | None = None
    locked: bool = False
    nosharepages: bool = False
    discard: bool = False

    @property
    def uses_hugepages(self) -> bool:
        return bool(self.hugepages)


@dataclass(frozen=True)
class MemoryDevice:
    """A ``<memory model=...>`` device: dimm, nvdimm, virtio-pmem, virtio-mem, sgx-epc.
    ``requested_bytes``/``current_bytes``/``block_bytes`` are virtio-mem's."""

    model: str
    alias: str | None = None
    size_bytes: int | None = None
    node: int | None = None
    requested_bytes: int | None = None
    current_bytes: int | None = None
    block_bytes: int | None = None


@dataclass(frozen=True)
class NovaInstance:
    """OpenStack Nova's ``<nova:instance>`` metadata: labels for ``qemu_vm_info``."""

    name: str | None = None
    flavor: str | None = None
    project_name: str | None = None
    project_id: str | None = None
    user_name: str | None = None
    user_id: str | None = None

    def labels(self) -> dict[str, str]:
        """The ones present, under the label names the libvirt exporters use."""
        pairs = {
            "instance_name": self.name,
            "flavor": self.flavor,
            "project_name": self.project_name,
            "project_uuid": self.project_id,
            "user_name": self.user_name,
            "user_uuid": self.user_id,
        }
        return {k: v for k, v in pairs.items() if v is not None}


@dataclass(frozen=True)
class ReclaimdOptions:
    """reclaimd's per-VM options from ``<metadata><reclaimd:vm>`` (namespace
    :data:`RECLAIMD_NS`): ``reclaim`` False opts the VM out of reclaiming (``<reclaim
    enabled="no"/>``); ``minimum_bytes`` is the least memory to leave it (``<minimum
    unit="MiB">N</minimum>``, KiB without a unit, as libvirt's sizes). ``present``: the
    element exists."""

    present: bool = False
    reclaim: bool = True
    minimum_bytes: int | None = None


@dataclass(frozen=True)
class DomainFacts:
    """What a domain's XML says about its memory. Sizes in bytes; None when absent or unusable
    (see ``problems``). ``id`` only in the live XML of a running domain."""

    uuid: str
    name: str
    domain_type: str | None = None
    id: int | None = None
    memory_bytes: int | None = None
    current_memory_bytes: int | None = None
    max_memory_bytes: int | None = None
    max_memory_slots: int | None = None
    numa_cells_bytes: tuple[int, ...] = ()
    memory_devices: tuple[MemoryDevice, ...] = ()
    balloon: Balloon | None = None
    backing: MemoryBacking = field(default_factory=MemoryBacking)
    agent_channel: bool = False
    agent_connected: bool | None = None
    nova: NovaInstance | None = None
    options: ReclaimdOptions = field(default_factory=ReclaimdOptions)
    problems: tuple[str, ...] = ()


# -- values --------------------------------------------------------------------------------------


def scaled_bytes(text: str | None, unit: str | None, default_unit: str = "KiB") -> int:
    """A libvirt scaled integer in bytes; ValueError when it is not one."""
    if text is None:
        raise ValueError("no value")
    value = text.strip()
    if not value.isdigit() or len(value) > 20:
        raise ValueError(f"not a whole number: {value[:40]!r}")
    scale = _UNITS.get((unit or default_unit).strip().lower())
    if scale is None:
        raise ValueError(f"unknown unit {unit[:20]!r}" if unit else "unknown unit")
    result = int(value) * scale
    if result > _MAX_BYTES:
        raise ValueError(f"{value} {unit or default_unit} is impossibly large")
    return result


def _label(text: str | None) -> str | None:
    if text is None:
        return None
    clean = _CONTROL.sub(" ", text).strip()
    return clean[:MAX_LABEL] or None


class _Reader:
    """Collects problems while reading one document."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def problem(self, text: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(text)

    def size(self, element: Element | None, what: str) -> int | None:
        if element is None:
            return None
        try:
            return scaled_bytes(element.text, element.get("unit"))
        except ValueError as exc:
            self.problem(f"{what}: {exc}")
            return None

    def size_attr(self, element: Element, attr: str, what: str) -> int | None:
        raw = element.get(attr)
        if raw is None:
            return None
        try:
            return scaled_bytes(raw, element.get("unit"))
        except ValueError as exc:
            self.problem(f"{what}: {exc}")
            return None

    def whole(self, raw: str | None, what: str, limit: int = 2**31 - 1) -> int | None:
        if raw is None:
            return None
        value = raw.strip()
        if not value.isdigit() or len(value) > 10 or int(value) > limit:
            self.problem(f"{what}: not a whole number up to {limit}: {value[:40]!r}")
            return None
        return int(value)

    def switch(self, raw: str | None, what: str) -> bool | None:
        if raw is None:
            return None
        if raw in ("on", "yes"):
            return True
        if raw in ("off", "no"):
            return False
        self.problem(f"{what}: not on/off: {raw[:40]!r}")
        return None


# -- the document --------------------------------------------------------------------------------


def parse_domain_xml(text: str) -> DomainFacts:
    """Parse a domain's XML. Raises :class:`DomainXMLError` when it cannot be used at all;
    anything less is a None field and a line in ``problems``."""
    if len(text) > MAX_XML_CHARS:
        raise DomainXMLError(f"domain XML is {len(text)} characters, more than {MAX_XML_CHARS}")
    try:
        root = SafeET.fromstring(text, forbid_dtd=True)
    except DefusedXmlException as exc:
        raise DomainXMLError(f"domain XML has a DTD or entities: {type(exc).__name__}") from exc
    except SafeET.ParseError as exc:
        raise DomainXMLError(f"domain XML is not well-formed: {exc}") from exc
    if root.tag != "domain":
        raise DomainXMLError(f"not a domain's XML: root element <{root.tag[:40]}>")
    name = _label(root.findtext("name"))
    uuid = (root.findtext("uuid") or "").strip()
    if not name:
        raise DomainXMLError("domain XML has no <name>")
    if not _UUID.fullmatch(uuid):
        raise DomainXMLError(f"domain XML has no valid <uuid>: {uuid[:40]!r}")

    r = _Reader()
    max_memory = root.find("maxMemory")
    agent = _agent(root)
    facts = DomainFacts(
        uuid=uuid.lower(),
        name=name,
        domain_type=_label(root.get("type")),
        id=r.whole(root.get("id"), "id") if root.get("id") not in (None, "-1") else None,
        memory_bytes=r.size(root.find("memory"), "<memory>"),
        current_memory_bytes=r.size(root.find("currentMemory"), "<currentMemory>"),
        max_memory_bytes=r.size(max_memory, "<maxMemory>"),
        max_memory_slots=(
            r.whole(max_memory.get("slots"), "<maxMemory slots>")
            if max_memory is not None
            else None
        ),
        numa_cells_bytes=_numa_cells(root, r),
        memory_devices=tuple(_memory_device(e, r) for e in root.iterfind("devices/memory")),
        balloon=_balloon(root.find("devices/memballoon"), r),
        backing=_backing(root.find("memoryBacking"), r),
        agent_channel=agent is not None,
        agent_connected=_agent_connected(agent),
        nova=_nova(root.find("metadata")),
        options=_options(root.find("metadata"), r),
    )
    # The problems are known only once every field has been read.
    return dataclasses.replace(facts, problems=tuple(r.problems))


def _numa_cells(root: Element, r: _Reader) -> tuple[int, ...]:
    cells = []
    for i, cell in enumerate(root.iterfind("cpu/numa/cell")):
        size = r.size_attr(cell, "memory", f"NUMA cell {cell.get('id', i)}")
        if size is not None:
            cells.append(size)
    return tuple(cells)


def _memory_device(element: Element, r: _Reader) -> MemoryDevice:
    model = _label(element.get("model")) or "unknown"
    alias = element.find("alias")
    target = element.find("target")
    what = f"<memory model='{model}'>"

    def target_size(tag: str) -> int | None:
        return r.size(target.find(tag), f"{what} {tag}") if target is not None else None

    return MemoryDevice(
        model=model,
        alias=_label(alias.get("name")) if alias is not None else None,
        size_bytes=target_size("size"),
        node=r.whole(target.findtext("node"), f"{what} node") if target is not None else None,
        requested_bytes=target_size("requested"),
        current_bytes=target_size("current"),
        block_bytes=target_size("block"),
    )


def _balloon(element: Element | None, r: _Reader) -> Balloon | None:
    if element is None:
        return None
    model = _label(element.get("model")) or "unknown"
    if model == "none":
        return None
    alias = element.find("alias")
    stats = element.find("stats")
    return Balloon(
        model=model,
        alias=_label(alias.get("name")) if alias is not None else None,
        free_page_reporting=r.switch(element.get("freePageReporting"), "freePageReporting"),
        deflate_on_oom=r.switch(element.get("autodeflate"), "autodeflate"),
        stats_period=r.whole(stats.get("period"), "stats period") if stats is not None else None,
    )


def _backing(element: Element | None, r: _Reader) -> MemoryBacking:
    if element is None:
        return MemoryBacking()
    pages: list[HugePages] = []
    huge = element.find("hugepages")
    if huge is not None:
        for page in huge.iterfind("page"):
            pages.append(
                HugePages(r.size_attr(page, "size", "hugepage size"), _label(page.get("nodeset")))
            )
        if not pages:
            pages.append(HugePages(None))
    source = element.find("source")
    access = element.find("access")
    allocation = element.find("allocation")
    return MemoryBacking(
        source=_label(source.get("type")) if source is not None else None,
        hugepages=tuple(pages),
        access=_label(access.get("mode")) if access is not None else None,
        allocation=_label(allocation.get("mode")) if allocation is not None else None,
        locked=element.find("locked") is not None,
        nosharepages=element.find("nosharepages") is not None,
        discard=element.find("discard") is not None,
    )


def _agent(root: Element) -> Element | None:
    for target in root.iterfind("devices/channel/target"):
        if target.get("type") == "virtio" and target.get("name") == AGENT_CHANNEL:
            return target
    return None


def _agent_connected(target: Element | None) -> bool | None:
    state = target.get("state") if target is not None else None
    return {"connected": True, "disconnected": False}.get(state or "")


def _children(metadata: Element | None) -> Iterable[Element]:
    return iter(metadata) if metadata is not None else iter(())


def _namespace(tag: str) -> str:
    return tag[1:].partition("}")[0] if tag.startswith("{") else ""


def _nova(metadata: Element | None) -> NovaInstance | None:
    for instance in _children(metadata):
        ns = _namespace(instance.tag)
        if not ns.startswith(NOVA_NS_PREFIX) or not instance.tag.endswith("}instance"):
            continue
        q = f"{{{ns}}}"
        flavor = instance.find(f"{q}flavor")
        project = instance.find(f"{q}owner/{q}project")
        user = instance.find(f"{q}owner/{q}user")
        return NovaInstance(
            name=_label(instance.findtext(f"{q}name")),
            flavor=_label(flavor.get("name")) if flavor is not None else None,
            project_name=_label(project.text) if project is not None else None,
            project_id=_label(project.get("uuid")) if project is not None else None,
            user_name=_label(user.text) if user is not None else None,
            user_id=_label(user.get("uuid")) if user is not None else None,
        )
    return None


def _options(metadata: Element | None, r: _Reader) -> ReclaimdOptions:
    q = f"{{{RECLAIMD_NS}}}"
    vm = metadata.find(f"{q}vm") if metadata is not None else None
    if vm is None:
        return ReclaimdOptions()

    def child(tag: str) -> Element | None:
        # libvirt puts the children in the namespace too; accept them without it as well.
        found = vm.find(f"{q}{tag}")
        return found if found is not None else vm.find(tag)

    reclaim = child("reclaim")
    enabled = r.switch(reclaim.get("enabled"), "reclaimd reclaim") if reclaim is not None else None
    return ReclaimdOptions(
        present=True,
        reclaim=enabled is not False,
        minimum_bytes=r.size(child("minimum"), "reclaimd minimum"),
    )
