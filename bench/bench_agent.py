"""Guest agent reads against the real test guest, and what the agent costs its boot.

Read latency: one booted guest (512 MiB, TCG), ``AgentReader.read`` repeated. "full" reads
buddyinfo, meminfo and page_reporting_order every time (order_ttl 0); "usual" is what a poll
does with the order cached (buddyinfo and meminfo, opened, read and closed together: 6 commands
in 3 waves); "pagetypeinfo" adds that file to "full". guest-info is asked once, before the
timed reads. Wall time per read, and the CPU
time of this (host) process per read, which is what 500 VMs multiply.

Boot: seconds from QEMU's start to console lines (the kernel's banner, "Run /init", the init's
markers up to "ready"), for the image with the agent and its device (the default), the same
image without the device (QemuGuestSpec(agent=False): no virtio-serial, no qemu-ga), and an
initramfs with the agent's files taken out (the image as it was before the agent). "to kernel"
is firmware plus loading kernel and initrd (grows with the initrd); "agent step" is from the
balloon marker to the agent marker (finding the port, starting qemu-ga).

Usage: python bench/bench_agent.py [--reads N] [--boots N] [--results bench/RESULTS-agent.md]
About 5 minutes of one core (TCG boots) with the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from machine import cpu_model  # bench/machine.py: scripts run from bench/

from daemon.agent import AgentReader, FreeLists, ReaderConfig, SocketTransport
from daemon.testguest import GuestImage, QemuGuestSpec, build_image, launch
from daemon.testguest.agent import GUEST_PATH

RAM_MIB = 512
NEWC_HEADER = 110


def _newc_members(archive: bytes) -> list[tuple[str, bytes]]:
    """(name, whole member bytes) of a newc cpio archive, trailer included."""
    members = []
    pos = 0
    while pos < len(archive):
        header = archive[pos : pos + NEWC_HEADER]
        size = int(header[54:62], 16)
        namesize = int(header[94:102], 16)
        name_end = pos + NEWC_HEADER + namesize
        data_start = name_end + (-(NEWC_HEADER + namesize) % 4)
        end = data_start + size + (-size % 4)
        name = archive[pos + NEWC_HEADER : name_end - 1].decode()
        members.append((name, archive[pos:end]))
        pos = end
        if name == "TRAILER!!!":
            break
    return members


def image_without_agent(image: GuestImage, into: Path) -> GuestImage:
    """The same image with qemu-ga and its libraries taken out of the initramfs."""
    agent_dirs = ("usr/sbin/", "lib/x86_64-linux-gnu/", "lib64/")
    kept = [
        data
        for name, data in _newc_members(gzip.decompress(image.initrd.read_bytes()))
        if name != GUEST_PATH and not name.startswith(agent_dirs)
    ]
    initrd = into / "initrd-without-agent.gz"
    initrd.write_bytes(gzip.compress(b"".join(kept), compresslevel=6, mtime=0))
    return replace(image, initrd=initrd)


# Console lines whose first appearance is timed (host clock, polled every 20 ms).
MARKS = {
    "kernel": "Linux version",
    "init": "Run /init as init process",
    "balloon": "RECLAIMD-GUEST: balloon=",
    "agent": "RECLAIMD-GUEST: agent ",
    "ready": "RECLAIMD-GUEST: ready",
}


def boot_marks(spec: QemuGuestSpec, image: GuestImage, run_dir: Path) -> dict[str, float]:
    """Seconds from QEMU's start to the first console line with each of ``MARKS``."""
    started = time.monotonic()
    seen: dict[str, float] = {}
    with launch(spec, image, run_dir) as guest:
        while "ready" not in seen:
            console = guest.console()
            now = time.monotonic() - started
            for name, text in MARKS.items():
                if name not in seen and text in console:
                    seen[name] = now
            if guest.returncode is not None or now > 300:
                raise RuntimeError(f"boot failed:\n{guest.diagnostics()}")
            time.sleep(0.02)
    return seen


async def time_reads(path: Path, config: ReaderConfig, reads: int) -> tuple[list[float], float]:
    reader = AgentReader(SocketTransport(path, connect_timeout=10.0), config)
    try:
        first = await reader.read(RAM_MIB << 20)  # connect, sync, guest-info
        assert isinstance(first, FreeLists), first
        walls = []
        cpu_start = time.process_time()
        for _ in range(reads):
            started = time.perf_counter()
            result = await reader.read(RAM_MIB << 20)
            walls.append(time.perf_counter() - started)
            assert isinstance(result, FreeLists), result
        cpu = (time.process_time() - cpu_start) / reads
    finally:
        await reader.close()
    return walls, cpu


def phase(marks: list[dict[str, float]], start: str | None, end: str) -> float:
    """Median seconds from mark ``start`` (QEMU's start when None) to mark ``end``."""
    return statistics.median(m[end] - (m[start] if start else 0.0) for m in marks)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def qemu_version() -> str:
    done = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True)
    return done.stdout.splitlines()[0] if done.returncode == 0 else "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reads", type=int, default=100)
    parser.add_argument("--boots", type=int, default=3)
    parser.add_argument(
        "--results", type=Path, default=Path(__file__).with_name("RESULTS-agent.md")
    )
    args = parser.parse_args()

    image = build_image()
    work = Path(tempfile.mkdtemp(prefix="bench-agent-"))
    cases = {
        "full": ReaderConfig(order_ttl=0.0),
        "usual": ReaderConfig(),
        "pagetypeinfo": ReaderConfig(order_ttl=0.0, pagetypeinfo=True),
    }
    reads: dict[str, tuple[list[float], float]] = {}
    with launch(
        QemuGuestSpec(name="bench-agent", ram_bytes=RAM_MIB << 20), image, work / "reads"
    ) as guest:
        guest.wait_ready(300)
        assert guest.agent_path is not None
        for name, config in cases.items():
            reads[name] = asyncio.run(time_reads(guest.agent_path, config, args.reads))
            print(f"{name}: median {statistics.median(reads[name][0]) * 1000:.1f} ms", flush=True)

    bare = image_without_agent(image, work)
    boots_of = {
        "agent and its device (default)": (
            QemuGuestSpec(name="b1", ram_bytes=RAM_MIB << 20),
            image,
        ),
        "same image, no device (agent=False)": (
            QemuGuestSpec(name="b2", ram_bytes=RAM_MIB << 20, agent=False),
            image,
        ),
        "no agent files, no device (as before)": (
            QemuGuestSpec(name="b3", ram_bytes=RAM_MIB << 20, agent=False),
            bare,
        ),
    }
    boots: dict[str, list[dict[str, float]]] = {name: [] for name in boots_of}
    for round_ in range(args.boots):  # interleaved, so a change in machine load hits all alike
        for name, (spec, img) in boots_of.items():
            boots[name].append(boot_marks(spec, img, work / f"boot-{round_}-{spec.name}"))
            print(f"boot {name}: {boots[name][-1]}", flush=True)

    sizes = {"with agent": image.initrd.stat().st_size, "without": bare.initrd.stat().st_size}
    lines = [
        "# Guest agent: read latency and boot cost",
        "",
        f"Command: `python bench/bench_agent.py --reads {args.reads} --boots {args.boots}` "
        f"(run {time.strftime('%Y-%m-%d')})",
        "",
        f"- CPU: {cpu_model()}, {os.cpu_count()} cores",
        f"- Kernel: {platform.release()}; guest: {image.kernel_release}, {RAM_MIB} MiB, 1 vCPU",
        f"- {qemu_version()}, accel {guest.accel.name}",
        f"- Python: {platform.python_version()}",
        "- Load average at the end (other work on the machine): "
        + ", ".join(f"{x:.2f}" for x in os.getloadavg()),
        "",
        f"One read through the agent (`AgentReader.read`, {args.reads} reads each, guest-info "
        "asked once before):",
        "",
        "| read | files | commands (waves) | median ms | p90 ms | max ms | host CPU ms/read |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    files = {
        "full": ("buddyinfo, meminfo, page_reporting_order", "9 (6)"),
        "usual": ("buddyinfo, meminfo (order cached)", "6 (3)"),
        "pagetypeinfo": ("full + pagetypeinfo", "12 (9)"),
    }
    for name, (walls, cpu) in reads.items():
        what, trips = files[name]
        lines.append(
            f"| {name} | {what} | {trips} | {statistics.median(walls) * 1000:.1f} | "
            f"{percentile(walls, 0.9) * 1000:.1f} | {max(walls) * 1000:.1f} | {cpu * 1000:.2f} |"
        )
    lines += [
        "",
        f"Boot phases, median seconds of {args.boots} boots each (interleaved), from QEMU's "
        "start, on the host's clock:",
        "",
        "| guest | to kernel | kernel to /init | agent step in /init | to ready (min-max) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, marks in boots.items():
        ready = [m["ready"] for m in marks]
        lines.append(
            f"| {name} | {phase(marks, None, 'kernel'):.1f} | {phase(marks, 'kernel', 'init'):.1f} "
            f"| {phase(marks, 'balloon', 'agent'):.2f} | "
            f"{statistics.median(ready):.1f} ({min(ready):.1f}-{max(ready):.1f}) |"
        )
    lines += [
        "",
        f"initrd.gz: {sizes['with agent'] / 1e6:.1f} MB with the agent, "
        f"{sizes['without'] / 1e6:.1f} MB without.",
        "",
    ]
    args.results.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
