"""The host's own memory use, from ``/proc/meminfo``: what the reclaim controller's goal is of."""

from __future__ import annotations

from pathlib import Path


def host_memory_use(path: Path = Path("/proc/meminfo")) -> float | None:
    """``1 - MemAvailable / MemTotal``: the share of the host's memory in use; None when the
    file cannot be read or lacks the fields."""
    try:
        text = path.read_text()
    except OSError:
        return None
    fields: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        value = rest.split()
        if value and value[0].isdigit():
            fields[name] = int(value[0])
    total, available = fields.get("MemTotal"), fields.get("MemAvailable")
    if not total or available is None:
        return None
    return max(0.0, min(1.0, 1 - available / total))
