"""HostView on a real QEMU -S (default RAM and memfd) and on a memory child; every failure typed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from daemon.host import bitmap
from daemon.host import view as view_module
from daemon.host.maps import Vma, parse_maps, read_maps_text
from daemon.host.ramblocks import GuestRamBlock, RamBlock
from daemon.host.residency import Method
from daemon.host.unavailable import Reason, Unavailable
from daemon.host.view import GuestRamScan, HostView
from tests.host.memchild import MemChild
from tests.host.qemu import BLOB_BYTES, BLOB_GPA, Qemu

MiB = 1 << 20
BLOB_PAGES = range(BLOB_GPA // 4096, (BLOB_GPA + BLOB_BYTES) // 4096)
NOBODY = 65534


def _view(q: Qemu, method: Method | None = None) -> HostView:
    return HostView.from_qmp(q.pid, q.ramblock_text, q.memdevs, q.ram_size, method=method)


def _scan(view: HostView) -> GuestRamScan:
    result = view.scan()
    assert isinstance(result, GuestRamScan), result
    return result


def test_default_ram(qemu_default: Qemu) -> None:
    """Anonymous RAM: located by size, scanned with PAGEMAP_SCAN; the loaded blob is resident."""
    view = _view(qemu_default)
    try:
        scan = _scan(view)
        [block] = scan.blocks
        assert (block.mapping.name, block.mapping.rule) == ("pc.ram", "anon-size")
        assert block.snapshot.method is Method.PAGEMAP_SCAN
        pages = block.snapshot.pages()
        assert pages[BLOB_PAGES].all()
        # QEMU asks for transparent huge pages on guest RAM: the blob may pull in whole 2 MiB
        # pages around it, but nothing outside them is touched while the guest is stopped.
        first, last = BLOB_PAGES.start & ~511, (BLOB_PAGES.stop + 511) & ~511
        assert not pages[:first].any() and not pages[last:].any()
        assert scan.covered_bytes == 256 * MiB and scan.backed_bytes == pages.sum() * 4096
        assert scan.missing == ()
        # The pagemap fallback sees the same pages.
        fallback = _scan(_view(qemu_default, Method.PAGEMAP)).blocks[0].snapshot
        assert np.array_equal(fallback.backed, block.snapshot.backed)
    finally:
        view.close()


def test_memfd_ram(qemu_memfd: Qemu) -> None:
    """memfd RAM: located by name, scanned through the file; exactly the blob is backed."""
    view = _view(qemu_memfd)
    try:
        [block] = _scan(view).blocks
        assert (block.mapping.name, block.mapping.rule) == ("ram0", "memfd-name")
        assert block.snapshot.method is Method.SEEK_DATA
        starts, ends = bitmap.to_ranges(block.snapshot.backed, block.snapshot.npages)
        assert (starts.tolist(), ends.tolist()) == ([BLOB_PAGES.start], [BLOB_PAGES.stop])
        for method in (Method.PAGEMAP_SCAN, Method.PAGEMAP):
            other = _scan(_view(qemu_memfd, method)).blocks[0].snapshot
            assert other.method is method
            assert np.array_equal(other.backed, block.snapshot.backed)
    finally:
        view.close()


def test_forcing_seek_data_on_anonymous_ram_says_why(qemu_default: Qemu) -> None:
    result = _view(qemu_default, Method.SEEK_DATA).scan()
    assert isinstance(result, Unavailable) and result.reason is Reason.UNSUPPORTED
    assert "pc.ram" in result.detail


def test_repeated_scans_reuse_the_layout(qemu_memfd: Qemu) -> None:
    view = _view(qemu_memfd)
    try:
        first = _scan(view)
        layout = view.layout
        second = _scan(view)
        assert view.layout is layout
        assert np.array_equal(first.blocks[0].snapshot.backed, second.blocks[0].snapshot.backed)
    finally:
        view.close()


def test_unknown_pid_and_bad_qmp_text() -> None:
    no_pid = HostView.from_qmp(None, "", None, None).scan()
    assert isinstance(no_pid, Unavailable) and no_pid.reason is Reason.NO_PROCESS
    assert "configured" in no_pid.detail
    garbage = HostView.from_qmp(os.getpid(), "what is this", None, None).scan()
    assert isinstance(garbage, Unavailable) and garbage.reason is Reason.UNKNOWN_LAYOUT
    no_text = HostView.from_qmp(os.getpid(), None, None, None).scan()
    assert isinstance(no_text, Unavailable) and no_text.reason is Reason.UNKNOWN_LAYOUT


def _child_blocks() -> list[GuestRamBlock]:
    size_a, size_b = 24 * MiB + 4096 * 3, 40 * MiB
    return [
        GuestRamBlock(RamBlock("ram-a", 4096, 0, size_a, size_a), "memdev-id"),
        GuestRamBlock(RamBlock("ram-b", 4096, size_a, size_b, size_b), "memdev-id"),
    ]


def test_partial_layout_and_exit_of_the_process() -> None:
    blocks = _child_blocks()
    with MemChild() as child:
        child.map("a", "anon", blocks[0].block.total)
        child.touch("a", [(0, 10)])
        view = HostView(child.pid, blocks)
        scan = _scan(view)
        assert [b.mapping.name for b in scan.blocks] == ["ram-a"]
        assert scan.backed_bytes == 10 * 4096
        [(name, why)] = scan.missing
        assert name == "ram-b" and why.reason is Reason.UNKNOWN_LAYOUT
        # A block that appears later is found on the next scan.
        child.map("b", "memfd", blocks[1].block.total)
        child.touch("b", [(5, 7)])
        scan = _scan(view)
        assert [(b.mapping.name, b.snapshot.method) for b in scan.blocks] == [
            ("ram-a", Method.PAGEMAP_SCAN),
            ("ram-b", Method.SEEK_DATA),
        ]
        assert scan.missing == () and scan.backed_bytes == 12 * 4096
        child.close()
        gone = view.scan()
        assert isinstance(gone, Unavailable) and gone.reason is Reason.NO_PROCESS
        view.close()


def test_maps_are_rechecked_on_a_period_and_a_moved_mapping_is_found(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    blocks = _child_blocks()[:1]
    size = blocks[0].block.total
    reads: list[int] = []
    parses: list[str] = []

    def counting_read(pid: int) -> object:
        reads.append(pid)
        return read_maps_text(pid)

    def counting_parse(text: str) -> list[Vma]:
        parses.append(text)
        return parse_maps(text)

    monkeypatch.setattr(view_module, "read_maps_text", counting_read)
    monkeypatch.setattr(view_module, "parse_maps", counting_parse)
    with MemChild() as child:
        first, _ = child.map("a", "memfd", size)
        child.touch("a", [(0, 3)])
        view = HostView(child.pid, blocks)
        assert _scan(view).backed_bytes == 3 * 4096
        _scan(view)
        assert len(reads) == len(parses) == 1  # within the period the layout is trusted
        view._maps_checked -= view_module.MAPS_RECHECK_SECONDS  # the period has passed
        _scan(view)
        assert len(reads) == 2 and len(parses) == 1  # the same text is not parsed again
        # QEMU never does this without telling over QMP; the periodic re-check is the guard.
        child.unmap("a")
        child.map("pad", "anon", size // 2)  # takes part of the freed address range
        moved, _ = child.map("a", "memfd", size)
        assert moved != first
        child.touch("a", [(0, 8)])
        view._maps_checked -= view_module.MAPS_RECHECK_SECONDS  # the period has passed
        scan = _scan(view)
        assert len(reads) == 3 and len(parses) == 2
        assert scan.blocks[0].mapping.start == moved and scan.backed_bytes == 8 * 4096
        view.close()


def test_page_table_method_follows_fragmentation() -> None:
    """Many short runs make pagemap the cheaper read; long runs bring PAGEMAP_SCAN back."""
    blocks = _child_blocks()[:1]
    npages = blocks[0].block.total // 4096
    with MemChild() as child:
        child.map("a", "anon", blocks[0].block.total)
        child.touch("a", [(p, p + 1) for p in range(0, npages, 2)])
        view = HostView(child.pid, blocks)
        methods = [_scan(view).blocks[0].snapshot.method for _ in range(2)]
        assert methods == [Method.PAGEMAP_SCAN, Method.PAGEMAP]
        child.touch("a", [(0, npages)])
        methods = [_scan(view).blocks[0].snapshot.method for _ in range(2)]
        assert methods == [Method.PAGEMAP, Method.PAGEMAP_SCAN]
        scan = _scan(view)
        assert scan.blocks[0].snapshot.runs == 1 and scan.backed_bytes == npages * 4096
        view.close()


def test_reused_pid_is_noticed() -> None:
    blocks = _child_blocks()[:1]
    with MemChild() as child:
        child.map("a", "anon", blocks[0].block.total)
        view = HostView(child.pid, blocks)
        _scan(view)
        assert view._start_time is not None
        view._start_time += 1  # as if the pid had belonged to an older process
        for _ in range(2):  # and it stays gone: whatever owns the pid now is not that QEMU
            reused = view.scan()
            assert isinstance(reused, Unavailable) and reused.reason is Reason.NO_PROCESS
            assert "another process" in reused.detail
        view.close()
        _scan(HostView(child.pid, blocks))  # a new view for the new owner


_AS_NOBODY = """
import json, os, sys
from daemon.host.view import HostView
os.setgroups([]); os.setgid({uid}); os.setuid({uid})
view = HostView.from_qmp({pid}, sys.stdin.read(), {memdevs!r}, None)
result = view.scan()
print(json.dumps({{"type": type(result).__name__, "reason": str(getattr(result, "reason", "")),
                   "detail": getattr(result, "detail", "")}}))
"""


def test_no_permission_as_another_user(qemu_default: Qemu) -> None:
    """An unprivileged reader of a root-owned QEMU gets a clear reason, not a crash."""
    assert os.geteuid() == 0, "this test drops from root to nobody; run the suite as root"
    code = _AS_NOBODY.format(uid=NOBODY, pid=qemu_default.pid, memdevs=qemu_default.memdevs)
    out = subprocess.run(
        [sys.executable, "-c", code],
        input=qemu_default.ramblock_text,
        capture_output=True,
        text=True,
        check=False,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["type"] == "Unavailable"
    assert result["reason"] == Reason.NO_PERMISSION
    assert (
        "permission denied" in result["detail"] and f"/proc/{qemu_default.pid}/" in result["detail"]
    )


@pytest.mark.parametrize("kind", ["memfd", "anon"])
def test_unchanged_tells_a_view_that_did_not_move_from_one_that_did(kind: str) -> None:
    """memfd RAM by the file's blocks (exact), anonymous RAM by the process's resident pages
    (per-CPU counters, exact to a few dozen pages): a look after a scan says "unchanged" until
    the host backs more (a page, or a 2 MiB block) or a 2 MiB block less."""
    blocks = _child_blocks()[:1]
    with MemChild() as child:
        child.map("a", kind, blocks[0].block.total)
        child.touch("a", [(0, 2048)])
        view = HostView(child.pid, blocks)
        assert not view.unchanged()  # never scanned: only a scan can tell
        _scan(view)
        assert view.unchanged() and view.unchanged()
        more = 1 if kind == "memfd" else 512
        child.touch("a", [(4096, 4096 + more)])
        assert not view.unchanged()
        _scan(view)
        assert view.unchanged()
        release = child.punch if kind == "memfd" else child.dontneed
        release("a", [(512, 1024)])  # what free page reporting returns
        assert not view.unchanged()
        _scan(view)
        assert view.unchanged()
        view._maps_checked -= view_module.MAPS_RECHECK_SECONDS  # the maps are due: same text
        assert view.unchanged()
        child.close()
        assert not view.unchanged()  # the process is gone
        view.close()
