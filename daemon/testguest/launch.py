"""Boot the test guest under QEMU and hold a handle on it.

``QemuGuestSpec`` says what to boot; ``launch`` starts QEMU and returns a ``RunningGuest``, which
owns the process (and always ends it: ``close()``, or leaving its ``with`` block), the console
log, the control channel and the QMP address. Everything is synchronous; from asyncio code call
the slow parts through ``asyncio.to_thread``.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal
from uuid import uuid4

from daemon.guestspec import GuestSpec, MiB
from daemon.testguest.accel import Accel, choose_accel
from daemon.testguest.agent import PORT_NAME
from daemon.testguest.build import GuestImage
from daemon.testguest.control import ControlChannel
from daemon.testguest.errors import GuestExitedError, GuestLaunchError, GuestTimeoutError

QEMU = "qemu-system-x86_64"
READY = re.compile(r"^RECLAIMD-GUEST: ready control=(\S+)", re.MULTILINE)
# sun_path is 108 bytes; callers' run directories (pytest's tmp_path) are often longer.
_SUN_PATH_MAX = 107
_PR_SET_PDEATHSIG = 1

QmpMode = Literal["server", "client", "none"]


@dataclass(frozen=True, kw_only=True)
class QemuGuestSpec(GuestSpec):
    """The real test guest under QEMU: the guest (``GuestSpec``) and how QEMU runs it.

    ``qmp``: ``server`` makes QEMU listen on ``qmp_path`` (``-qmp unix:...,server=on,wait=off``;
    a path in the guest's socket directory when None), as for reclaimd's ``connect`` mode;
    ``client`` makes QEMU connect to a listening daemon at ``qmp_path`` and keep reconnecting
    (``-chardev socket,...,reconnect=5 -mon ...,mode=control``), as for ``listen`` mode.

    ``balloon``: a virtio-balloon-pci device is present, with id ``balloon_id`` (None: no id, so
    it lives under ``/machine/peripheral-anon``). ``noballoon``: the guest never loads the
    driver. ``memfd``: guest RAM is a ``memory-backend-memfd`` instead of anonymous memory.
    ``workload``: the ``reclaimd.workload=`` steps (README). ``accel``: tcg, kvm or auto
    (None: ``RECLAIMD_GUEST_ACCEL``, default tcg).

    ``agent``: a virtio-serial port named ``org.qemu.guest_agent.0`` whose host end is a Unix
    socket QEMU serves (``RunningGuest.agent_path``), with the real qemu-ga on it in the
    guest. ``noagent``: the port is there but the guest never starts qemu-ga (the socket
    accepts and nothing ever answers). ``agent_block_rpcs``: qemu-ga's ``--block-rpcs``, e.g.
    ``("guest-file-open", "guest-file-read")`` as RHEL-family guests ship it.
    """

    name: str = "testguest"
    ram_bytes: int = 512 * MiB
    uuid: str | None = field(default_factory=lambda: str(uuid4()))
    cpus: int = 1
    balloon: bool = True
    balloon_id: str | None = "balloon0"
    memfd: bool = False
    noballoon: bool = False
    noagent: bool = False  # the port is there, but the guest never starts qemu-ga
    qmp: QmpMode = "server"
    qmp_path: Path | None = None
    kernel_args: tuple[str, ...] = ()
    extra_args: tuple[str, ...] = ()
    accel: str | None = None
    qemu: str = QEMU

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.qmp == "client" and self.qmp_path is None:
            raise ValueError("qmp='client' needs qmp_path: the socket the daemon listens on")
        if self.workload is not None and (
            not self.workload or any(c.isspace() for c in self.workload)
        ):
            raise ValueError(f"workload is one word of comma-separated steps: {self.workload!r}")
        for rpc in self.agent_block_rpcs:
            if not rpc or any(c.isspace() or c == "," for c in rpc):
                raise ValueError(f"agent_block_rpcs holds command names: {rpc!r}")
        if self.ram_bytes < 64 * MiB:
            raise ValueError(f"ram_bytes={self.ram_bytes}: the guest needs at least 64 MiB")

    @property
    def ram_mib(self) -> int:
        return self.ram_bytes // MiB

    def kernel_cmdline(self) -> str:
        # panic=-1 with -no-reboot: a guest that panics makes QEMU exit at once instead of hanging.
        args = ["console=ttyS0", "panic=-1"]
        if self.noballoon:
            args.append("reclaimd.noballoon")
        if self.page_reporting_order is not None:
            args.append(f"page_reporting.page_reporting_order={self.page_reporting_order}")
        if self.workload:
            args.append(f"reclaimd.workload={self.workload}")
        if self.noagent:
            args.append("reclaimd.noagent")
        if self.agent_block_rpcs:
            args.append(f"reclaimd.agent_block={','.join(self.agent_block_rpcs)}")
        return " ".join([*args, *self.kernel_args])


def _opt(value: str | Path) -> str:
    # QEMU option values escape a comma by doubling it.
    return str(value).replace(",", ",,")


@dataclass(frozen=True)
class GuestPaths:
    console_log: Path
    qemu_log: Path
    control: Path
    qmp: Path | None
    agent: Path | None = None


def qemu_argv(spec: QemuGuestSpec, image: GuestImage, paths: GuestPaths, accel: Accel) -> list[str]:
    """The full QEMU command line for ``spec``."""
    argv = [spec.qemu, "-name", f"guest={_opt(spec.name)}"]
    if spec.uuid is not None:
        argv += ["-uuid", spec.uuid]
    argv += ["-nodefaults", "-display", "none", "-no-reboot", *accel.qemu_args()]
    argv += ["-m", f"{spec.ram_mib}M", "-smp", str(spec.cpus)]
    if spec.memfd:
        argv += ["-object", f"memory-backend-memfd,id=ram0,size={spec.ram_mib}M"]
        argv += ["-machine", "memory-backend=ram0"]
    argv += ["-kernel", str(image.kernel), "-initrd", str(image.initrd)]
    argv += ["-append", spec.kernel_cmdline()]
    argv += ["-chardev", f"file,id=con0,path={_opt(paths.console_log)}"]
    argv += ["-device", "isa-serial,chardev=con0,index=0"]
    argv += ["-chardev", f"socket,id=ctl0,path={_opt(paths.control)},server=on,wait=off"]
    argv += ["-device", "isa-serial,chardev=ctl0,index=1"]
    if spec.balloon:
        device = "virtio-balloon-pci"
        if spec.balloon_id is not None:
            device += f",id={_opt(spec.balloon_id)}"
        device += f",free-page-reporting={'on' if spec.free_page_reporting else 'off'}"
        if spec.deflate_on_oom:
            device += ",deflate-on-oom=on"
        argv += ["-device", device]
    if spec.agent:
        assert paths.agent is not None
        argv += ["-chardev", f"socket,id=qga0,path={_opt(paths.agent)},server=on,wait=off"]
        argv += ["-device", "virtio-serial-pci,id=serial0"]
        argv += ["-device", f"virtserialport,bus=serial0.0,chardev=qga0,name={PORT_NAME}"]
    if spec.qmp == "server":
        assert paths.qmp is not None
        argv += ["-qmp", f"unix:{_opt(paths.qmp)},server=on,wait=off"]
    elif spec.qmp == "client":
        assert paths.qmp is not None
        argv += ["-chardev", f"socket,id=qmp0,path={_opt(paths.qmp)},reconnect=5"]
        argv += ["-mon", "chardev=qmp0,mode=control"]
    return [*argv, *spec.extra_args]


def _die_with_parent() -> None:
    # Runs in the child before exec: if the test process dies hard, QEMU is killed with it
    # instead of spinning on a CPU forever. (Linux sends it when the forking *thread* exits.)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(none)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


class RunningGuest:
    """A booted (or booting) test guest. Use as a context manager, or call ``close()``."""

    def __init__(
        self,
        spec: QemuGuestSpec,
        image: GuestImage,
        accel: Accel,
        process: subprocess.Popen[bytes],
        paths: GuestPaths,
        owned_dirs: list[Path],
    ) -> None:
        self.spec = spec
        self.image = image
        self.accel = accel
        self.process = process
        self.console_log = paths.console_log
        self.qemu_log = paths.qemu_log
        self.qmp_path = paths.qmp
        self.agent_path = paths.agent
        self.control_path = paths.control
        self.control = ControlChannel(paths.control)
        self._owned_dirs = owned_dirs

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def console(self) -> str:
        """The console output so far."""
        try:
            return self.console_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def diagnostics(self) -> str:
        return (
            f"QEMU pid {self.pid}, exit code {self.returncode}, accel {self.accel.name}\n"
            f"--- console ({self.console_log}) ---\n{_tail(self.console_log)}\n"
            f"--- qemu ({self.qemu_log}) ---\n{_tail(self.qemu_log)}"
        )

    def wait_for_console(
        self, pattern: str | re.Pattern[str], timeout: float = 60.0, start: int = 0
    ) -> re.Match[str]:
        """Wait until the console, from character ``start`` on, matches ``pattern`` (a string
        is compiled with ``re.MULTILINE``). Raises ``GuestExitedError`` when QEMU exits first,
        ``GuestTimeoutError`` after ``timeout`` seconds; both carry the log tails."""
        regex = re.compile(pattern, re.MULTILINE) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            found = regex.search(self.console(), start)
            if found:
                return found
            if self.returncode is not None:
                raise GuestExitedError(
                    f"QEMU exited before the console showed {regex.pattern!r}\n"
                    + self.diagnostics(),
                    self.returncode,
                )
            if time.monotonic() >= deadline:
                raise GuestTimeoutError(
                    f"console did not show {regex.pattern!r} within {timeout:g} s\n"
                    + self.diagnostics()
                )
            time.sleep(0.1)

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Wait until the guest's init is ready, and the control channel answers."""
        self.wait_for_console(READY, timeout)
        self.control.connect()
        self.control.send("ping", timeout=10.0)

    def send(self, command: str, timeout: float = 30.0) -> str:
        """One control command; see ``ControlChannel.send``."""
        return self.control.send(command, timeout)

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM (QEMU shuts down cleanly), then SIGKILL after ``timeout`` seconds."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        return self.kill()

    def kill(self) -> int:
        """SIGKILL, as a crash would; leaves the socket files behind as a crash does."""
        if self.process.poll() is None:
            self.process.kill()
        return self.process.wait()

    def close(self) -> None:
        """End QEMU if still running and remove the directories ``launch`` created."""
        self.control.close()
        try:
            self.terminate()
        finally:
            for directory in self._owned_dirs:
                shutil.rmtree(directory, ignore_errors=True)

    def __enter__(self) -> RunningGuest:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _socket_dir(run_dir: Path, owned: list[Path]) -> Path:
    if len(str(run_dir / "qmp.sock")) <= _SUN_PATH_MAX:
        return run_dir
    short = Path(tempfile.mkdtemp(prefix="reclaimd-guest-"))
    owned.append(short)
    return short


def _wait_for_sockets(process: subprocess.Popen[bytes], paths: list[Path], qemu_log: Path) -> None:
    # QEMU creates its listening sockets before it starts the guest; wait so callers can connect.
    deadline = time.monotonic() + 15.0
    while not all(p.exists() for p in paths):
        if process.poll() is not None:
            raise GuestLaunchError(
                f"QEMU exited with {process.returncode} at start:\n{_tail(qemu_log)}"
            )
        if time.monotonic() >= deadline:
            process.kill()
            process.wait()
            raise GuestLaunchError(f"QEMU did not create {paths} within 15 s:\n{_tail(qemu_log)}")
        time.sleep(0.02)


def launch(
    spec: QemuGuestSpec,
    image: GuestImage,
    run_dir: Path | None = None,
    *,
    die_with_parent: bool = True,
) -> RunningGuest:
    """Start QEMU for ``spec`` and return at once (the guest reaches its init about 5-15 s later
    under TCG: see ``RunningGuest.wait_ready``).

    Logs go to ``run_dir`` (kept), or to a temporary directory removed on ``close()``.
    ``die_with_parent`` kills QEMU when the calling thread exits: launch from a thread that
    outlives the guest (not a short-lived worker), or pass False.
    """
    qemu = shutil.which(spec.qemu)
    if qemu is None:
        raise GuestLaunchError(f"{spec.qemu} not found; install qemu-system-x86")
    accel = choose_accel(spec.accel)
    owned: list[Path] = []
    if run_dir is None:
        run_dir = Path(tempfile.mkdtemp(prefix=f"reclaimd-guest-{spec.name}-"))
        owned.append(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    sockets = _socket_dir(run_dir, owned)
    qmp_path = spec.qmp_path
    if spec.qmp == "server" and qmp_path is None:
        qmp_path = sockets / "qmp.sock"
    paths = GuestPaths(
        console_log=run_dir / "console.log",
        qemu_log=run_dir / "qemu.log",
        control=sockets / "control.sock",
        qmp=qmp_path if spec.qmp != "none" else None,
        agent=sockets / "agent.sock" if spec.agent else None,
    )
    for stale in (paths.control, paths.qmp if spec.qmp == "server" else None, paths.agent):
        if stale is not None:
            stale.unlink(missing_ok=True)
    argv = qemu_argv(spec, image, paths, accel)
    argv[0] = qemu
    with paths.qemu_log.open("wb") as log:
        log.write(f"accel: {accel.reason}\n{' '.join(argv)}\n".encode())
        log.flush()
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent if die_with_parent else None,
        )
    guest = RunningGuest(spec, image, accel, process, paths, owned)
    try:
        listening = [paths.control] + ([paths.qmp] if spec.qmp == "server" and paths.qmp else [])
        listening += [paths.agent] if paths.agent else []
        _wait_for_sockets(process, listening, paths.qemu_log)
    except BaseException:
        guest.close()
        raise
    return guest
