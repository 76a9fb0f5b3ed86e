"""Per-operation costs for the allocator model, measured on this machine (bench/costs.c).

    nice -n 10 .venv/bin/python bench/bench_costs.py      # about 15 s; writes bench/op_costs.json

Builds bench/costs.c with the system C compiler, runs it, and writes each cost the model uses
with how it was obtained: measured here, composed from measurements, or (where nothing here
can measure it) from the cited source. ``daemon.model.costs.OpCosts.from_json`` reads the file.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from machine import cpu_model  # bench/machine.py: scripts run from bench/

HERE = Path(__file__).resolve().parent
COSTS_JSON = HERE / "op_costs.json"


def measure() -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "costs"
        subprocess.run(
            ["cc", "-O2", "-o", str(exe), str(HERE / "costs.c"), "-lpthread"], check=True
        )
        out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    raw: dict[str, float] = json.loads(out)
    return raw


def costs_from(raw: dict[str, float]) -> dict[str, dict[str, Any]]:
    ns = 1e-9
    if raw["kvm_exit_ns"] < 0:
        raise SystemExit("no usable /dev/kvm: the exit cost cannot be measured here")
    exit_s = raw["kvm_exit_ns"] * ns
    wake_s = raw["eventfd_wakeup_ns"] * ns
    return {
        "list_visit": {
            "seconds": raw["list_visit_ns"] * ns,
            "how": "measured: dependent loads over 4096 cache lines 64 KiB apart in random "
            "order (struct pages of order-10 heads), median of 41 x 65536",
        },
        "zone_lock": {
            "seconds": raw["lock_round_trip_ns"] * ns,
            "how": "measured: uncontended locked exchange + release store on one cached line, "
            "median of 41 x 1e6; contention and irq save/restore not included",
        },
        "hint_exit": {
            "seconds": exit_s,
            "how": "measured: KVM_RUN round trip of a one-vCPU guest looping on `out` "
            "(a heavyweight exit to user space), median of 41 x 20000",
        },
        "report_call": {
            "seconds": exit_s + 2 * wake_s,
            "how": "composed: the kick's exit (hint_exit) + QEMU's thread woken by the "
            "ioeventfd + the guest woken by the irqfd completion (two eventfd thread "
            "wake-ups, measured: ping-pong, median of 41 x 2000); discards are priced apart",
        },
        "discard_2m": {
            "seconds": raw["discard_anon_2m_ns"] * ns,
            "how": "measured: MADV_DONTNEED of a populated THP-backed 2 MiB anonymous "
            "range (QEMU's discard of private guest RAM), median of 41",
        },
        "discard_4m": {
            "seconds": raw["discard_anon_4m_ns"] * ns,
            "how": "measured: MADV_DONTNEED of a populated THP-backed 4 MiB anonymous "
            "range, median of 41",
        },
        "refault_4k": {
            "seconds": raw["refault_4k_ns"] * ns,
            "how": "measured: first write to a discarded 4 KiB page (MADV_NOHUGEPAGE), "
            "per page over 64 MiB, median of 41; the EPT exit of a guest is not included",
        },
        "refault_2m": {
            "seconds": raw["refault_2m_ns"] * ns,
            "how": "measured: first write to a discarded THP-backed 2 MiB range, per range "
            "over 64 MiB, median of 41",
        },
        "state_store": {
            "seconds": 2 * raw["lock_round_trip_ns"] * ns,
            "how": "estimated: ESSA sets a page state with one interlocked update of the "
            "page's state byte (s390 has no analogue here); priced as two locked updates",
        },
        "fault_4k": {
            "seconds": raw["page_fault_loop_ns"] * ns,
            "how": "measured: will-it-scale page_fault1's loop natively (mmap 128 MiB, "
            "write every 4 KiB page, munmap), per page, median of 11",
        },
        "fault_2m": {
            "seconds": raw["refault_2m_ns"] * ns,
            "how": "measured: the same first write of a 2 MiB THP range as refault_2m "
            "(a guest THP fault allocates and zeroes 2 MiB the same way)",
        },
    }


def main() -> None:
    load = round(os.getloadavg()[0], 1)
    raw = measure()
    doc = {
        "recorded": time.strftime("%Y-%m-%d", time.gmtime()),
        "command": "nice -n 10 .venv/bin/python bench/bench_costs.py",
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "kernel": platform.release(),
            "load_average": load,
            "thp": Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip(),
        },
        "costs": costs_from(raw),
        "raw_ns": raw,
    }
    COSTS_JSON.write_text(json.dumps(doc, indent=2) + "\n")
    for name, entry in doc["costs"].items():
        print(f"{name:12} {entry['seconds'] * 1e9:12.1f} ns  {entry['how'].split(':')[0]}")


if __name__ == "__main__":
    main()
