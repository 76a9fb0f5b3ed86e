"""The real test guest: a Debian kernel and a busybox initramfs booted by QEMU with
``virtio-balloon-pci,free-page-reporting=on``, driven from the kernel command line and a serial
control channel. ``build_image`` makes (or finds in the cache) the image; ``launch`` boots it.
The guest side and the protocols are described in deploy/guest/README.md."""

from daemon.testguest.accel import Accel, choose_accel, kvm_usable
from daemon.testguest.build import GuestImage, build_image, default_cache_dir
from daemon.testguest.control import ControlChannel, fields
from daemon.testguest.errors import (
    ControlError,
    GuestBuildError,
    GuestError,
    GuestExitedError,
    GuestLaunchError,
    GuestTimeoutError,
)
from daemon.testguest.launch import QemuGuestSpec, RunningGuest, launch

__all__ = [
    "Accel",
    "ControlChannel",
    "ControlError",
    "GuestBuildError",
    "GuestError",
    "GuestExitedError",
    "GuestImage",
    "GuestLaunchError",
    "GuestTimeoutError",
    "QemuGuestSpec",
    "RunningGuest",
    "build_image",
    "choose_accel",
    "default_cache_dir",
    "fields",
    "kvm_usable",
    "launch",
]
