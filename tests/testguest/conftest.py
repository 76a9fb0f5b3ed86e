"""Fixtures for the test guest's unit tests (fakes in testguest_fakes.py)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.testguest import build
from daemon.testguest.agent import AgentFiles
from tests.testguest.testguest_fakes import (
    FAKE_AGENT,
    FAKE_APT_CACHE,
    FAKE_APT_GET,
    PACKAGE,
    VERSION,
    FakeApt,
    all_modules,
    build_deb,
    elf_header,
)


@pytest.fixture
def fake_apt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeApt:
    if shutil.which("dpkg-deb") is None:
        pytest.fail("dpkg-deb not found: these tests build a real .deb (install dpkg)")
    root = tmp_path / "fake-apt"
    bin_dir = root / "bin"
    bin_dir.mkdir(parents=True)
    for name, script in (("apt-cache", FAKE_APT_CACHE), ("apt-get", FAKE_APT_GET)):
        text = script.replace("@PACKAGE@", PACKAGE).replace("@VERSION@", VERSION)
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    build_deb(root, all_modules()).rename(root / "kernel.deb")
    apt = FakeApt(root)
    apt.set_depends(f"{PACKAGE} (= {VERSION})")
    monkeypatch.setenv("FAKE_APT", str(root))
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return apt


@pytest.fixture(autouse=True)
def fake_agent_files(monkeypatch: pytest.MonkeyPatch) -> AgentFiles:
    """The builder takes ``FAKE_AGENT`` instead of the host's qemu-ga (test_testguest_agent.py
    covers finding the real one)."""
    monkeypatch.setattr(build, "agent_files", lambda path=None: FAKE_AGENT)
    return FAKE_AGENT


@pytest.fixture
def static_busybox(tmp_path: Path) -> Path:
    path = tmp_path / "busybox"
    path.write_bytes(elf_header(interpreter=False) + b"busybox payload")
    return path


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory whose paths fit a Unix socket address (tmp_path often does not)."""
    path = Path(tempfile.mkdtemp(prefix="reclaimd-t-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
