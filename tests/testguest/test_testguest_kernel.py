"""Finding, downloading and unpacking the kernel package, against fake apt commands and a real
.deb built by dpkg-deb."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from daemon.testguest import kernel
from daemon.testguest.errors import GuestBuildError
from tests.testguest.testguest_fakes import (
    PACKAGE,
    RELEASE,
    VERSION,
    VMLINUZ,
    FakeApt,
    all_modules,
    build_deb,
    fake_module,
)


def test_module_depends_reads_modinfo() -> None:
    assert kernel.module_depends(fake_module("virtio_pci", ["virtio_ring", "virtio"])) == [
        "virtio_ring",
        "virtio",
    ]
    assert kernel.module_depends(fake_module("virtio_ring", [])) == []
    assert kernel.module_depends(b"no modinfo here") == []


def test_the_load_order_fits_the_modules_dependencies() -> None:
    files = kernel.KernelFiles(RELEASE, VMLINUZ, all_modules())
    kernel.check_load_order(files)
    swapped = ("virtio", "virtio_ring", *kernel.MODULES[2:])
    with pytest.raises(GuestBuildError, match=r"virtio needs \['virtio_ring'\]"):
        kernel.check_load_order(files, swapped)


@pytest.mark.parametrize("usr", [False, True], ids=["lib", "usr-lib"])
def test_extract_takes_vmlinuz_and_the_wanted_modules(tmp_path: Path, usr: bool) -> None:
    modules = all_modules()
    deb = build_deb(tmp_path, modules, xz=frozenset({"virtio_balloon"}), usr=usr)
    files = kernel.extract(deb)
    assert files.release == RELEASE
    assert files.vmlinuz == VMLINUZ
    assert list(files.modules) == list(kernel.MODULES)
    # xz-compressed modules come out as plain ELF for busybox insmod.
    assert files.modules == modules


def test_extract_names_missing_modules(tmp_path: Path) -> None:
    modules = all_modules()
    del modules["virtio_balloon"]
    deb = build_deb(tmp_path, modules)
    with pytest.raises(GuestBuildError, match=r"modules \['virtio_balloon'\] missing"):
        kernel.extract(deb)


def test_extract_reports_a_broken_package(tmp_path: Path) -> None:
    deb = tmp_path / "broken.deb"
    deb.write_bytes(b"not a deb")
    with pytest.raises(GuestBuildError, match="dpkg-deb"):
        kernel.extract(deb)


def test_resolve_follows_the_metapackage(fake_apt: FakeApt) -> None:
    assert kernel.resolve_kernel_package() == kernel.KernelPackage(PACKAGE, VERSION)
    assert fake_apt.calls("apt-get") == []


def test_resolve_asks_for_the_version_when_depends_has_none(fake_apt: FakeApt) -> None:
    fake_apt.set_depends(f"{PACKAGE}, linux-base")
    assert kernel.resolve_kernel_package() == kernel.KernelPackage(PACKAGE, VERSION)
    assert f"apt-cache show --no-all-versions {PACKAGE}" in fake_apt.calls("apt-cache")


def test_resolve_a_pinned_package(fake_apt: FakeApt) -> None:
    assert kernel.resolve_kernel_package(PACKAGE).version == VERSION
    with pytest.raises(GuestBuildError, match=re.escape("linux-image-0.0.0-0-amd64")):
        kernel.resolve_kernel_package("linux-image-0.0.0-0-amd64")


def test_empty_package_lists_are_updated_as_root(
    fake_apt: FakeApt, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    fake_apt.flag("empty")
    assert kernel.resolve_kernel_package().name == PACKAGE
    assert any("update" in call for call in fake_apt.calls("apt-get"))


def test_empty_package_lists_fail_clearly_without_root(
    fake_apt: FakeApt, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    fake_apt.flag("empty")
    with pytest.raises(GuestBuildError, match=r"run `apt-get update` as root"):
        kernel.resolve_kernel_package()
    assert fake_apt.calls("apt-get") == []


def test_no_apt_fails_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(GuestBuildError, match="apt is unavailable"):
        kernel.resolve_kernel_package()


def test_download_fetches_exactly_one_package(fake_apt: FakeApt, tmp_path: Path) -> None:
    into = tmp_path / "dl"
    into.mkdir()
    deb = kernel.download(kernel.KernelPackage(PACKAGE, VERSION), into)
    assert deb.parent == into and deb.name.startswith(PACKAGE)
    assert fake_apt.downloads() == 1
    fake_apt.flag("fail")
    (into / deb.name).unlink()
    with pytest.raises(GuestBuildError, match="Failed to fetch"):
        kernel.download(kernel.KernelPackage(PACKAGE, VERSION), into)
