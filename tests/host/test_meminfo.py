from __future__ import annotations

from pathlib import Path

from daemon.host.meminfo import host_memory_use


def test_use_is_one_less_available_over_total(tmp_path: Path) -> None:
    f = tmp_path / "meminfo"
    f.write_text("MemTotal:       1000 kB\nMemFree:         100 kB\nMemAvailable:    250 kB\n")
    assert host_memory_use(f) == 0.75


def test_unreadable_or_incomplete_is_none(tmp_path: Path) -> None:
    assert host_memory_use(tmp_path / "absent") is None
    f = tmp_path / "meminfo"
    f.write_text("MemTotal: 1000 kB\n")
    assert host_memory_use(f) is None


def test_this_hosts_meminfo_reads() -> None:
    use = host_memory_use()
    assert use is not None and 0.0 <= use <= 1.0
