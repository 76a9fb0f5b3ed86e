"""A private libvirtd for tests and benchmarks: root, no systemd, and invisible to the host's own.

A root libvirtd keeps its state in fixed places (``/etc/libvirt``, ``/run/libvirt``,
``/var/lib/libvirt``, ``/var/cache/libvirt``, ``/var/log/libvirt``): ``--config`` and ``-p``
move only its own config file and pid file, and a second root libvirtd would share the QEMU
driver's state, pid files and lock with the host's. ``qemu:///embed?root=`` relocates
everything but runs the driver inside the client process, with no daemon to restart or to
point ``virsh`` at. So this runs the real daemons in a private mount namespace
(``unshare -m``) in which those five directories are bind mounts of directories under
``root``: the daemons are the packaged ones, unmodified and as root, the QEMU domains run as
libvirt-qemu as on any host, and the host's directories (and any libvirtd using them) are
never touched. From outside the namespace the same files are under ``root``:

- the socket: ``root/run/libvirt-sock``, URI ``qemu+unix:///system?socket=...`` (:attr:`uri`);
- QEMU's pid files: ``root/run/qemu/NAME.pid`` (:attr:`qemu_state_dir`);
- domain logs: ``root/log/qemu/NAME.log``; the daemons' output: ``root/libvirtd.log``...

virtlogd holds the namespace; libvirtd enters it with ``nsenter``, so libvirtd can be killed
and started again (a restart test) while virtlogd and the domains keep running.
``root`` must be traversable by libvirt-qemu (mode 0755 up to it: not under /root or pytest's
0700 tmp_path) because QEMU opens the kernel and initrd from ``root/images`` as that user.

Start and restart from a thread that outlives the daemons (the daemons get SIGTERM when the
thread that started them exits, so a crashed test run leaves nothing behind).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

# What the mount namespace replaces, and the directory under root that replaces it.
PRIVATE_DIRS = {
    "/etc/libvirt": "etc",
    "/run/libvirt": "run",
    "/var/lib/libvirt": "lib",
    "/var/cache/libvirt": "cache",
    "/var/log/libvirt": "log",
}
PACKAGES = "libvirt-daemon-system libvirt-clients (apt)"
LIBVIRTD_CONF = """\
# Private test instance: only root in this mount namespace can reach the socket.
unix_sock_rw_perms = "0700"
unix_sock_ro_perms = "0700"
unix_sock_admin_perms = "0700"
auth_unix_rw = "none"
auth_unix_ro = "none"
"""
QEMU_CONF = """\
# No AppArmor/SELinux confinement (host-specific); the DAC driver still runs QEMU as
# libvirt-qemu, as packaged.
security_driver = "none"
"""
_PR_SET_PDEATHSIG = 1


class LibvirtdUnavailable(RuntimeError):
    """libvirt is not installed, or the daemons did not come up."""


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(none)"


class PrivateLibvirtd:
    """virtlogd + libvirtd in a private mount namespace; see the module docstring."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.socket = root / "run" / "libvirt-sock"
        self.uri = f"qemu+unix:///system?socket={self.socket}"
        self.qemu_state_dir = root / "run" / "qemu"
        self.images = root / "images"
        self.console = root / "console"
        self.libvirtd_log = root / "libvirtd.log"
        self.virtlogd_log = root / "virtlogd.log"
        self._virtlogd: subprocess.Popen[bytes] | None = None
        self._libvirtd: subprocess.Popen[bytes] | None = None

    # -- setup -----------------------------------------------------------------------------------

    @staticmethod
    def check_installed() -> None:
        missing = [t for t in ("libvirtd", "virtlogd", "virsh") if shutil.which(t) is None]
        missing += [t for t in ("unshare", "nsenter") if shutil.which(t) is None]
        if missing:
            raise LibvirtdUnavailable(f"{', '.join(missing)} not found: install {PACKAGES}")
        if os.geteuid() != 0:
            raise LibvirtdUnavailable("the private libvirtd runs as root (a system instance)")

    def _prepare(self) -> None:
        os.chmod(self.root, 0o755)
        for sub in (*PRIVATE_DIRS.values(), "images", "console"):
            (self.root / sub).mkdir(mode=0o755, exist_ok=True)
        (self.root / "etc" / "libvirtd.conf").write_text(LIBVIRTD_CONF)
        (self.root / "etc" / "qemu.conf").write_text(QEMU_CONF)
        (self.root / "etc" / "virtlogd.conf").write_text("")
        for target in PRIVATE_DIRS:
            # Bind mounts need the mount point; on a host without a libvirtd running
            # /run/libvirt may not exist yet. An empty directory is all this leaves.
            Path(target).mkdir(parents=True, exist_ok=True)

    def _private_kvm_node(self) -> str:
        """Shell commands giving the namespace a /dev/kvm that libvirt-qemu may open.

        libvirt treats its cached QEMU capabilities as outdated whenever the probe found KVM
        but the QEMU user cannot open /dev/kvm (root-only on hosts without udev's kvm rule):
        it then probes QEMU again for every domain lookup, about 40 s per ``virsh define``
        here. A node with udev's usual rights (root:kvm 0660), on a tmpfs private to the
        namespace, makes the two agree; the host's /dev/kvm is left as it is. The domains
        are TCG (type 'qemu') either way.
        """
        try:
            rdev = os.stat("/dev/kvm").st_rdev
        except OSError:
            return ""
        devdir = shlex.quote(str(self.root / "dev"))
        node = shlex.quote(str(self.root / "dev" / "kvm"))
        return (
            f" && mkdir -p {devdir} && mount -t tmpfs -o mode=0755 reclaimd-dev {devdir}"
            f" && mknod -m 0660 {node} c {os.major(rdev)} {os.minor(rdev)}"
            f" && chgrp kvm {node} && mount --bind {node} /dev/kvm"
        )

    def start(self, timeout: float = 90.0) -> None:
        """Start virtlogd (holding the namespace) and libvirtd; wait until libvirtd answers."""
        self.check_installed()
        self._prepare()
        mounts = " && ".join(
            f"mount --bind {shlex.quote(str(self.root / sub))} {shlex.quote(target)}"
            for target, sub in PRIVATE_DIRS.items()
        )
        mounts += self._private_kvm_node()
        pidfile = shlex.quote(str(self.root / "virtlogd.pid"))
        with self.virtlogd_log.open("ab") as log:
            self._virtlogd = subprocess.Popen(
                ["unshare", "-m", "--propagation", "private", "--", "sh", "-c",
                 f"{mounts} && exec virtlogd -p {pidfile}"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )  # fmt: skip
        self._wait_for(lambda: (self.root / "run" / "virtlogd-sock").exists(), "virtlogd", 30.0)
        self.start_libvirtd(timeout)

    def start_libvirtd(self, timeout: float = 90.0) -> None:
        """(Re)start libvirtd in the namespace and wait until it answers."""
        self.spawn_libvirtd()
        self.wait_answering(timeout)

    def spawn_libvirtd(self) -> None:
        """(Re)start libvirtd in the namespace; returns at once (see :meth:`wait_answering`)."""
        if self._virtlogd is None or self._virtlogd.poll() is not None:
            raise LibvirtdUnavailable(f"virtlogd is not running:\n{_tail(self.virtlogd_log)}")
        pidfile = self.root / "libvirtd.pid"
        pidfile.unlink(missing_ok=True)
        with self.libvirtd_log.open("ab") as log:
            self._libvirtd = subprocess.Popen(
                ["nsenter", "-t", str(self._virtlogd.pid), "-m", "--",
                 "libvirtd", "-p", str(pidfile)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )  # fmt: skip

    def wait_answering(self, timeout: float = 90.0) -> None:
        """Wait until ``virsh version`` gets an answer from libvirtd."""

        def answers() -> bool:
            if self._libvirtd is None or self._libvirtd.poll() is not None:
                raise LibvirtdUnavailable(f"libvirtd exited:\n{_tail(self.libvirtd_log)}")
            return self.socket.exists() and self._virsh_ok("version")

        self._wait_for(answers, "libvirtd", timeout)

    def _wait_for(self, ready: object, what: str, timeout: float) -> None:
        assert callable(ready)
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                log = self.libvirtd_log if what == "libvirtd" else self.virtlogd_log
                raise LibvirtdUnavailable(f"{what} not ready in {timeout:g} s:\n{_tail(log)}")
            time.sleep(0.05)

    # -- using it --------------------------------------------------------------------------------

    def virsh(self, *args: str, check: bool = True, timeout: float = 60.0) -> str:
        """Run ``virsh -c URI ARGS``; its stdout. Raises CalledProcessError (with stderr)."""
        done = subprocess.run(
            ["virsh", "-c", self.uri, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise subprocess.CalledProcessError(
                done.returncode, done.args, done.stdout, done.stderr
            )
        return done.stdout

    def _virsh_ok(self, *args: str) -> bool:
        try:
            return (
                subprocess.run(
                    ["virsh", "-c", self.uri, *args],
                    capture_output=True,
                    timeout=10,
                    check=False,
                ).returncode
                == 0
            )
        except subprocess.TimeoutExpired:
            return False

    @property
    def libvirtd_pid(self) -> int | None:
        return self._libvirtd.pid if self._libvirtd and self._libvirtd.poll() is None else None

    def kill_libvirtd(self) -> None:
        """SIGKILL libvirtd, as a crash would. The domains keep running."""
        if self._libvirtd is not None and self._libvirtd.poll() is None:
            self._libvirtd.kill()
            self._libvirtd.wait(30)

    # -- teardown --------------------------------------------------------------------------------

    def destroy_all_domains(self) -> None:
        if self.libvirtd_pid is None:
            return
        for name in self.virsh("list", "--all", "--name", check=False).split():
            self.virsh("destroy", name, check=False)
            self.virsh("undefine", name, check=False)

    def stop(self) -> None:
        """End every domain, then libvirtd and virtlogd; kill any QEMU still using root."""
        try:
            self.destroy_all_domains()
        finally:
            for proc in (self._libvirtd, self._virtlogd):
                if proc is not None and proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait(30)
            self._kill_leftover_qemu()

    def _kill_leftover_qemu(self) -> None:
        # QEMU outlives libvirtd by design; one that started from our images is ours.
        marker = str(self.images).encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"qemu-system" in cmdline and marker in cmdline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(entry.name), signal.SIGKILL)
