"""The QEMU command line, the accelerator choice and the RunningGuest lifecycle (with a fake
QEMU that only opens its sockets: booting the real guest is tests/e2e's job)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from daemon.testguest import accel
from daemon.testguest.build import GuestImage
from daemon.testguest.errors import GuestExitedError, GuestLaunchError, GuestTimeoutError
from daemon.testguest.launch import GuestPaths, QemuGuestSpec, launch, qemu_argv

IMAGE = GuestImage(
    directory=Path("/img"),
    kernel=Path("/img/vmlinuz"),
    initrd=Path("/img/initrd.gz"),
    kernel_package="linux-image-9.9.9-1-amd64",
    kernel_version="9.9.9-1",
    kernel_release="9.9.9-1-amd64",
    key="0" * 64,
)
PATHS = GuestPaths(
    console_log=Path("/run/g/console.log"),
    qemu_log=Path("/run/g/qemu.log"),
    control=Path("/run/g/control.sock"),
    qmp=Path("/run/g/qmp.sock"),
    agent=Path("/run/g/agent.sock"),
)

FAKE_QEMU = f"""#!{sys.executable}
# Opens the sockets a real QEMU would listen on, writes one console line, then idles.
import re, socket, sys, time
for arg in sys.argv[1:]:
    for path in re.findall(r"(?:path=|unix:)([^,]+),server=on", arg):
        s = socket.socket(socket.AF_UNIX)
        s.bind(path)
        s.listen(1)
    console = re.match(r"file,id=con0,path=(.+)$", arg)
    if console:
        with open(console[1], "w") as f:
            f.write("RECLAIMD-GUEST: init started kernel=fake\\n")
time.sleep(60)
"""


def option(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_default_command_line() -> None:
    spec = QemuGuestSpec(name="vm1", uuid="6f1e7d3c-0000-4000-8000-000000000001")
    argv = qemu_argv(spec, IMAGE, PATHS, accel.TCG)
    assert argv[0] == "qemu-system-x86_64"
    for flag in ("-nodefaults", "-no-reboot"):
        assert flag in argv
    assert option(argv, "-display") == ["none"]
    assert option(argv, "-accel") == ["tcg"] and option(argv, "-cpu") == ["max"]
    assert option(argv, "-name") == ["guest=vm1"]
    assert option(argv, "-uuid") == [spec.uuid]
    assert option(argv, "-m") == ["512M"]
    assert option(argv, "-kernel") == ["/img/vmlinuz"]
    assert option(argv, "-initrd") == ["/img/initrd.gz"]
    assert option(argv, "-append") == ["console=ttyS0 panic=-1"]
    assert option(argv, "-device") == [
        "isa-serial,chardev=con0,index=0",
        "isa-serial,chardev=ctl0,index=1",
        "virtio-balloon-pci,id=balloon0,free-page-reporting=on",
        "virtio-serial-pci,id=serial0",
        "virtserialport,bus=serial0.0,chardev=qga0,name=org.qemu.guest_agent.0",
    ]
    assert option(argv, "-chardev") == [
        "file,id=con0,path=/run/g/console.log",
        "socket,id=ctl0,path=/run/g/control.sock,server=on,wait=off",
        "socket,id=qga0,path=/run/g/agent.sock,server=on,wait=off",
    ]
    assert option(argv, "-qmp") == ["unix:/run/g/qmp.sock,server=on,wait=off"]
    assert "-object" not in argv and "-mon" not in argv


def test_memfd_backend_and_a_balloon_without_id() -> None:
    spec = QemuGuestSpec(
        ram_bytes=1024 << 20, memfd=True, balloon_id=None, free_page_reporting=False
    )
    argv = qemu_argv(spec, IMAGE, PATHS, accel.TCG)
    assert option(argv, "-object") == ["memory-backend-memfd,id=ram0,size=1024M"]
    assert option(argv, "-machine") == ["memory-backend=ram0"]
    assert option(argv, "-m") == ["1024M"]
    assert "virtio-balloon-pci,free-page-reporting=off" in option(argv, "-device")


def test_no_balloon_device() -> None:
    argv = qemu_argv(QemuGuestSpec(balloon=False), IMAGE, PATHS, accel.TCG)
    assert not any("balloon" in d for d in option(argv, "-device"))


def test_qmp_client_connects_to_a_listening_daemon() -> None:
    spec = QemuGuestSpec(qmp="client", qmp_path=Path("/run/reclaimd/listen.sock"))
    paths = GuestPaths(PATHS.console_log, PATHS.qemu_log, PATHS.control, spec.qmp_path, PATHS.agent)
    argv = qemu_argv(spec, IMAGE, paths, accel.TCG)
    assert "socket,id=qmp0,path=/run/reclaimd/listen.sock,reconnect=5" in option(argv, "-chardev")
    assert option(argv, "-mon") == ["chardev=qmp0,mode=control"]
    assert "-qmp" not in argv


def test_no_qmp() -> None:
    paths = GuestPaths(PATHS.console_log, PATHS.qemu_log, PATHS.control, None, PATHS.agent)
    argv = qemu_argv(QemuGuestSpec(qmp="none"), IMAGE, paths, accel.TCG)
    assert "-qmp" not in argv and "-mon" not in argv


def test_commas_in_values_are_escaped() -> None:
    paths = GuestPaths(
        Path("/a,b/c.log"), PATHS.qemu_log, Path("/a,b/ctl"), Path("/a,b/q"), Path("/a,b/qga")
    )
    argv = qemu_argv(QemuGuestSpec(name="x,y"), IMAGE, paths, accel.TCG)
    assert option(argv, "-name") == ["guest=x,,y"]
    assert "file,id=con0,path=/a,,b/c.log" in option(argv, "-chardev")
    assert "socket,id=qga0,path=/a,,b/qga,server=on,wait=off" in option(argv, "-chardev")
    assert option(argv, "-qmp") == ["unix:/a,,b/q,server=on,wait=off"]


def test_kernel_command_line_options_and_extra_args() -> None:
    spec = QemuGuestSpec(
        noballoon=True,
        page_reporting_order=10,
        workload="alloc:200,hold:5,free,sleep:5,repeat",
        kernel_args=("loglevel=4",),
        extra_args=("-smp", "2"),
    )
    assert spec.kernel_cmdline() == (
        "console=ttyS0 panic=-1 reclaimd.noballoon page_reporting.page_reporting_order=10 "
        "reclaimd.workload=alloc:200,hold:5,free,sleep:5,repeat loglevel=4"
    )
    assert qemu_argv(spec, IMAGE, PATHS, accel.TCG)[-2:] == ["-smp", "2"]


def test_no_agent_channel() -> None:
    paths = GuestPaths(PATHS.console_log, PATHS.qemu_log, PATHS.control, PATHS.qmp, None)
    argv = qemu_argv(QemuGuestSpec(agent=False), IMAGE, paths, accel.TCG)
    assert not any("serial0" in d or "qga0" in d for d in option(argv, "-device"))
    assert not any("qga0" in c for c in option(argv, "-chardev"))


def test_agent_options_on_the_kernel_command_line() -> None:
    blocked = QemuGuestSpec(agent_block_rpcs=("guest-file-open", "guest-file-read"))
    assert blocked.kernel_cmdline().endswith(
        " reclaimd.agent_block=guest-file-open,guest-file-read"
    )
    assert QemuGuestSpec(noagent=True).kernel_cmdline().endswith(" reclaimd.noagent")
    assert "agent" not in QemuGuestSpec().kernel_cmdline()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"agent_block_rpcs": ("guest-file-open,guest-exec",)},
        {"agent_block_rpcs": ("",)},
        {"qmp": "client"},
        {"workload": "alloc:1, free"},
        {"workload": ""},
        {"ram_bytes": 32 << 20},
        {"ram_bytes": (512 << 20) + 4096},
    ],
)
def test_bad_specs_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        QemuGuestSpec(**kwargs)  # type: ignore[arg-type]


def test_each_spec_gets_its_own_uuid() -> None:
    assert QemuGuestSpec().uuid != QemuGuestSpec().uuid


def test_accel_defaults_to_tcg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(accel.ACCEL_ENV, raising=False)
    monkeypatch.setattr(accel, "kvm_usable", lambda device=accel.KVM_DEVICE: True)
    chosen = accel.choose_accel()
    assert (chosen.name, chosen.cpu) == ("tcg", "max")


def test_accel_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    usable = False
    monkeypatch.setattr(accel, "kvm_usable", lambda device=accel.KVM_DEVICE: usable)
    monkeypatch.setenv(accel.ACCEL_ENV, "kvm")
    with pytest.raises(GuestLaunchError, match="KVM requested"):
        accel.choose_accel()
    monkeypatch.setenv(accel.ACCEL_ENV, "auto")
    assert accel.choose_accel().name == "tcg"
    usable = True
    assert accel.choose_accel().qemu_args() == ["-accel", "kvm", "-cpu", "host"]
    monkeypatch.setenv(accel.ACCEL_ENV, "hvf")
    with pytest.raises(GuestLaunchError, match="expected tcg, kvm or auto"):
        accel.choose_accel()
    assert accel.choose_accel("tcg").name == "tcg"


def test_kvm_probe_rejects_what_is_not_kvm(tmp_path: Path) -> None:
    assert not accel.kvm_usable(str(tmp_path / "missing"))
    assert not accel.kvm_usable("/dev/null")  # opens, but the ioctl fails


@pytest.fixture
def fake_qemu(tmp_path: Path) -> str:
    path = tmp_path / "fake-qemu"
    path.write_text(FAKE_QEMU)
    path.chmod(0o755)
    return str(path)


def test_lifecycle_with_a_fake_qemu(fake_qemu: str) -> None:
    guest = launch(QemuGuestSpec(name="fake", qemu=fake_qemu), IMAGE)
    with guest:
        run_dir = guest.console_log.parent
        assert guest.control_path.exists() and guest.qmp_path and guest.qmp_path.exists()
        assert guest.agent_path is not None and guest.agent_path.exists()
        assert guest.wait_for_console(r"kernel=(\w+)", timeout=10)[1] == "fake"
        with pytest.raises(GuestTimeoutError, match="init started kernel=fake"):
            guest.wait_for_console("never printed", timeout=0.3)
        assert "accel: TCG" in guest.qemu_log.read_text()
        assert guest.kill() == -signal.SIGKILL
        with pytest.raises(GuestExitedError) as exited:
            guest.wait_for_console("never printed", timeout=10)
        assert exited.value.returncode == -signal.SIGKILL
        # A crash leaves its socket files behind, as a killed QEMU does.
        assert guest.control_path.exists()
    assert not run_dir.exists(), "close() removes the directories launch created"


def test_terminate_asks_first(fake_qemu: str, tmp_path: Path) -> None:
    with launch(QemuGuestSpec(qemu=fake_qemu), IMAGE, tmp_path / "run") as guest:
        assert guest.terminate() == -signal.SIGTERM
    assert (tmp_path / "run" / "console.log").exists(), "a given run_dir is kept"


def test_sockets_move_to_a_short_directory(fake_qemu: str, tmp_path: Path) -> None:
    run_dir = tmp_path / ("d" * 120)
    with launch(QemuGuestSpec(qemu=fake_qemu), IMAGE, run_dir) as guest:
        assert guest.console_log.parent == run_dir
        sockets = guest.control_path.parent
        assert sockets != run_dir and len(str(guest.control_path)) < 108
    assert not sockets.exists() and run_dir.exists()


def test_a_qemu_that_fails_at_start(tmp_path: Path) -> None:
    failing = tmp_path / "bad-qemu"
    failing.write_text("#!/bin/sh\necho 'qemu: -device virtio-balloon-pci: bad' >&2\nexit 1\n")
    failing.chmod(0o755)
    with pytest.raises(GuestLaunchError, match=r"(?s)exited with 1 at start:.*bad"):
        launch(QemuGuestSpec(qemu=str(failing)), IMAGE, tmp_path / "run")


def test_missing_qemu() -> None:
    with pytest.raises(GuestLaunchError, match="not found"):
        launch(QemuGuestSpec(qemu="qemu-system-nonexistent"), IMAGE)


def test_qemu_dies_with_its_parent(fake_qemu: str, tmp_path: Path) -> None:
    # A launcher that exits without cleaning up (a test run killed hard) must not leave QEMU.
    script = tmp_path / "orphan.py"
    script.write_text(
        textwrap.dedent(f"""
            import os
            from pathlib import Path
            from daemon.testguest.build import GuestImage
            from daemon.testguest.launch import QemuGuestSpec, launch
            image = GuestImage(Path("/i"), Path("/i/k"), Path("/i/r"), "p", "v", "r", "k")
            spec = QemuGuestSpec(qemu={fake_qemu!r})
            guest = launch(spec, image, Path({str(tmp_path / "run")!r}))
            print(guest.pid, flush=True)
            os._exit(0)
        """)
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    pid = int(done.stdout)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    pytest.fail("the fake QEMU outlived the process that launched it")
