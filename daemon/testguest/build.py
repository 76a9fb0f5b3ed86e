"""Build the test guest image (kernel + initramfs) once and keep it in a cache.

The cache entry's name is a hash of every input (kernel package and version, the init script,
busybox, the guest agent and its libraries, the module list), so a changed input builds a new
entry and an unchanged one is found without touching the network. An entry is built in a
temporary directory and renamed into place, under a lock, so concurrent or aborted builds never
leave a half-built entry behind.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from daemon.testguest import kernel
from daemon.testguest.agent import GUEST_PATH, AgentFiles, agent_files
from daemon.testguest.errors import GuestBuildError
from daemon.testguest.initramfs import Entry, gzip_initramfs

# Bump when the image layout changes in a way the other inputs do not show.
FORMAT = 2
KERNEL_FILE = "vmlinuz"
INITRD_FILE = "initrd.gz"
META_FILE = "image.json"
_BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
_PT_INTERP = 3


@dataclass(frozen=True)
class GuestImage:
    """A built guest: boot it with ``-kernel kernel -initrd initrd``."""

    directory: Path
    kernel: Path
    initrd: Path
    kernel_package: str
    kernel_version: str
    kernel_release: str
    key: str

    @classmethod
    def load(cls, directory: Path) -> GuestImage:
        meta = json.loads((directory / META_FILE).read_text())
        return cls(
            directory=directory,
            kernel=directory / KERNEL_FILE,
            initrd=directory / INITRD_FILE,
            kernel_package=meta["kernel_package"],
            kernel_version=meta["kernel_version"],
            kernel_release=meta["kernel_release"],
            key=meta["key"],
        )


def default_cache_dir() -> Path:
    """``$RECLAIMD_CACHE/guest``, else ``$XDG_CACHE_HOME/reclaimd/guest``, else
    ``~/.cache/reclaimd/guest``."""
    if root := os.environ.get("RECLAIMD_CACHE"):
        return Path(root) / "guest"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "reclaimd" / "guest"


def init_script() -> bytes:
    """The guest's ``/init``, shipped as package data."""
    return (resources.files("daemon.testguest") / "init.sh").read_bytes()


def is_static_elf(path: Path) -> bool:
    """True for an ELF64 executable without a program interpreter (statically linked)."""
    with path.open("rb") as f:
        header = f.read(64)
        if len(header) < 64 or header[:4] != b"\x7fELF" or header[4] != 2:
            return False
        (phoff,) = struct.unpack_from("<Q", header, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", header, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    types = (struct.unpack_from("<I", table, i * phentsize)[0] for i in range(phnum))
    return _PT_INTERP not in types


def find_busybox(path: Path | None = None) -> Path:
    """A statically linked busybox (the guest has no libc): ``path`` or the one busybox-static
    installs."""
    candidates = [path] if path else []
    if not candidates:
        found = shutil.which("busybox")
        candidates = [Path(p) for p in (found, *_BUSYBOX_CANDIDATES) if p]
    for candidate in candidates:
        if candidate.is_file() and is_static_elf(candidate):
            return candidate
    raise GuestBuildError(
        f"no statically linked busybox found (tried {[str(c) for c in candidates]}); "
        "install busybox-static"
    )


def cache_key(package: kernel.KernelPackage, busybox: bytes, init: bytes, agent: AgentFiles) -> str:
    inputs = {
        "format": FORMAT,
        "kernel_package": package.name,
        "kernel_version": package.version,
        "modules": list(kernel.MODULES),
        "busybox_sha256": hashlib.sha256(busybox).hexdigest(),
        "init_sha256": hashlib.sha256(init).hexdigest(),
        # The host's qemu-ga and every library it loads: a library update builds a new entry.
        "agent_sha256": agent.digest(),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def _directories(paths: list[str]) -> list[Entry]:
    """Directory entries for every parent of ``paths``, parents first."""
    parents: set[str] = set()
    for path in paths:
        parts = path.split("/")[:-1]
        parents.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    return [Entry.directory(d) for d in sorted(parents, key=lambda d: (d.count("/"), d))]


def initramfs_entries(
    files: kernel.KernelFiles, busybox: bytes, init: bytes, agent: AgentFiles
) -> list[Entry]:
    modules = [(f"lib/modules/{m}.ko", files.modules[m]) for m in kernel.MODULES]
    load_order = "".join(f"{m}\n" for m in kernel.MODULES).encode()
    plain = [("bin/busybox", busybox, 0o755), ("init", init, 0o755)]
    plain += [("lib/modules/load-order", load_order, 0o644)]
    plain += [(path, data, 0o644) for path, data in modules]
    plain += [(GUEST_PATH, agent.binary, 0o755)]
    plain += [(path, data, 0o755) for path, data in agent.libraries]
    entries = _directories([p for p, _, _ in plain] + ["dev/console"])
    entries.append(Entry.char_device("dev/console", 5, 1))
    entries += [Entry.file(path, data, mode) for path, data, mode in plain]
    return entries


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _entry_name(package: kernel.KernelPackage, key: str) -> str:
    return f"{package.name.removeprefix('linux-image-')}-{key[:12]}"


def build_image(
    cache_dir: Path | None = None,
    *,
    kernel_package: str | None = None,
    busybox: Path | None = None,
    qemu_ga: Path | None = None,
    rebuild: bool = False,
) -> GuestImage:
    """The guest image for the current inputs: from the cache when built before, else built now
    (one kernel package download, a few seconds).

    ``kernel_package`` pins a ``linux-image-*`` package instead of the one ``linux-image-amd64``
    names. ``qemu_ga`` takes another guest agent binary than the host's (its libraries come
    from ``ldd``). Raises ``GuestBuildError`` with what to install when apt, busybox-static or
    qemu-guest-agent is missing.
    """
    cache_dir = cache_dir or default_cache_dir()
    package = kernel.resolve_kernel_package(kernel_package)
    busybox_bytes = find_busybox(busybox).read_bytes()
    init = init_script()
    agent = agent_files(qemu_ga)
    key = cache_key(package, busybox_bytes, init, agent)
    name = _entry_name(package, key)
    final = cache_dir / name
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _locked(cache_dir / f"{name}.lock"):
        if final.is_dir() and not rebuild:
            return GuestImage.load(final)
        # Holding the lock, leftovers of this entry are from aborted builds.
        for stale in cache_dir.glob(f"{name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f"{name}.tmp-", dir=cache_dir))
        try:
            files = _fetch_kernel(package, work)
            (work / KERNEL_FILE).write_bytes(files.vmlinuz)
            initrd = gzip_initramfs(initramfs_entries(files, busybox_bytes, init, agent))
            (work / INITRD_FILE).write_bytes(initrd)
            meta = {
                "key": key,
                "kernel_package": package.name,
                "kernel_version": package.version,
                "kernel_release": files.release,
                "modules": list(kernel.MODULES),
                "agent": ["/" + GUEST_PATH, *("/" + path for path, _ in agent.libraries)],
            }
            (work / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            os.chmod(work, 0o755)
            old = work.with_name(f"{work.name}-old")
            if final.exists():
                # Readers take no lock: move the old entry aside rather than delete it in place.
                final.rename(old)
            os.rename(work, final)
            shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    return GuestImage.load(final)


def _fetch_kernel(package: kernel.KernelPackage, work: Path) -> kernel.KernelFiles:
    download_dir = work / "download"
    download_dir.mkdir()
    deb = kernel.download(package, download_dir)
    files = kernel.extract(deb)
    kernel.check_load_order(files)
    shutil.rmtree(download_dir)
    return files
