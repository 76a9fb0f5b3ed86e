"""The reclaimd command as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.e2e.reclaimd_proc import ReclaimdProcess

RECLAIMD = [sys.executable, "-m", "daemon.cli"]


def test_serve_refuses_a_bad_vm_flag() -> None:
    done = subprocess.run(
        [*RECLAIMD, "serve", "--vm", "nope"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "expected NAME=ADDRESS" in done.stderr


def test_vms_table_from_a_running_daemon(sockdir: Path) -> None:
    absent = sockdir / "absent.qmp"
    daemon = ReclaimdProcess(sockdir, ["--vm", f"ghost=unix:{absent}"])
    try:
        done = subprocess.run(
            [*RECLAIMD, "vms", "--url", daemon.url], capture_output=True, text=True, timeout=60
        )
    finally:
        daemon.stop()
    assert done.returncode == 0, done.stderr
    header, row = done.stdout.splitlines()[:2]
    assert header.split()[:3] == ["VM", "UP", "MODE"]
    assert row.split()[:3] == ["ghost", "no", "connect"]


def test_vms_says_when_no_daemon_answers() -> None:
    done = subprocess.run(
        [*RECLAIMD, "vms", "--url", "http://127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "cannot read" in done.stderr
