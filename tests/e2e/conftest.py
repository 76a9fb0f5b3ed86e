"""Fixtures for end-to-end tests that boot the real test guest under QEMU.

``guest_image`` builds the image once per session (or finds it in the cache) and fails, never
skips, when QEMU, busybox-static or apt is missing. ``boot_guest(spec)`` boots a guest, waits for
its init to be ready (unless ``ready=False``), and always ends every QEMU it started.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.testguest import (
    GuestBuildError,
    GuestImage,
    QemuGuestSpec,
    RunningGuest,
    build_image,
    launch,
)
from tests.e2e.reclaimd_proc import ReclaimdProcess

# Under TCG on a loaded 2-core CI machine a guest can take several times its usual 5-15 s.
READY_TIMEOUT = 180.0

BootGuest = Callable[..., RunningGuest]


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 not found: install qemu-system-x86", pytrace=False)
    try:
        return build_image()
    except GuestBuildError as exc:
        pytest.fail(f"cannot build the test guest: {exc}", pytrace=False)


def wait_guest_ready(guest: RunningGuest, timeout: float = READY_TIMEOUT) -> RunningGuest:
    """Wait until the guest's init printed ``ready`` and its control channel answers."""
    guest.wait_ready(timeout)
    return guest


@pytest.fixture
def boot_guest(guest_image: GuestImage, tmp_path: Path) -> Iterator[BootGuest]:
    """``boot_guest(spec, ready=True) -> RunningGuest``; logs are kept under ``tmp_path``."""
    started: list[RunningGuest] = []

    def boot(spec: QemuGuestSpec, ready: bool = True) -> RunningGuest:
        guest = launch(spec, guest_image, tmp_path / f"guest{len(started)}-{spec.name}")
        started.append(guest)
        if ready:
            wait_guest_ready(guest)
        return guest

    yield boot
    for guest in started:
        guest.close()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory whose paths fit a Unix socket address (tmp_path often does not)."""
    path = Path(tempfile.mkdtemp(prefix="reclaimd-e2e-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def reclaimd(short_dir: Path) -> Iterator[Callable[..., ReclaimdProcess]]:
    """``reclaimd(*args, env=None, ...)``: ``reclaimd serve ARGS`` as a subprocess; all end."""
    started: list[ReclaimdProcess] = []

    def start(*args: str, **kwargs: Any) -> ReclaimdProcess:
        proc = ReclaimdProcess(short_dir, args, **kwargs)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()
