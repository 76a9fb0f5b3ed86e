"""The daemon's reclaim estimate against simulated guests that know the truth, per workload.

Limits (fractions of guest RAM): reported 2 %, free_resident 5 %, stranded 10 %, judged on the
p90 of steady samples (see ``daemon.simguest.accuracy.ErrorSeries``). The full measurement
with a longer window is ``python bench/bench_fleet.py accuracy``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from daemon.simguest.accuracy import ErrorSeries
from daemon.simguest.guest import SimGuestSpec
from daemon.simguest.launcher import GuestProcess

pytestmark = pytest.mark.e2e

MiB = 1 << 20
WORKLOADS = ("memhog", "fragment", "pagecache", "idle")
WINDOW = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def attached() -> Iterator[tuple[str, dict[str, GuestProcess]]]:
    """Four guests, one per workload, and ``reclaimd serve`` attached to them."""
    with tempfile.TemporaryDirectory(prefix="sg-acc-") as tmp:
        vms = Path(tmp) / "vms"
        vms.mkdir()
        guests: dict[str, GuestProcess] = {}
        server: subprocess.Popen[bytes] | None = None
        try:
            for i, workload in enumerate(WORKLOADS):
                spec = SimGuestSpec(
                    name=workload,
                    ram_bytes=256 * MiB,
                    socket=vms / f"{workload}.qmp",
                    workload=workload,
                    seed=i + 1,
                )
                guests[workload] = GuestProcess.start(spec, log=Path(tmp) / f"{workload}.log")
            port = free_port()
            env = {k: v for k, v in os.environ.items() if not k.startswith("RECLAIMD_")}
            env.update(
                RECLAIMD_SOCKET_GLOB=str(vms / "*.qmp"),
                RECLAIMD_JOURNAL=str(Path(tmp) / "journal.sqlite3"),
                # Fresh inputs: the error measured is the estimate's, not the age of its inputs.
                RECLAIMD_STATS_INTERVAL="1",
                RECLAIMD_POLL_INTERVAL="1",
            )
            with open(Path(tmp) / "reclaimd.log", "wb") as log:
                server = subprocess.Popen(
                    [sys.executable, "-m", "daemon.cli", "serve", "--listen", f"127.0.0.1:{port}"],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            yield f"http://127.0.0.1:{port}", guests
        finally:
            if server is not None:
                server.send_signal(signal.SIGTERM)
                try:
                    server.wait(20)
                except subprocess.TimeoutExpired:
                    server.kill()
                    server.wait()
            for guest in guests.values():
                guest.stop()


def estimate_of(detail: dict[str, Any]) -> dict[str, int | None]:
    components = (detail.get("estimate") or {}).get("components") or {}
    return {k: (v or {}).get("bytes") for k, v in components.items()}


def test_estimate_matches_the_truth_under_each_workload(
    attached: tuple[str, dict[str, GuestProcess]],
) -> None:
    base, guests = attached
    with httpx.Client(base_url=base, timeout=10) as client:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if client.get("/healthz").json()["vms_up"] == len(guests):
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("reclaimd did not attach to all simulated guests within 30 s")
        time.sleep(6)  # first stats and first residency scans
        series = {name: ErrorSeries() for name in guests}
        started = time.monotonic()
        while time.monotonic() - started < WINDOW:
            time.sleep(2)
            for name, guest in guests.items():
                series[name].add(
                    estimate_of(client.get(f"/api/v1/vms/{name}").json()), guest.truth()
                )
    failures = []
    for name, s in series.items():
        for m in s.summary():
            if not m.ok:
                failures.append(
                    f"{name} {m.component}: p90 {m.p90}, steady p90 {m.steady_p90} "
                    f"({m.steady_samples} steady of {m.samples}), missing {m.missing}, "
                    f"limit {m.tolerance}"
                )
    assert failures == []
    # Workloads with quiet phases must have given steady samples, or the check measured nothing.
    for name in ("memhog", "pagecache", "idle"):
        assert series[name].summary()[0].steady_samples >= 10, name
