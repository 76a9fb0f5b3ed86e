"""The image builder and its cache, with fake apt commands and a fake (static) busybox."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from daemon.testguest import build
from daemon.testguest.agent import AgentFiles
from daemon.testguest.errors import GuestBuildError
from daemon.testguest.kernel import MODULES, KernelPackage
from tests.testguest.testguest_fakes import (
    FAKE_AGENT,
    PACKAGE,
    RELEASE,
    VERSION,
    VMLINUZ,
    FakeApt,
    elf_header,
)


def listing(initrd: Path, tmp: Path) -> list[str]:
    if shutil.which("cpio") is None:
        pytest.fail("cpio not found: it checks the archive here (install cpio)")
    archive = gzip.decompress(initrd.read_bytes())
    done = subprocess.run(["cpio", "-t", "--quiet"], input=archive, capture_output=True, cwd=tmp)
    assert done.returncode == 0, done.stderr
    return done.stdout.decode().split()


def test_first_build_makes_a_bootable_layout(
    fake_apt: FakeApt, static_busybox: Path, tmp_path: Path
) -> None:
    image = build.build_image(tmp_path / "cache", busybox=static_busybox)
    assert image.kernel.read_bytes() == VMLINUZ
    assert (image.kernel_package, image.kernel_version, image.kernel_release) == (
        PACKAGE,
        VERSION,
        RELEASE,
    )
    members = listing(image.initrd, tmp_path)
    assert {"init", "bin/busybox", "dev/console", "lib/modules/load-order"} <= set(members)
    assert {f"lib/modules/{m}.ko" for m in MODULES} <= set(members)
    # The guest agent and its libraries, each under its parent directories.
    agent = {"usr/sbin/qemu-ga", "lib/x86_64-linux-gnu/libfake.so.1", "lib64/ld-linux-x86-64.so.2"}
    assert agent <= set(members)
    assert {"usr", "usr/sbin", "lib/x86_64-linux-gnu", "lib64"} <= set(members)
    meta = json.loads((image.directory / build.META_FILE).read_text())
    assert meta["key"] == image.key and meta["modules"] == list(MODULES)
    assert fake_apt.downloads() == 1
    # Nothing but the finished entry and its lock is left in the cache.
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        image.directory.name,
        f"{image.directory.name}.lock",
    ]
    assert not (image.directory / "download").exists()


def test_second_build_comes_from_the_cache(
    fake_apt: FakeApt, static_busybox: Path, tmp_path: Path
) -> None:
    first = build.build_image(tmp_path, busybox=static_busybox)
    second = build.build_image(tmp_path, busybox=static_busybox)
    assert second == first
    assert fake_apt.downloads() == 1


def test_a_changed_input_builds_a_new_entry(
    fake_apt: FakeApt, static_busybox: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = build.build_image(tmp_path, busybox=static_busybox)
    monkeypatch.setattr(build, "init_script", lambda: b"#!/bin/busybox sh\necho changed\n")
    second = build.build_image(tmp_path, busybox=static_busybox)
    assert second.key != first.key and second.directory != first.directory
    assert fake_apt.downloads() == 2
    fake_apt.set_depends(f"{PACKAGE} (= 9.9.9-2)")  # a new kernel upload: another key
    with pytest.raises(GuestBuildError):  # the fake apt only serves 9.9.9-1
        build.build_image(tmp_path, busybox=static_busybox)


def test_the_cache_key_covers_the_agent_and_every_library() -> None:
    package = KernelPackage(PACKAGE, VERSION)
    key = build.cache_key(package, b"busybox", b"init", FAKE_AGENT)
    (lib, data), loader = FAKE_AGENT.libraries
    updated_lib = AgentFiles(FAKE_AGENT.binary, ((lib, data + b" security fix"), loader))
    moved_lib = AgentFiles(FAKE_AGENT.binary, (("usr/" + lib, data), loader))
    new_binary = AgentFiles(b"qemu-ga 8.0", FAKE_AGENT.libraries)
    keys = {
        build.cache_key(package, b"busybox", b"init", a)
        for a in (updated_lib, moved_lib, new_binary)
    }
    assert key not in keys and len(keys) == 3


def test_an_aborted_build_leaves_nothing_and_its_leftovers_are_cleaned(
    fake_apt: FakeApt, static_busybox: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    fake_apt.flag("fail")
    with pytest.raises(GuestBuildError, match="Failed to fetch"):
        build.build_image(cache, busybox=static_busybox)
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []

    fake_apt.flag("fail", on=False)
    key = build.cache_key(
        KernelPackage(PACKAGE, VERSION),
        static_busybox.read_bytes(),
        build.init_script(),
        FAKE_AGENT,
    )
    # As a build killed mid-way would leave it:
    stale = cache / f"{RELEASE}-{key[:12]}.tmp-killed"
    (stale / "download").mkdir(parents=True)
    image = build.build_image(cache, busybox=static_busybox)
    assert image.directory.name == f"{RELEASE}-{key[:12]}"
    assert not stale.exists()


def test_concurrent_builds_download_once(
    fake_apt: FakeApt, static_busybox: Path, tmp_path: Path
) -> None:
    fake_apt.flag("slow")
    results: list[build.GuestImage] = []

    def run() -> None:
        results.append(build.build_image(tmp_path, busybox=static_busybox))

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(results) == 3 and len(set(results)) == 1
    assert fake_apt.downloads() == 1


def test_rebuild_replaces_the_entry(
    fake_apt: FakeApt, static_busybox: Path, tmp_path: Path
) -> None:
    first = build.build_image(tmp_path, busybox=static_busybox)
    (first.directory / "marker").touch()
    second = build.build_image(tmp_path, busybox=static_busybox, rebuild=True)
    assert second.directory == first.directory
    assert not (second.directory / "marker").exists()
    assert fake_apt.downloads() == 2
    assert [p for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RECLAIMD_CACHE", str(tmp_path / "rc"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert build.default_cache_dir() == tmp_path / "rc" / "guest"
    monkeypatch.delenv("RECLAIMD_CACHE")
    assert build.default_cache_dir() == tmp_path / "xdg" / "reclaimd" / "guest"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert build.default_cache_dir() == tmp_path / "home" / ".cache" / "reclaimd" / "guest"


def test_busybox_must_be_static(tmp_path: Path) -> None:
    static = tmp_path / "static"
    static.write_bytes(elf_header(interpreter=False))
    dynamic = tmp_path / "dynamic"
    dynamic.write_bytes(elf_header(interpreter=True))
    text = tmp_path / "script"
    text.write_bytes(b"#!/bin/sh\n")
    assert build.is_static_elf(static)
    assert not build.is_static_elf(dynamic)
    assert not build.is_static_elf(text)
    assert build.find_busybox(static) == static
    with pytest.raises(GuestBuildError, match="install busybox-static"):
        build.find_busybox(dynamic)
    assert not build.is_static_elf(Path(sys.executable)), "python itself is dynamically linked"


def test_the_init_script_is_valid_shell(tmp_path: Path) -> None:
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.fail("busybox not found: install busybox-static")
    script = tmp_path / "init"
    script.write_bytes(build.init_script())
    done = subprocess.run([busybox, "sh", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
