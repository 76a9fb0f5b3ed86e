"""Simulated guests as processes: one per guest, looking to the host like one QEMU each."""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.host.maps import MEMFD_NAME, parse_maps
from daemon.host.peercred import peer_pid
from daemon.simguest.cli import build_parser, fleet_specs, parse_size, run_spec
from daemon.simguest.guest import SimGuestSpec
from daemon.simguest.launcher import FleetProcess, GuestProcess, LaunchError, spec_argv

MiB = 1 << 20


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes; pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="sg-") as d:
        yield Path(d)


class QMP:
    """A minimal blocking QMP client for talking to a guest process."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rwb")
        self.greeting = json.loads(self.file.readline())
        self.events: list[dict[str, Any]] = []
        self.execute("qmp_capabilities")

    def execute(self, command: str, **arguments: Any) -> Any:
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self.file.write(json.dumps(request).encode() + b"\n")
        self.file.flush()
        while True:
            msg = json.loads(self.file.readline())
            if "event" in msg:
                self.events.append(msg)
                continue
            return msg

    def read_event(self) -> dict[str, Any]:
        return dict(json.loads(self.file.readline()))

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def memfd_mappings(pid: int) -> int:
    with open(f"/proc/{pid}/maps") as f:
        return sum(1 for v in parse_maps(f.read()) if v.path == MEMFD_NAME)


def test_a_guest_process_is_its_own_qemu(short_dir: Path) -> None:
    spec = SimGuestSpec(name="p1", ram_bytes=64 * MiB, socket=short_dir / "p1.qmp", workload="idle")
    with GuestProcess.start(spec, log=short_dir / "p1.log") as guest:
        qmp = QMP(short_dir / "p1.qmp")
        assert peer_pid(qmp.sock) == guest.pid != os.getpid()
        assert memfd_mappings(guest.pid) == 1
        assert qmp.execute("query-name") == {"return": {"name": "p1"}}
        stats = qmp.execute("qom-get", path="/machine/peripheral/balloon0", property="guest-stats")[
            "return"
        ]
        assert stats["last-update"] > 0  # the driver pushed its first stats when it loaded
        truth = guest.truth()
        assert truth["pid"] == guest.pid and truth["ram_bytes"] == 64 * MiB
        assert truth["components"]["used"] > 0
        # SIGTERM: QEMU's host-signal shutdown, then the process exits and cleans up.
        assert guest.stop() == 0
        event = qmp.read_event()
        assert event["event"] == "SHUTDOWN"
        assert event["data"] == {"guest": False, "reason": "host-signal"}
        qmp.close()
    assert sorted(p.name for p in short_dir.iterdir()) == ["p1.log"]


def test_a_guest_that_cannot_start_reports_why(short_dir: Path) -> None:
    spec = SimGuestSpec(name="bad", ram_bytes=8 * MiB, socket=short_dir / "b.qmp", workload="nope")
    with pytest.raises(LaunchError, match="unknown workload 'nope'"):
        GuestProcess.start(spec, log=short_dir / "bad.log", timeout=20)


def test_a_fleet_forks_one_process_per_guest_and_ends_them_all(short_dir: Path) -> None:
    count = 12
    with FleetProcess.start(
        count=count,
        directory=short_dir / "vms",
        ram_bytes=8 * MiB,
        workloads=("idle", "fragment"),
        log=short_dir / "fleet.log",
    ) as fleet:
        pids = set()
        for i, path in enumerate(fleet.sockets):
            qmp = QMP(path)
            pid = peer_pid(qmp.sock)
            assert pid is not None
            pids.add(pid)
            assert memfd_mappings(pid) == 1
            assert qmp.execute("query-name")["return"]["name"] == f"sim{i:03d}"
            qmp.close()
            assert fleet.truth(i)["pid"] == pid
        assert len(pids) == count and fleet.pid not in pids
        assert fleet.stop() == 0
    deadline = time.monotonic() + 5
    while any(os.path.exists(f"/proc/{p}") for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(os.path.exists(f"/proc/{p}") for p in pids), "a guest process outlived stop()"
    assert list((short_dir / "vms").iterdir()) == []


def test_command_line_round_trip() -> None:
    spec = SimGuestSpec(
        name="x",
        ram_bytes=64 * MiB,
        socket=Path("/run/x.qmp"),
        connect=Path("/run/mgr.sock"),
        reconnect=2.5,
        workload="memhog",
        seed=7,
        free_page_reporting=False,
        deflate_on_oom=True,
        page_reporting_order=5,
        agent=False,
        agent_block_rpcs=("guest-file-open", "guest-file-read"),
        start_paused=True,
        time_scale=3.0,
        tick=0.2,
        uuid="u-x",
    )
    again = run_spec(build_parser().parse_args(spec_argv(spec)))
    assert again == spec


def test_fleet_specs_name_sockets_and_cycle_workloads() -> None:
    args = build_parser().parse_args(
        ["fleet", "--count", "3", "--dir", "/d", "--workloads", "idle,memhog", "--seed", "5"]
    )
    specs = fleet_specs(args)
    assert [(s.name, s.workload, s.seed) for s in specs] == [
        ("sim000", "idle", 5),
        ("sim001", "memhog", 6),
        ("sim002", "idle", 7),
    ]
    assert specs[1].socket == Path("/d/sim001.qmp")


@pytest.mark.parametrize(
    ("text", "value"), [("256M", 256 * MiB), ("1G", 1 << 30), ("64MiB", 64 * MiB), ("4096", 4096)]
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value
