"""The guest kernel: find the Debian kernel package, download it, take out vmlinuz and the modules.

Only the one ``linux-image-<abi>-amd64`` package is downloaded (``apt-get download`` needs no
root); root is needed only when the package lists are empty and ``apt-get update`` must run first.
"""

from __future__ import annotations

import lzma
import os
import re
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from daemon.testguest.errors import GuestBuildError

METAPACKAGE = "linux-image-amd64"

# Load order: each module after the ones it needs (checked against the modules' own "depends="
# at build time). virtio_balloon brings free page reporting; virtio_mem only needs virtio;
# virtio_console (drivers/char/) drives the virtio-serial port the guest agent talks on.
MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_balloon",
    "virtio_mem",
    "virtio_console",
)

_IMAGE_DEPENDS = re.compile(
    r"\b(?P<name>linux-image-\d[\w.+-]*-amd64)\b(?:\s*\(=\s*(?P<version>[^)\s]+)\))?"
)
_MODULE_MEMBER = re.compile(
    r"^\./(?:usr/)?lib/modules/(?P<release>[^/]+)/kernel/drivers/(?:virtio|char)/"
    r"(?P<name>\w+)\.ko(?P<xz>\.xz)?$"
)
_VMLINUZ_MEMBER = re.compile(r"^\./boot/vmlinuz-(?P<release>.+)$")
# .modinfo holds NUL-separated "key=value" strings; "depends=" names the modules this one needs.
_DEPENDS = re.compile(rb"(?:^|\0)depends=([^\0]*)\0")


@dataclass(frozen=True)
class KernelPackage:
    """A kernel package as apt knows it."""

    name: str
    version: str


@dataclass(frozen=True)
class KernelFiles:
    """What the guest needs from a kernel package."""

    release: str
    vmlinuz: bytes
    modules: dict[str, bytes]


def _require_tools(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise GuestBuildError(
            f"apt is unavailable ({', '.join(missing)} not found): the test guest is built from "
            "the Debian kernel package; build it on a Debian 12 host with its package registry"
        )


def _run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, LC_ALL="C")
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, check=False)


def _sandbox_options() -> list[str]:
    # As root apt drops to the "_apt" user to download, which cannot write into a private temp
    # dir; it then warns and downloads as root anyway. Say so up front to keep the log quiet.
    return ["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else []


def _apt_update() -> None:
    if os.geteuid() != 0:
        raise GuestBuildError(
            f"apt does not know {METAPACKAGE}: the package lists are empty or stale; "
            "run `apt-get update` as root (building the guest itself needs no root)"
        )
    done = _run(["apt-get", "update", "-q"])
    if done.returncode != 0:
        raise GuestBuildError(f"apt-get update failed:\n{done.stderr.strip()}")


def _show(package: str) -> dict[str, str] | None:
    """The fields of the version apt would install, or None when apt does not know it."""
    done = _run(["apt-cache", "show", "--no-all-versions", package])
    if done.returncode != 0 or not done.stdout.strip():
        return None
    fields: dict[str, str] = {}
    for line in done.stdout.splitlines():
        key, sep, value = line.partition(":")
        if sep and not key.startswith(" "):
            fields[key] = value.strip()
    return fields


def _resolve(name: str | None) -> KernelPackage | None:
    if name:
        fields = _show(name)
        return KernelPackage(name, fields["Version"]) if fields and "Version" in fields else None
    meta = _show(METAPACKAGE)
    if meta is None:
        return None
    # e.g. "Depends: linux-image-6.1.0-56-amd64 (= 6.1.192-2)": one apt-cache call (apt
    # rebuilds its cache for each call on hosts that disable pkgcache, about 0.7 s).
    depends = _IMAGE_DEPENDS.search(meta.get("Depends", ""))
    if depends is None:
        return None
    if depends["version"]:
        return KernelPackage(depends["name"], depends["version"])
    return _resolve(depends["name"])


def resolve_kernel_package(name: str | None = None) -> KernelPackage:
    """The kernel package to use: ``name`` if given, else the one ``linux-image-amd64`` depends
    on (``linux-image-6.1.0-NN-amd64`` on Debian 12), with the version apt would install.

    Runs ``apt-get update`` once (as root) when apt does not know the package yet.
    """
    _require_tools("apt-cache", "apt-get", "dpkg-deb")
    package = _resolve(name)
    if package is None:
        _apt_update()
        package = _resolve(name)
    if package is None:
        raise GuestBuildError(
            f"apt knows no installable {name or METAPACKAGE} even after apt-get update; "
            "is this a Debian amd64 host with its main archive in sources.list?"
        )
    return package


def download(package: KernelPackage, into: Path) -> Path:
    """``apt-get download`` the package into ``into``; returns the ``.deb``."""
    argv = ["apt-get", *_sandbox_options(), "download", "-q", f"{package.name}={package.version}"]
    done = _run(argv, cwd=into)
    debs = sorted(into.glob(f"{package.name}_*.deb"))
    if done.returncode != 0 or len(debs) != 1:
        raise GuestBuildError(f"apt-get download {package.name} failed:\n{done.stderr.strip()}")
    return debs[0]


def _module_bytes(raw: bytes, xz: bool) -> bytes:
    # busybox insmod takes plain ELF; newer Debian kernels ship modules xz-compressed.
    return lzma.decompress(raw) if xz else raw


def extract(deb: Path, modules: tuple[str, ...] = MODULES) -> KernelFiles:
    """Stream the package's data archive and keep vmlinuz and the wanted modules only
    (a full ``dpkg -x`` would unpack hundreds of MiB of modules nobody uses)."""
    proc = subprocess.Popen(
        ["dpkg-deb", "--fsys-tarfile", str(deb)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    vmlinuz: dict[str, bytes] = {}
    found: dict[str, bytes] = {}
    releases: set[str] = set()
    tar_error: tarfile.TarError | None = None
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                kernel = _VMLINUZ_MEMBER.match(member.name)
                module = _MODULE_MEMBER.match(member.name)
                if kernel is None and (module is None or module["name"] not in modules):
                    continue
                reader = tar.extractfile(member)
                assert reader is not None
                data = reader.read()
                if kernel is not None:
                    vmlinuz[kernel["release"]] = data
                elif module is not None:
                    found[module["name"]] = _module_bytes(data, module["xz"] is not None)
                    releases.add(module["release"])
    except tarfile.TarError as exc:
        tar_error = exc
    finally:
        proc.stdout.close()
        stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        if proc.stderr:
            proc.stderr.close()
        returncode = proc.wait()
    if returncode != 0 or tar_error is not None:
        raise GuestBuildError(
            f"dpkg-deb --fsys-tarfile {deb.name} failed ({tar_error or returncode}):\n"
            + stderr.strip()
        )
    if len(vmlinuz) != 1:
        raise GuestBuildError(f"{deb.name}: expected one boot/vmlinuz-*, found {sorted(vmlinuz)}")
    ((release, image),) = vmlinuz.items()
    missing = [m for m in modules if m not in found]
    if missing or releases != {release}:
        raise GuestBuildError(
            f"{deb.name}: modules {missing} missing, or built for {sorted(releases)} "
            f"not {release}; this kernel must have CONFIG_VIRTIO_BALLOON=m and friends"
        )
    return KernelFiles(release, image, {m: found[m] for m in modules})


def module_depends(module: bytes) -> list[str]:
    """The module names in a module's ``.modinfo`` ``depends=`` entry."""
    found = _DEPENDS.search(module)
    if found is None:
        return []
    return [d for d in found.group(1).decode().split(",") if d]


def check_load_order(files: KernelFiles, order: tuple[str, ...] = MODULES) -> None:
    """Refuse an order in which a module comes before one it depends on: insmod would fail in
    the guest with "Unknown symbol", far from the cause."""
    loaded: set[str] = set()
    for name in order:
        needs = [d for d in module_depends(files.modules[name]) if d not in loaded]
        if needs:
            raise GuestBuildError(
                f"kernel {files.release}: {name} needs {needs} loaded before it; "
                f"the load order {list(order)} no longer fits this kernel"
            )
        loaded.add(name)
