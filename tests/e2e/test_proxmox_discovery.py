"""Proxmox discovery on a real QEMU started in Proxmox's layout (a temporary root)."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from daemon.proxmox import CONFIG_DIR, RUN_DIR, discover
from daemon.testguest import GuestImage, QemuGuestSpec, launch
from tests.e2e.reclaimd_proc import ReclaimdProcess

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


def test_reclaimd_serve_proxmox_polls_the_vms_of_the_layout(
    root: Path, guest_image: GuestImage, reclaimd: Callable[..., ReclaimdProcess]
) -> None:
    run = root / RUN_DIR
    # The configuration's name, not QEMU's -name, names the VM.
    (root / CONFIG_DIR / "101.conf").write_text("name: web-pve\nmemory: 128\n")
    spec = QemuGuestSpec(
        name="qemu-name",
        ram_bytes=128 << 20,
        qmp_path=run / "101.qmp",
        extra_args=("-pidfile", str(run / "101.pid")),
    )
    with launch(spec, guest_image, root / "guest") as guest:
        deadline = time.monotonic() + 15
        while not (run / "101.pid").exists():
            assert time.monotonic() < deadline, "QEMU wrote no pid file"
            time.sleep(0.05)
        pid = int((run / "101.pid").read_text())
        rd = reclaimd("--proxmox", str(root))
        vm = rd.wait_for(
            lambda: (
                (v := rd.client.get("/api/v1/vms/web-pve")).status_code == 200
                and v.json()["up"]
                and v.json()
            ),
            20,
            "the Proxmox VM polled",
        )
        assert vm["attach"] == "poll"
        assert vm["pid"] == pid
        assert vm["qemu_name"] == "qemu-name"
        assert vm["ram_bytes"] == 128 << 20
        guest.wait_ready(180)
        rd.wait_for(
            lambda: (rd.get("/api/v1/vms/web-pve").get("guest_stats") or {}).get("valid"),
            30,
            "guest stats through poll mode",
        )

        # Poll mode never holds the socket: Proxmox's own tools get in between polls.
        async def query() -> str:
            client = QMPClient("proxmox-tool")
            for _ in range(50):
                try:
                    await client.connect(str(run / "101.qmp"))
                    break
                except Exception:  # reclaimd's poll holds it for a moment
                    await asyncio.sleep(0.1)
            try:
                status = await client.execute("query-status")
            finally:
                await client.disconnect()
            assert isinstance(status, dict)
            return str(status["status"])

        for _ in range(3):
            assert asyncio.run(query()) == "running"
        assert rd.get("/api/v1/vms/web-pve")["up"] is True
    # QEMU gone, its socket with it: the VM goes.
    (run / "101.qmp").unlink(missing_ok=True)
    rd.wait_for(
        lambda: rd.client.get("/api/v1/vms/web-pve").status_code == 404, 10, "the VM removed"
    )
