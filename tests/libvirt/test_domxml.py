"""Domain XML -> DomainFacts: the schema's attributes, units, metadata, and hostile input."""

from __future__ import annotations

import pytest

from daemon.libvirt.domxml import (
    MAX_XML_CHARS,
    RECLAIMD_NS,
    Balloon,
    DomainXMLError,
    HugePages,
    MemoryBacking,
    MemoryDevice,
    NovaInstance,
    ReclaimdOptions,
    parse_domain_xml,
    scaled_bytes,
)

UUID = "6695eb01-f6a4-8304-79aa-97f2502e193f"
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def domain(inner: str, *, attrs: str = "type='kvm' id='7'") -> str:
    return f"<domain {attrs}><name>vm1</name><uuid>{UUID}</uuid>{inner}</domain>"


# A live XML as libvirt writes it for an OpenStack instance with hotplug memory.
FULL = f"""
<domain type='kvm' id='12'>
  <name>instance-0000002a</name>
  <uuid>{UUID.upper()}</uuid>
  <metadata>
    <nova:instance xmlns:nova="http://openstack.org/xmlns/libvirt/nova/1.1">
      <nova:package version="27.1.0"/>
      <nova:name>web-1</nova:name>
      <nova:creationTime>2024-05-01 10:00:00</nova:creationTime>
      <nova:flavor name="m1.large"><nova:memory>8192</nova:memory></nova:flavor>
      <nova:owner>
        <nova:user uuid="0a1b">alice</nova:user>
        <nova:project uuid="9f8e">shop</nova:project>
      </nova:owner>
      <nova:root type="image" uuid="abcd"/>
    </nova:instance>
    <reclaimd:vm xmlns:reclaimd="{RECLAIMD_NS}">
      <reclaimd:reclaim enabled="no"/>
      <reclaimd:minimum unit="GiB">2</reclaimd:minimum>
    </reclaimd:vm>
  </metadata>
  <maxMemory slots='16' unit='KiB'>33554432</maxMemory>
  <memory unit='KiB'>9437184</memory>
  <currentMemory unit='KiB'>6291456</currentMemory>
  <memoryBacking>
    <hugepages>
      <page size='2048' unit='KiB' nodeset='0'/><page size='1' unit='G' nodeset='1'/>
    </hugepages>
    <nosharepages/>
    <locked/>
    <source type='memfd'/>
    <access mode='shared'/>
    <allocation mode='immediate' threads='4'/>
    <discard/>
  </memoryBacking>
  <cpu mode='host-model'>
    <numa>
      <cell id='0' cpus='0-1' memory='4194304' unit='KiB'/>
      <cell id='1' cpus='2-3' memory='4' unit='GiB'/>
    </numa>
  </cpu>
  <devices>
    <channel type='unix'>
      <source mode='bind' path='/var/lib/libvirt/qemu/channel/target/x/org.qemu.guest_agent.0'/>
      <target type='virtio' name='org.qemu.guest_agent.0' state='connected'/>
    </channel>
    <memballoon model='virtio' autodeflate='on' freePageReporting='on'>
      <stats period='10'/>
      <alias name='balloon0'/>
    </memballoon>
    <memory model='dimm'>
      <target><size unit='KiB'>524288</size><node>0</node></target>
      <alias name='dimm0'/>
    </memory>
    <memory model='virtio-mem'>
      <target>
        <size unit='GiB'>4</size><node>1</node><block unit='MiB'>2</block>
        <requested unit='MiB'>1024</requested><current unit='MiB'>512</current>
      </target>
      <alias name='virtiomem0'/>
    </memory>
  </devices>
</domain>
"""


def test_a_full_live_domain() -> None:
    facts = parse_domain_xml(FULL)
    assert facts.problems == ()
    assert (facts.uuid, facts.name, facts.domain_type, facts.id) == (
        UUID,
        "instance-0000002a",
        "kvm",
        12,
    )
    assert facts.memory_bytes == 9 * GiB
    assert facts.current_memory_bytes == 6 * GiB
    assert (facts.max_memory_bytes, facts.max_memory_slots) == (32 * GiB, 16)
    assert facts.numa_cells_bytes == (4 * GiB, 4 * GiB)
    assert facts.memory_devices == (
        MemoryDevice("dimm", "dimm0", size_bytes=512 * MiB, node=0),
        MemoryDevice(
            "virtio-mem",
            "virtiomem0",
            size_bytes=4 * GiB,
            node=1,
            requested_bytes=1 * GiB,
            current_bytes=512 * MiB,
            block_bytes=2 * MiB,
        ),
    )
    assert facts.balloon == Balloon(
        model="virtio",
        alias="balloon0",
        free_page_reporting=True,
        deflate_on_oom=True,
        stats_period=10,
    )
    assert facts.backing == MemoryBacking(
        source="memfd",
        hugepages=(HugePages(2 * MiB, "0"), HugePages(1 * GiB, "1")),
        access="shared",
        allocation="immediate",
        locked=True,
        nosharepages=True,
        discard=True,
    )
    assert facts.backing.uses_hugepages
    assert facts.agent_channel and facts.agent_connected is True
    assert facts.nova == NovaInstance(
        name="web-1",
        flavor="m1.large",
        project_name="shop",
        project_id="9f8e",
        user_name="alice",
        user_id="0a1b",
    )
    assert facts.options == ReclaimdOptions(present=True, reclaim=False, minimum_bytes=2 * GiB)


def test_a_minimal_inactive_domain() -> None:
    facts = parse_domain_xml(domain("<memory>1048576</memory>", attrs="type='qemu'"))
    assert facts.id is None
    assert facts.memory_bytes == 1 * GiB  # KiB when no unit is given
    assert facts.current_memory_bytes is None
    assert facts.balloon is None
    assert facts.backing == MemoryBacking() and not facts.backing.uses_hugepages
    assert not facts.agent_channel and facts.agent_connected is None
    assert facts.nova is None
    assert facts.options == ReclaimdOptions(present=False, reclaim=True, minimum_bytes=None)
    assert facts.problems == ()


def test_balloon_variants() -> None:
    assert parse_domain_xml(domain("<devices><memballoon model='none'/></devices>")).balloon is None
    off = parse_domain_xml(
        domain("<devices><memballoon model='virtio' freePageReporting='off'/></devices>")
    )
    assert off.balloon == Balloon(model="virtio", free_page_reporting=False)
    zero = parse_domain_xml(
        domain("<devices><memballoon model='virtio'><stats period='0'/></memballoon></devices>")
    )
    assert zero.balloon is not None and zero.balloon.stats_period == 0


def test_hugepages_without_a_size_mean_the_default_size() -> None:
    facts = parse_domain_xml(domain("<memoryBacking><hugepages/></memoryBacking>"))
    assert facts.backing.hugepages == (HugePages(None),)


def test_the_agent_channel_state_is_only_in_the_live_xml() -> None:
    channel = (
        "<devices><channel type='unix'><target type='virtio' name='{}'{}/></channel></devices>"
    )
    inactive = parse_domain_xml(domain(channel.format("org.qemu.guest_agent.0", "")))
    assert inactive.agent_channel and inactive.agent_connected is None
    other = parse_domain_xml(domain(channel.format("org.libguestfs.channel.0", "")))
    assert not other.agent_channel
    down = parse_domain_xml(
        domain(channel.format("org.qemu.guest_agent.0", " state='disconnected'"))
    )
    assert down.agent_connected is False


def test_other_nova_versions_and_options_without_the_namespace_on_children() -> None:
    xml = domain(
        "<metadata>"
        "<n:instance xmlns:n='http://openstack.org/xmlns/libvirt/nova/1.0'>"
        "<n:name>old</n:name></n:instance>"
        f"<r:vm xmlns:r='{RECLAIMD_NS}'><minimum>524288</minimum></r:vm>"
        "</metadata>"
    )
    facts = parse_domain_xml(xml)
    assert facts.nova == NovaInstance(name="old")
    assert facts.nova.labels() == {"instance_name": "old"}
    assert facts.options == ReclaimdOptions(present=True, reclaim=True, minimum_bytes=512 * MiB)


@pytest.mark.parametrize(
    ("text", "unit", "expected"),
    [
        ("1", None, KiB),
        ("1", "b", 1),
        ("1", "bytes", 1),
        ("1", "KB", 1000),
        ("1", "k", KiB),
        ("1", "KiB", KiB),
        ("3", "MB", 3 * 10**6),
        ("3", "M", 3 * MiB),
        ("3", "MiB", 3 * MiB),
        ("2", "GB", 2 * 10**9),
        ("2", "G", 2 * GiB),
        ("2", "gib", 2 * GiB),
        ("1", "TiB", 1 << 40),
        (" 42 ", "KiB", 42 * KiB),
    ],
)
def test_scaled_integers(text: str, unit: str | None, expected: int) -> None:
    assert scaled_bytes(text, unit) == expected


@pytest.mark.parametrize(
    ("text", "unit"),
    [("-1", None), ("1.5", "GiB"), ("", None), ("12", "parsecs"), ("9" * 30, None), ("8", "EiB")],
)
def test_bad_scaled_integers(text: str, unit: str | None) -> None:
    with pytest.raises(ValueError):
        scaled_bytes(text, unit)


def test_bad_values_become_none_with_a_problem_each() -> None:
    facts = parse_domain_xml(
        domain(
            "<memory unit='parsecs'>1</memory><currentMemory>-5</currentMemory>"
            "<devices><memballoon model='virtio' freePageReporting='maybe'>"
            "<stats period='soon'/></memballoon></devices>",
            attrs="type='kvm' id='x'",
        )
    )
    assert facts.id is None and facts.memory_bytes is None and facts.current_memory_bytes is None
    assert facts.balloon == Balloon(model="virtio")
    assert len(facts.problems) == 5, facts.problems
    assert any("freePageReporting" in p for p in facts.problems)


def test_labels_are_bounded_and_cleaned() -> None:
    long = "x" * 5000
    xml = domain(
        "<metadata><n:instance xmlns:n='http://openstack.org/xmlns/libvirt/nova/1.1'>"
        f"<n:name>a\tb\x7f{long}</n:name></n:instance></metadata>"
    )
    facts = parse_domain_xml(xml)
    assert facts.nova is not None and facts.nova.name is not None
    assert facts.nova.name.startswith("a b ") and len(facts.nova.name) == 256


@pytest.mark.parametrize(
    "xml",
    [
        "not xml",
        "<domain><name>x</name>",
        f"<network><name>n</name><uuid>{UUID}</uuid></network>",
        "<domain><uuid>" + UUID + "</uuid></domain>",
        "<domain><name>x</name><uuid>not-a-uuid</uuid></domain>",
        # Entity expansion ("billion laughs") and external entities are refused, DTD and all.
        '<?xml version="1.0"?><!DOCTYPE d [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;">]>'
        f"<domain><name>&b;</name><uuid>{UUID}</uuid></domain>",
        '<?xml version="1.0"?><!DOCTYPE d [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        f"<domain><name>&x;</name><uuid>{UUID}</uuid></domain>",
    ],
)
def test_unusable_documents_raise(xml: str) -> None:
    with pytest.raises(DomainXMLError):
        parse_domain_xml(xml)


def test_a_huge_document_is_refused_before_parsing() -> None:
    with pytest.raises(DomainXMLError, match="more than"):
        parse_domain_xml(domain("<description>" + "x" * MAX_XML_CHARS + "</description>"))


def test_problems_are_bounded() -> None:
    cells = "".join(f"<cell id='{i}' memory='bad'/>" for i in range(500))
    facts = parse_domain_xml(domain(f"<cpu><numa>{cells}</numa></cpu>"))
    assert facts.numa_cells_bytes == ()
    assert len(facts.problems) == 32
