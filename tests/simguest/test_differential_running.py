"""A running simulated guest and a booted real guest (the test guest under QEMU) side by side.

What only a running guest shows: the balloon driver's first statistics, the stats polling
timer, and a balloon change converging with throttled ``BALLOON_CHANGE`` events. Replies must
match in shape, the same events must arrive, and both must converge to the target.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.simguest.guest import SimGuest, SimGuestSpec
from daemon.simguest.process import default_guest_os
from tests.simguest.conversations import (
    BALLOON,
    Step,
    Transcript,
    cmd,
    converse,
    qom_get,
    qom_set,
    shape,
)

pytestmark = pytest.mark.e2e

RAM_MIB = 256
TARGET = 192 << 20
STEPS = [
    cmd("qmp_capabilities", "exact"),
    cmd("query-status", "exact"),
    cmd("query-balloon", "exact"),
    qom_get(BALLOON, "guest-stats", "shape"),
    qom_get(BALLOON, "free-page-reporting"),
    qom_set(BALLOON, "guest-stats-polling-interval", 1),
    Step({"execute": "query-version"}, pause=2.5),
    qom_get(BALLOON, "guest-stats", "shape"),
    Step({"execute": "balloon", "arguments": {"value": TARGET}}, "exact", pause=4.0),
    cmd("query-balloon", "exact"),
    Step({"execute": "balloon", "arguments": {"value": RAM_MIB << 20}}, "exact", pause=4.0),
    cmd("query-balloon", "exact"),
]


@pytest.fixture
def real_guest(tmp_path: Path) -> Iterator[Path]:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 not found: install qemu-system-x86", pytrace=False)
    from daemon.testguest import GuestBuildError, QemuGuestSpec, build_image, launch

    try:
        image = build_image()
    except GuestBuildError as exc:
        pytest.fail(f"cannot build the test guest: {exc}", pytrace=False)
    spec = QemuGuestSpec(name="diffrun", ram_bytes=RAM_MIB << 20, memfd=True, qmp="server")
    with launch(spec, image, tmp_path / "qemu") as guest:
        guest.wait_ready(180)
        assert guest.qmp_path is not None
        yield guest.qmp_path


@pytest.fixture
async def sim_guest(tmp_path: Path) -> AsyncIterator[Path]:
    sock = tmp_path / "sim.qmp"
    spec = SimGuestSpec(name="diffrun", ram_bytes=RAM_MIB << 20, socket=sock, workload="idle")
    guest = SimGuest(spec, default_guest_os())
    await guest.start()
    try:
        yield sock
    finally:
        await guest.close()


def balloon_changes(t: Transcript, step: int) -> list[dict[str, Any]]:
    assert t.messages is not None
    return [m for m in t.messages[step] if m["event"] == "BALLOON_CHANGE"]


async def test_running_guests_look_alike(real_guest: Path, sim_guest: Path) -> None:
    real = await converse(str(real_guest), STEPS, timeout=60)
    sim = await converse(str(sim_guest), STEPS, timeout=60)
    problems = []
    for i, step in enumerate(STEPS):
        want, got = real.replies[i], sim.replies[i]
        same = [shape(r) for r in want] == [shape(r) for r in got]
        if not same or (step.compare == "exact" and want != got):
            problems.append(f"step {i} {step.request}: QEMU {want} vs sim {got}")
        if set(real.events[i]) != set(sim.events[i]):
            problems.append(f"step {i}: events {real.events[i]} vs {sim.events[i]}")
    assert problems == []

    for t in (real, sim):
        first, polled = t.replies[3][0]["return"], t.replies[7][0]["return"]
        # The driver pushed stats when it loaded; the 1 s timer then keeps them fresh.
        assert first["last-update"] > 0
        assert polled["last-update"] >= first["last-update"] + 1
        assert all(v < 2**64 - 1 for v in polled["stats"].values())
        for index, target in ((8, TARGET), (10, RAM_MIB << 20)):
            changes = balloon_changes(t, index)
            assert changes, "no BALLOON_CHANGE event"
            assert changes[-1]["data"] == {"actual": target}
            assert [set(c["data"]) for c in changes] == [{"actual"}] * len(changes)
