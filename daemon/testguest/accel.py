"""Which QEMU accelerator boots the test guest.

TCG is the default even where ``/dev/kvm`` opens: in nested or restricted environments a KVM guest
can hang after the firmware with no error, and a test that hangs says less than one that is slow.
``RECLAIMD_GUEST_ACCEL`` picks ``tcg`` (default), ``kvm`` (fail if unusable) or ``auto`` (KVM when
the probe passes, else TCG).
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass

from daemon.testguest.errors import GuestLaunchError

ACCEL_ENV = "RECLAIMD_GUEST_ACCEL"
KVM_DEVICE = "/dev/kvm"
# From linux/kvm.h: _IO(KVMIO, 0x00) with KVMIO 0xAE; the API version has been 12 since 2.6.22.
KVM_GET_API_VERSION = 0xAE00
KVM_API_VERSION = 12


@dataclass(frozen=True)
class Accel:
    """The accelerator QEMU is given, the CPU model that goes with it, and why it was chosen."""

    name: str
    cpu: str
    reason: str

    def qemu_args(self) -> list[str]:
        return ["-accel", self.name, "-cpu", self.cpu]


def kvm_usable(device: str = KVM_DEVICE) -> bool:
    """True when ``device`` opens read-write and answers ``KVM_GET_API_VERSION`` with 12."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fcntl.ioctl(fd, KVM_GET_API_VERSION) == KVM_API_VERSION
    except OSError:
        return False
    finally:
        os.close(fd)


TCG = Accel("tcg", "max", "TCG (default; set RECLAIMD_GUEST_ACCEL=kvm or auto for KVM)")


def choose_accel(requested: str | None = None) -> Accel:
    """The accelerator for ``requested`` (``tcg``, ``kvm`` or ``auto``; None reads
    ``RECLAIMD_GUEST_ACCEL``)."""
    choice = (requested or os.environ.get(ACCEL_ENV) or "tcg").strip().lower()
    if choice == "tcg":
        return TCG
    if choice not in ("kvm", "auto"):
        raise GuestLaunchError(f"{ACCEL_ENV}={choice!r}: expected tcg, kvm or auto")
    if kvm_usable():
        return Accel("kvm", "host", f"KVM ({choice}: {KVM_DEVICE} answers API version 12)")
    if choice == "kvm":
        raise GuestLaunchError(f"KVM requested but {KVM_DEVICE} is missing or unusable")
    return Accel("tcg", "max", f"TCG (auto: {KVM_DEVICE} is missing or unusable)")
