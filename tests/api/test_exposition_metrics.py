"""The whole ``/metrics`` body: the fleet's text, then build info, then the daemon's instruments.

The ``qemu_*`` part is pinned byte for byte by the golden file (test_metrics_golden.py); these
tests pin what comes after it, the route's content type, and that Prometheus's own promtool
accepts the exposition of a 500-VM fleet.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess

import httpx
import pytest
from prometheus_client import generate_latest

from api.app import create_app
from api.metrics import exposition
from api.version import VERSION
from daemon.config import Settings
from daemon.fleet import Fleet
from daemon.instruments import REGISTRY as DAEMON_REGISTRY
from daemon.service import Reclaimd
from tests.api.test_metrics_golden import GOLDEN, NOW, known_fleet

# VM names are whatever QEMU or the configuration says: the text must stay parseable.
ODD_NAMES = ('quote"d', "back\\slash", "new\nline", "ünïcødé ☃")


def test_daemon_instruments_follow_the_fleet_part() -> None:
    text = exposition(known_fleet(), now=NOW).decode()
    fleet_part = GOLDEN.read_text()
    build_info = (
        "# HELP reclaimd_build_info reclaimd build; always 1\n"
        "# TYPE reclaimd_build_info gauge\n"
        f'reclaimd_build_info{{version="{VERSION}"}} 1.0\n'
    )
    daemon = generate_latest(DAEMON_REGISTRY).decode()
    # The process's own series move between two renderings (memory, CPU time): compared by
    # name, the daemon's instruments after them byte for byte.
    own = daemon.index("# HELP reclaimd_")
    assert text.startswith(fleet_part + build_info)
    assert text.endswith(daemon[own:])
    names = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    assert {"process_resident_memory_bytes", "process_cpu_seconds_total", "python_info"} <= names


async def test_metrics_route_serves_the_exposition(settings: Settings) -> None:
    daemon = Reclaimd(settings)  # not started: the route only reads the fleet
    daemon.fleet = known_fleet()
    app = create_app(settings, daemon)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as client:
        reply = await client.get("/metrics")
    assert reply.status_code == 200
    assert reply.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    # Up to the process's own series (its CPU time moves between the two renderings).
    process = b"# HELP process_"
    fleet_part = exposition(daemon.fleet).split(process)[0]
    assert reply.content.split(process)[0] == fleet_part
    stamp = 'qemu_guest_stats_last_update_timestamp_seconds{vm="web1"} 1.799999997e+09\n'
    assert stamp in reply.text


def big_fleet(count: int) -> Fleet:
    """`count` VMs shaped like known_fleet's web1 (every series set), a few with odd names."""
    web1 = known_fleet().get("web1")
    assert web1 is not None
    fleet = Fleet()
    for i in range(count):
        name = ODD_NAMES[i] if i < len(ODD_NAMES) else f"vm-{i:04d}"
        vm = fleet.add(name, f"unix:/run/qemu/{i}.qmp", "connect")
        for field in dataclasses.fields(web1):
            if field.name not in ("name", "address", "attach"):
                setattr(vm, field.name, getattr(web1, field.name))
        vm.event_counts = {"BALLOON_CHANGE": i, "RESUME": 1, "STOP": 1, "RTC_CHANGE": 2 * i}
    return fleet


def test_promtool_accepts_500_vms() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail(
            "promtool not found on PATH: install Prometheus (Debian's prometheus package, "
            "as deploy/install-deps.sh does)",
            pytrace=False,
        )
    text = exposition(big_fleet(500), now=NOW)
    assert text.count(b'\nqemu_vm_up{vm="') == 500
    done = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, timeout=60, check=False
    )
    report = (done.stdout + done.stderr).decode(errors="replace")
    # 0: valid and no lint findings (3 would be valid with naming advice): clean.
    assert done.returncode == 0, f"promtool check metrics is not clean:\n{report}"
