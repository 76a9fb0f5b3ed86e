"""Proxmox discovery on a real QEMU started in Proxmox's layout (a temporary root)."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from daemon.proxmox import CONFIG_DIR, RUN_DIR, discover
from daemon.testguest import GuestImage, QemuGuestSpec, launch

pytestmark = pytest.mark.e2e


@pytest.fixture
def root() -> Iterator[Path]:
    # Short: the QMP socket path under it must fit a Unix socket address.
    path = Path(tempfile.mkdtemp(prefix="rd-pve-"))
    (path / CONFIG_DIR).mkdir(parents=True)
    (path / RUN_DIR).mkdir(parents=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_real_qemu_in_the_proxmox_layout(root: Path, guest_image: GuestImage) -> None:
    run = root / RUN_DIR
    (root / CONFIG_DIR / "100.conf").write_text("name: pve-guest\nmemory: 128\nballoon: 64\n")
    spec = QemuGuestSpec(
        name="pve-guest",
        ram_bytes=128 << 20,
        qmp_path=run / "100.qmp",
        extra_args=("-pidfile", str(run / "100.pid")),
    )
    with launch(spec, guest_image, root / "guest"):
        deadline = time.monotonic() + 15
        while not (run / "100.pid").exists():
            assert time.monotonic() < deadline, "QEMU wrote no pid file"
            time.sleep(0.05)
        (vm,) = discover(root)
        assert vm.problems == ()
        assert vm.config is not None and vm.config.balloon_mib == 64

        async def query() -> tuple[str, str]:
            client = QMPClient("proxmox-test")
            await client.connect(str(vm.qmp_socket))
            try:
                name = await client.execute("query-name")
                status = await client.execute("query-status")
            finally:
                await client.disconnect()
            assert isinstance(name, dict) and isinstance(status, dict)
            return name["name"], status["status"]

        # The socket discovery found is this VM's, and the pid is its QEMU.
        assert asyncio.run(query()) == ("pve-guest", "running")
        assert vm.pid is not None
        assert Path(f"/proc/{vm.pid}/exe").resolve().name.startswith("qemu-system")
