"""The same QMP conversations with real QEMU and with a simulated guest give the same replies.

Both sides run as ``-S`` would: the guest has not started, so no driver has touched the balloon.
Errors must match exactly (class and text); returns must match in shape or, where a step says
so, exactly. ``test_fixture_matches_live_qemu`` keeps the captured fixture honest.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from daemon.simguest.guest import SimGuest, SimGuestSpec
from tests.simguest.conversations import (
    CONVERSATIONS,
    FIXTURE,
    RAM_BYTES,
    VM_NAME,
    VM_UUID,
    Transcript,
    converse,
    differences,
)
from tests.simguest.qemu_stopped import QemuMissing, stopped_qemu


def fixture_transcripts() -> dict[str, Transcript]:
    doc = json.loads(FIXTURE.read_text())
    return {name: Transcript.from_json(t) for name, t in doc["conversations"].items()}


@pytest.fixture
async def stopped_simguest(tmp_path: Path) -> AsyncIterator[Path]:
    sock = tmp_path / "sim.qmp"
    spec = SimGuestSpec(
        name=VM_NAME, ram_bytes=RAM_BYTES, socket=sock, start_paused=True, uuid=VM_UUID
    )
    guest = SimGuest(spec, guest_os=None)
    await guest.start()
    try:
        yield sock
    finally:
        await guest.close()


def test_fixture_covers_every_conversation() -> None:
    captured = fixture_transcripts()
    assert set(captured) == set(CONVERSATIONS), "re-run python -m tests.simguest.qemu_stopped"
    for name, steps in CONVERSATIONS.items():
        assert len(captured[name].replies) == len(steps), name


@pytest.mark.parametrize("name", list(CONVERSATIONS))
async def test_simguest_answers_like_captured_qemu(name: str, stopped_simguest: Path) -> None:
    steps = CONVERSATIONS[name]
    sim = await converse(str(stopped_simguest), steps)
    assert differences(fixture_transcripts()[name], sim, steps) == []


@pytest.mark.e2e
async def test_simguest_answers_like_live_qemu(tmp_path: Path, stopped_simguest: Path) -> None:
    sock = tmp_path / "qemu.qmp"
    try:
        with stopped_qemu(sock):
            live = {name: await converse(str(sock), s) for name, s in CONVERSATIONS.items()}
    except QemuMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    problems = []
    for name, steps in CONVERSATIONS.items():
        sim = await converse(str(stopped_simguest), steps)
        problems += [f"{name}: {d}" for d in differences(live[name], sim, steps)]
        # The fixture must still be what this QEMU says, or the offline test checks a fiction.
        captured = fixture_transcripts()[name]
        problems += [f"fixture {name}: {d}" for d in differences(live[name], captured, steps)]
    assert problems == []
