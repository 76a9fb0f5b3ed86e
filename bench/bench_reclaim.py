"""Balloon controllers on simulated guests with truth: memory returned, pressure, balloon ops.

Three controllers (and "none", reporting alone) drive the same mixed fleet of simulated guests
(``daemon.simguest``'s guest kernel: the allocator model, upstream free page reporting, the
balloon driver and the pressure a balloon causes) for the same guest time, in one harness:

- **proxmox**: Proxmox VE's AutoBalloon as pvestatd runs it every cycle: while host memory use is
  above ``ballooning-target`` (80 %), shrink VMs by the excess shared out by their shares (all
  equal here), at most 100 MiB per VM per cycle, never below the VM's balloon minimum (half of
  its RAM here) and only VMs whose MemFree is above 10 % of their memory; below the target,
  grow VMs back by at most 100 MiB per cycle.
- **mom**: oVirt MOM's default balloon policy (balloon.rules): while host free memory is below
  20 %, shrink each guest whose MemFree is above 20 % of its memory by up to 5 % of its memory
  per cycle, not past the point where 20 % would stay free; otherwise grow it by 5 % per cycle.
- **reclaimd**: ``daemon.ledger.advice`` and ``daemon.ledger.reclaim`` (the daemon's own code),
  step 256 MiB, cool-down 30 s, host target 80 %. Its estimate's split comes from the guest's
  truth (what the guest agent reads from ``/proc/buddyinfo``); reported memory from the host
  view; cache and pressure from the guest stats, as in the daemon.

Memory returned = guest RAM the host does not back (reported, ballooned, never touched), summed
over the VMs. Pressure = the VM-cycles in which a guest stalled, swapped in or OOM-killed.
Guest time runs as fast as the model does (no wall clock).

    .venv/bin/python bench/bench_reclaim.py [--minutes 30] [--results bench/RESULTS-reclaim.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from machine import cpu_model  # bench/machine.py: scripts run from bench/

from daemon.guest_stats import GuestStats
from daemon.ledger.advice import PressureWatch, advise
from daemon.ledger.estimate import Component, Estimate, margin_for
from daemon.ledger.reclaim import ReclaimController, ReclaimPolicy
from daemon.model.constants import PAGE_SIZE
from daemon.simguest.guest import SimGuestSpec
from daemon.simguest.guestos import ModelGuestOS
from daemon.simguest.truth import components

MiB = 1 << 20
CYCLE = 10.0  # seconds of guest time between controller cycles (pvestatd, MOM: 10 s)
STEP = 0.25  # guest time per model step
BALLOON_BYTES_PER_SECOND = 256 * MiB
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS-reclaim.md"
FLEET = (  # name, workload, RAM MiB, deflate-on-oom
    ("hog", "memhog", 256, False),
    ("cache", "pagecache", 256, False),
    ("churn", "churn", 256, True),
    ("frag", "fragment", 256, False),
    ("idle", "idle", 256, False),
)


class TruthRAM:
    """Guest RAM as page flags only: what the host backs and what the guest ever touched."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.npages = size // PAGE_SIZE
        self.backed = np.zeros(self.npages, dtype=bool)
        self.touched = np.zeros(self.npages, dtype=bool)

    def write(self, pages: np.ndarray) -> None:  # type: ignore[type-arg]
        self.backed[pages] = True
        self.touched[pages] = True

    def discard(self, pages: np.ndarray) -> None:  # type: ignore[type-arg]
        self.backed[pages] = False


@dataclass
class VM:
    name: str
    guest: ModelGuestOS
    ram: TruthRAM
    ram_bytes: int
    deflate_on_oom: bool
    target: int  # the QMP balloon value: what the guest should have
    watch: PressureWatch = field(default_factory=PressureWatch)
    last: tuple[int, int, int] = (0, 0, 0)
    pressure_cycles: int = 0
    ops: int = 0

    @property
    def actual(self) -> int:
        return self.ram_bytes - len(self.guest.sim.balloon) * PAGE_SIZE

    def stats(self, t: float) -> GuestStats:
        return replace(self.guest.stats(), last_update=t)


def boot(seed: int) -> list[VM]:
    vms = []
    for i, (name, workload, mib, doom) in enumerate(FLEET):
        ram = TruthRAM(mib * MiB)
        spec = SimGuestSpec(
            name=name,
            ram_bytes=mib * MiB,
            workload=workload,
            seed=seed + i,
            deflate_on_oom=doom,
            linux_6_12_stats=True,
        )
        guest = ModelGuestOS(spec, ram)  # type: ignore[arg-type]
        vms.append(VM(name, guest, ram, mib * MiB, doom, mib * MiB))
    return vms


def host_use(vms: list[VM], host_total: int, base: int) -> float:
    resident = sum(int(vm.ram.backed.sum()) * PAGE_SIZE for vm in vms)
    return (base + resident) / host_total


def set_target(vm: VM, target: int) -> None:
    target = max(PAGE_SIZE, min(vm.ram_bytes, target))
    if abs(target - vm.target) >= PAGE_SIZE:
        vm.target = target
        vm.ops += 1


def proxmox(
    vms: list[VM], t: float, use: float, host_total: int, _state: dict[str, object]
) -> None:
    limit = 100 * MiB
    target = 0.80
    if use > target:
        excess = (use - target) * host_total
        shrinkable = [
            vm
            for vm in vms
            if (vm.stats(t).free_bytes or 0) > 0.10 * vm.actual and vm.actual > vm.ram_bytes // 2
        ]
        for vm in shrinkable:  # equal shares
            change = min(limit, int(excess / len(shrinkable)), vm.actual - vm.ram_bytes // 2)
            set_target(vm, vm.actual - change)
    else:
        for vm in vms:
            if vm.target < vm.ram_bytes:
                set_target(vm, vm.target + limit)


def mom(vms: list[VM], t: float, use: float, host_total: int, _state: dict[str, object]) -> None:
    for vm in vms:
        cur = vm.actual
        if 1 - use < 0.20:
            free = vm.stats(t).free_bytes or 0
            spare = free - 0.20 * cur
            if spare > 0:
                set_target(vm, cur - int(min(0.05 * cur, spare)))
        elif vm.target < vm.ram_bytes:
            set_target(vm, vm.target + int(0.05 * vm.ram_bytes))


def reclaimd(
    vms: list[VM], t: float, use: float, _host_total: int, state: dict[str, object]
) -> None:
    controller = state.setdefault("controller", ReclaimController(ReclaimPolicy()))
    assert isinstance(controller, ReclaimController)
    for vm in vms:
        stats = vm.stats(t)
        truth = components(vm.guest.page_states(), vm.guest.reporting_order)
        ram = vm.ram_bytes
        cache = max(0, (stats.available_bytes or 0) - (stats.free_bytes or 0))
        c = {
            "stranded": Component(truth["stranded"], "agent"),
            "reportable": Component(truth["reportable"], "agent"),
            "reported": Component(truth["reported"], "observed"),
            "free_resident": Component(truth["free_resident"], "observed"),
            "cache": Component(cache, "observed"),
        }
        margin = margin_for(ram)
        est = Estimate(t, ram, margin, True, True, None, components=c)
        advice = advise(
            at=t,
            estimate=est,
            stats=stats,
            actual_bytes=vm.actual,
            deflate_on_oom=vm.deflate_on_oom,
            pressure=vm.watch.observe(stats, margin),
        )
        d = controller.decide(
            vm.name,
            advice,
            now=t,
            ram_bytes=ram,
            actual_bytes=vm.actual,
            available_bytes=stats.available_bytes,
            margin_bytes=margin,
            deflate_on_oom=vm.deflate_on_oom,
            host_use=use,
        )
        if d.target_bytes is not None:
            set_target(vm, d.target_bytes)
            controller.done(d, t)


def none(*_args: object) -> None:
    pass


HEADER = (
    "| controller | mean returned (MiB) | beyond reporting alone (MiB) | pressure (VM-cycles) "
    "| swap-in (MiB) | alloc stalls | OOM kills | balloon ops |\n|---|---|---|---|---|---|---|---|"
)
CONTROLLERS = {"none": none, "proxmox": proxmox, "mom": mom, "reclaimd": reclaimd}


def run(name: str, minutes: float, seed: int) -> dict[str, object]:
    vms = boot(seed)
    total_ram = sum(vm.ram_bytes for vm in vms)
    host_total = total_ram  # the guests could fill the host: it is overcommitted by the rest
    base = int(0.35 * total_ram)  # what the host itself and other processes use
    policy = CONTROLLERS[name]
    state: dict[str, object] = {}
    series: list[tuple[float, int]] = []
    t = 0.0
    started = time.process_time()
    while t < minutes * 60:
        policy(vms, t, host_use(vms, host_total, base), host_total, state)
        for _ in range(int(CYCLE / STEP)):
            for vm in vms:
                vm.guest.advance(STEP)
                target_pages = (vm.ram_bytes - vm.target) // PAGE_SIZE
                budget = int(BALLOON_BYTES_PER_SECOND * STEP) // PAGE_SIZE
                vm.guest.balloon_toward(target_pages, budget)
        t += CYCLE
        returned = 0
        for vm in vms:
            returned += vm.ram_bytes - int(vm.ram.backed.sum()) * PAGE_SIZE
            s = vm.guest.stats()
            now = (s.swap_in_bytes or 0, s.alloc_stalls or 0, s.oom_kills or 0)
            if any(a > b for a, b in zip(now, vm.last, strict=True)):
                vm.pressure_cycles += 1
            vm.last = now
        series.append((t, returned))
    cpu = time.process_time() - started
    totals = {
        "swap_in_mib": sum(vm.last[0] for vm in vms) / MiB,
        "alloc_stalls": sum(vm.last[1] for vm in vms),
        "oom_kills": sum(vm.last[2] for vm in vms),
    }
    returned = [r for _, r in series]
    return {
        "controller": name,
        "mean_returned_mib": sum(returned) / len(returned) / MiB,
        "pressure_cycles": sum(vm.pressure_cycles for vm in vms),
        "per_vm_pressure": {vm.name: vm.pressure_cycles for vm in vms},
        "balloon_ops": sum(vm.ops for vm in vms),
        **totals,
        "series": series,
        "cpu_seconds": cpu,
    }


def plot(results: list[dict[str, object]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for r in results:
        series = r["series"]
        assert isinstance(series, list)
        # One-minute means: single cycles swing with each workload's phase.
        per = int(60 / CYCLE)
        means = [
            (series[i + per - 1][0] / 60, sum(x[1] for x in series[i : i + per]) / per / MiB)
            for i in range(0, len(series) - per + 1, per)
        ]
        ax.plot([m[0] for m in means], [m[1] for m in means], label=r["controller"])
    ax.set_xlabel("guest time (min)")
    ax.set_ylabel("host memory returned (MiB, 1-minute means)")
    ax.set_title("Memory returned over time, 5 guests x 256 MiB, mixed workloads")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="guest time")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    load = os.getloadavg()[0]
    results = []
    for name in CONTROLLERS:
        r = run(name, args.minutes, args.seed)
        print(json.dumps({k: v for k, v in r.items() if k != "series"}), flush=True)
        results.append(r)
    by = {str(r["controller"]): r for r in results}
    base = float(by["none"]["mean_returned_mib"])  # type: ignore[arg-type]
    rows = []
    for r in results:
        mean = float(r["mean_returned_mib"])  # type: ignore[arg-type]
        rows.append(
            f"| {r['controller']} | {mean:.0f} | {mean - base:.0f} | {r['pressure_cycles']} | "
            f"{r['swap_in_mib']:.1f} | {r['alloc_stalls']} | {r['oom_kills']} | "
            f"{r['balloon_ops']} |"
        )
    best = max(("proxmox", "mom"), key=lambda n: float(by[n]["mean_returned_mib"]))  # type: ignore[arg-type]

    def extra(n: str) -> float:
        return float(by[n]["mean_returned_mib"]) - base  # type: ignore[arg-type]

    ratio_total = float(by["reclaimd"]["mean_returned_mib"]) / float(by[best]["mean_returned_mib"])  # type: ignore[arg-type]
    ratio_extra = extra("reclaimd") / extra(best) if extra(best) > 0 else float("inf")
    png = args.results.with_suffix(".png")
    plot(results, png)
    text = f"""# Reclaim controllers (bench/bench_reclaim.py)

Command: `nice -n 10 .venv/bin/python bench/bench_reclaim.py --minutes {args.minutes:g}`

Machine: {cpu_model()}, {os.cpu_count()} cores, kernel {platform.release()}, Python
{platform.python_version()}, load average {load:.1f} at the start. Recorded
{time.strftime("%Y-%m-%d")}. Guest time {args.minutes:g} min, seed {args.seed}; fleet: 5 guests
of 256 MiB (memhog, pagecache, churn with deflate-on-oom, fragment, idle), upstream reporting at
order 9, swap an eighth of RAM; host memory = the guests' RAM, 35 % used by the host itself.

{HEADER}
{chr(10).join(rows)}

Better baseline by memory returned: **{best}**. reclaimd / {best}: **{ratio_total:.2f}x** of the
memory returned in all, **{ratio_extra:.2f}x** of what the balloon adds beyond reporting alone;
pressure {by["reclaimd"]["pressure_cycles"]} VM-cycles against {by[best]["pressure_cycles"]}.

![memory returned over time]({png.name})
"""
    args.results.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
