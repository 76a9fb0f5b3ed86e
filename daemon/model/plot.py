"""PNG plots of simulation results (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_returned(results: Sequence[Mapping[str, Any]], path: str, title: str = "") -> None:
    """Memory the host holds discarded because of reporting, over time, one line per engine."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for r in results:
        series = r["series"]
        ax.plot([s[0] for s in series], [s[1] / 2**20 for s in series], label=r["engine"])
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("reported and discarded (MiB)")
    ax.set_title(title or "memory returned to the host")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_scaling(
    points: Mapping[str, Sequence[tuple[float, float]]], path: str, title: str = ""
) -> None:
    """Cost per reported page against guest size, log-log: ``{engine: [(GiB, cost), ...]}``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for engine, pts in points.items():
        pts = [(x, y) for x, y in pts if y > 0]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=engine)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("guest RAM (GiB)")
    ax.set_ylabel("list entries visited per reported page")
    ax.set_title(title or "cost per reported page vs guest size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
