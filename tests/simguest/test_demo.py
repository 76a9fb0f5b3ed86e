"""``reclaimd demo`` starts guests, the daemon and the API; Ctrl-C stops all of it."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from daemon.demo import summary_table


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def descendants(pid: int) -> set[int]:
    found: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                kids = {int(k) for k in f.read().split()}
        except FileNotFoundError:
            continue
        found |= kids
        todo.extend(kids)
    return found


def wait_for_vms(base: str, count: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "reclaimd demo exited early"
        try:
            if httpx.get(f"{base}/healthz", timeout=1).json().get("vms_up") == count:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    pytest.fail(f"the demo's API did not show {count} VMs up within {timeout} s")


@pytest.mark.parametrize(
    ("whole_group", "signum"),
    [(True, signal.SIGINT), (False, signal.SIGINT), (False, signal.SIGTERM)],
    ids=["ctrl-c", "sigint-to-demo-only", "sigterm"],
)
def test_demo_runs_and_ctrl_c_stops_everything(whole_group: bool, signum: int) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECLAIMD_")}
    argv = ["demo", "--guests", "2", "--ram", "64M", "--listen", f"127.0.0.1:{port}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon.cli", *argv, "--summary-every", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,  # its own process group, as a shell job in a terminal
    )
    try:
        wait_for_vms(base, 2, proc, timeout=30)
        vms = httpx.get(f"{base}/api/v1/vms", timeout=5).json()["vms"]
        assert sorted(vm["name"] for vm in vms) == ["sim-fragment-2", "sim-memhog-1"]
        assert httpx.get(f"{base}/metrics", timeout=5).text.count("qemu_vm_up{") == 2
        time.sleep(1.5)  # at least one live summary
        children = descendants(proc.pid)
        assert len(children) >= 2
        if whole_group:
            os.killpg(proc.pid, signum)  # what Ctrl-C in a terminal does
        else:
            proc.send_signal(signum)  # SIGTERM: what systemd, docker or kill send
        output, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = output.decode(errors="replace")
    assert proc.returncode == 0, text
    assert f"{base}/api/v1/vms" in text and f"{base}/metrics" in text
    assert re.search(r"Authorization: Bearer \S{16,}", text)
    assert "sim-memhog-1" in text and "RECLAIMABLE" in text  # the live summary
    # The host's use per VM, known for every simulated guest (its RAM is a real memfd).
    rows = [line.split() for line in text.splitlines() if line.startswith("sim-memhog-1 ")]
    assert rows and any(row[3] != "-" and int(row[3]) > 0 for row in rows), text
    workdir = re.search(r"files\s+(\S+)", text)
    assert workdir is not None and not Path(workdir[1]).exists(), "temporary files left behind"
    time.sleep(0.2)
    left = [p for p in children if os.path.exists(f"/proc/{p}")]
    assert left == [], f"processes left running: {left}"


def test_summary_table_shows_dashes_for_unknown_numbers() -> None:
    text = summary_table(
        [
            {
                "name": "b",
                "up": True,
                "ram_bytes": 512 << 20,
                "host_resident_bytes": 300 << 20,
                "balloon_actual_bytes": 256 << 20,
                "guest_free_bytes": None,
                "estimate": {"components": {"reported": {"bytes": 64 << 20}}},
            },
            {"name": "a", "up": False},
        ]
    )
    lines = text.strip().splitlines()
    assert lines[0].split() == [
        "VM",
        "UP",
        "RAM",
        "HOST",
        "BALLOON",
        "FREE",
        "AVAIL",
        "REPORTED",
        "RECLAIMABLE",
    ]
    assert lines[1].split() == ["a", "no", "-", "-", "-", "-", "-", "-", "-"]
    assert lines[2].split() == ["b", "yes", "512", "300", "256", "-", "-", "64", "-"]
