"""Helpers shared by the model tests."""

from __future__ import annotations

from daemon.model import SimConfig, Simulation


def small_sim(
    engine: str | None = "upstream", ram_mib: int = 1024, order: int = 9, **kw: object
) -> Simulation:
    """A guest with one zone and no boot reservations, so block counts are easy to check."""
    config = SimConfig(
        ram_bytes=ram_mib << 20, engine=engine, order=order, reserve=False, single_zone=True
    )
    for key, value in kw.items():
        setattr(config, key, value)
    return Simulation(config)
