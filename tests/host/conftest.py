from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.host.qemu import MEMFD_ARGS, Qemu, start_qemu


@pytest.fixture(scope="session")
def qemu_default(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Qemu]:
    """QEMU -S with default (anonymous) RAM of 256 MiB."""
    q = start_qemu(tmp_path_factory.mktemp("qemu-default"))
    yield q
    q.stop()


@pytest.fixture(scope="session")
def qemu_memfd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Qemu]:
    """QEMU -S with 256 MiB of RAM in memory-backend-memfd ``ram0``."""
    q = start_qemu(tmp_path_factory.mktemp("qemu-memfd"), *MEMFD_ARGS)
    yield q
    q.stop()
