"""The QEMU pid of a domain: the pid file, checked against the process's -uuid, or /proc."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.libvirt.pid import find_qemu_pid, qemu_pid_of


@pytest.fixture
def fake_qemu() -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A real process whose command line carries ``-uuid UUID`` as libvirt's QEMU's does."""
    uuid = str(uuidlib.uuid4())
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "-name", "guest=vm1", "-uuid", uuid]
    )
    # Right after exec, /proc/PID/cmdline can still read empty.
    deadline = time.monotonic() + 10
    while b"-uuid" not in Path(f"/proc/{proc.pid}/cmdline").read_bytes():
        assert time.monotonic() < deadline, "the process never showed its command line"
        time.sleep(0.01)
    yield proc, uuid
    proc.kill()
    proc.wait()


def test_the_pid_file_of_the_running_qemu(
    tmp_path: Path, fake_qemu: tuple[subprocess.Popen[bytes], str]
) -> None:
    proc, uuid = fake_qemu
    (tmp_path / "vm1.pid").write_text(f"{proc.pid}")
    assert qemu_pid_of(proc.pid, uuid.upper())
    assert find_qemu_pid("vm1", uuid, state_dir=tmp_path, scan=False) == proc.pid


def test_a_stale_pid_file_is_not_believed(
    tmp_path: Path, fake_qemu: tuple[subprocess.Popen[bytes], str]
) -> None:
    proc, uuid = fake_qemu
    (tmp_path / "vm1.pid").write_text("1")  # pid 1 is not this domain's QEMU
    assert find_qemu_pid("vm1", uuid, state_dir=tmp_path, scan=False) is None
    # Scanning /proc finds the process that carries the UUID.
    assert find_qemu_pid("vm1", uuid, state_dir=tmp_path) == proc.pid
    assert find_qemu_pid("vm1", uuid, state_dir=None) == proc.pid


def test_no_such_process(tmp_path: Path) -> None:
    assert find_qemu_pid("vm1", str(uuidlib.uuid4()), state_dir=tmp_path) is None


@pytest.mark.parametrize("content", ["", "abc", "-5", "99999999999", "12 34", "\x00"])
def test_pid_files_that_are_not_a_pid(tmp_path: Path, content: str) -> None:
    (tmp_path / "vm1.pid").write_text(content)
    assert find_qemu_pid("vm1", str(uuidlib.uuid4()), state_dir=tmp_path, scan=False) is None


@pytest.mark.parametrize("name", ["", "../vm1", "a/b", ".hidden"])
def test_names_that_are_not_a_file_name_are_not_used_as_one(tmp_path: Path, name: str) -> None:
    (tmp_path / "vm1.pid").write_text("1")
    assert find_qemu_pid(name, str(uuidlib.uuid4()), state_dir=tmp_path / "x", scan=False) is None
