"""Fixtures for the libvirt source's tests against a real, private libvirtd.

``libvirtd`` starts virtlogd and libvirtd once per session in a private mount namespace (see
``tests/libvirt/libvirtd.py``) and stops them, with every domain, at the end; it fails, never
skips, when libvirt is not installed. ``booted`` boots one real test guest per module as a
libvirt domain. ``source`` is a connected ``LibvirtSource`` for one test.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import libvirt
import pytest

from daemon.libvirt import LibvirtSource
from daemon.testguest import ControlChannel, GuestBuildError, GuestImage, build_image
from tests.libvirt import domains
from tests.libvirt.domains import DomainSpec
from tests.libvirt.libvirtd import LibvirtdUnavailable, PrivateLibvirtd


@pytest.fixture(scope="session")
def libvirtd() -> Iterator[PrivateLibvirtd]:
    try:
        PrivateLibvirtd.check_installed()
    except LibvirtdUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    # Not pytest's tmp_path: QEMU runs as libvirt-qemu and must traverse to root/images.
    root = Path(tempfile.mkdtemp(prefix="reclaimd-libvirtd-", dir="/tmp"))
    daemon = PrivateLibvirtd(root)
    try:
        daemon.start()
    except LibvirtdUnavailable as exc:
        daemon.stop()
        pytest.fail(f"the private libvirtd did not start: {exc}", pytrace=False)
    yield daemon
    daemon.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def libvirt_guest_image(libvirtd: PrivateLibvirtd) -> GuestImage:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 not found: install qemu-system-x86", pytrace=False)
    try:
        image = build_image()
    except GuestBuildError as exc:
        pytest.fail(f"cannot build the test guest: {exc}", pytrace=False)
    domains.install_image(image, libvirtd)
    return image


@dataclass
class BootedDomain:
    spec: DomainSpec
    control: ControlChannel


@pytest.fixture(scope="module")
def booted(libvirtd: PrivateLibvirtd, libvirt_guest_image: GuestImage) -> Iterator[BootedDomain]:
    """One real guest, booted as a libvirt domain and ready, for the module's tests."""
    spec = DomainSpec(name="rd-booted", ram_mib=256, agent_channel=True)
    domains.define(spec, libvirtd)
    try:
        domains.start(spec, libvirtd)
        control = domains.wait_ready(spec, libvirtd)
        yield BootedDomain(spec, control)
        control.close()
    finally:
        libvirtd.virsh("destroy", spec.name, check=False)
        libvirtd.virsh("undefine", spec.name, check=False)


@pytest.fixture
def admin() -> Iterator[libvirt.virConnect]:
    """A connection of its own to libvirt's in-process test driver (``test:///default``, one
    state per process), to change things behind the source or the daemon under test."""
    conn = libvirt.open("test:///default")
    yield conn
    conn.close()


@pytest.fixture
async def source(libvirtd: PrivateLibvirtd) -> AsyncIterator[LibvirtSource]:
    async with LibvirtSource(
        libvirtd.uri, state_dir=libvirtd.qemu_state_dir, backoff_max=1.0
    ) as src:
        await src.wait_connected(30)
        yield src
