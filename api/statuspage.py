"""The status page's HTML, rendered from the fleet: the fleet table at ``/``, a VM at ``/vm/NAME``.

Server-rendered, so the page shows every VM with no script at all, and a small script
(``api/static/status.js``) over the REST API adds what changes: each VM's last events, and on a
VM's page its estimate sampled while the page is open and the blocks reporting returned over
the last minutes. Every string from a VM or its guest is escaped here; the page's policy allows
scripts and styles from the daemon only.
"""

from __future__ import annotations

import time
from html import escape
from typing import TYPE_CHECKING
from urllib.parse import quote

from api.version import VERSION
from daemon.fleet import VMState

if TYPE_CHECKING:  # the fleet's VMState carries it; the API only reads it
    from daemon.ledger.estimate import Estimate

MiB = 1 << 20
# The stacked bar's parts of a VM's RAM, in order: what the host got back, what it could, the
# rest. Their names are the estimate's components (the legend and the CSS use them too).
BAR_PARTS = (
    ("ballooned", "held by the balloon"),
    ("reported", "returned by free page reporting"),
    ("reportable", "free; reporting will return it"),
    ("stranded", "free below the reporting order: only a balloon gets it"),
    ("free_resident", "free, still backed (split unknown)"),
    ("cache", "caches a balloon would squeeze out"),
    ("used", "used by the guest, or not known"),
)
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def mib(value: float | None) -> str:
    return "-" if value is None else f"{value / MiB:,.0f}"


def _page(title: str, body: str, script_data: str = "") -> str:
    return (
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title>"
        '<link rel=stylesheet href="/static/status.css">'
        f'<script defer src="/static/status.js"></script></head>\n<body{script_data}>\n'
        f'<header><a href="/">reclaimd</a> <span class=muted>{escape(VERSION)}</span>'
        ' <a href="/docs">API</a> <a href="/metrics">metrics</a>'
        " <span id=updated class=muted></span></header>\n"
        f"<main>\n{body}\n</main></body></html>\n"
    )


def bar_parts(vm: VMState) -> list[tuple[str, int]]:
    """The VM's RAM split into :data:`BAR_PARTS` (bytes, summing to its RAM), where known."""
    ram = vm.memory.ram_bytes
    if ram is None or ram <= 0:
        return []
    known = _known(vm.estimate)
    parts: list[tuple[str, int]] = []
    for name in ("ballooned", "reported"):
        parts.append((name, known.get(name, 0)))
    if "reportable" in known and "stranded" in known:
        parts += [("reportable", known["reportable"]), ("stranded", known["stranded"])]
    else:
        parts.append(("free_resident", known.get("free_resident", 0)))
    parts.append(("cache", known.get("cache", 0)))
    rest = ram - sum(size for _, size in parts)
    if rest < 0:  # untrusted inputs: never draw more than the RAM
        parts = [(name, size * ram // (ram - rest)) for name, size in parts]
        rest = 0
    parts.append(("used", rest))
    return [(name, size) for name, size in parts if size > 0]


def _known(estimate: Estimate | None) -> dict[str, int]:
    if estimate is None:
        return {}
    return {k: c.bytes for k, c in estimate.components.items() if c.bytes is not None}


def _bar(vm: VMState) -> str:
    """An SVG bar (its geometry is attributes, which the page's style policy allows)."""
    ram = vm.memory.ram_bytes
    parts = bar_parts(vm)
    if not parts or ram is None:
        return "<svg class='bar empty' viewBox='0 0 100 10'><title>RAM not known yet</title></svg>"
    rects, x = [], 0.0
    for name, size in parts:
        width = 100 * size / ram
        rects.append(
            f"<rect class='part {name}' x='{x:.3f}' width='{width:.3f}' height='10'>"
            f"<title>{name}: {mib(size)} MiB</title></rect>"
        )
        x += width
    label = escape(f"RAM of {vm.name}", quote=True)
    return (
        f"<svg class=bar viewBox='0 0 100 10' preserveAspectRatio=none role=img "
        f'aria-label="{label}">{"".join(rects)}</svg>'
    )


def _legend() -> str:
    items = "".join(
        f'<li><span class="swatch {name}"></span>{name}: {escape(what)}</li>'
        for name, what in BAR_PARTS
    )
    return f"<ul class=legend>{items}</ul>"


def _age(vm: VMState, now: float) -> str:
    stats = vm.guest_stats
    age = stats.age(now) if stats is not None else None
    return "-" if age is None else f"{age:.0f} s"


def _reporting(vm: VMState) -> str:
    if vm.estimate is not None:
        return vm.estimate.verdict
    if vm.balloon.free_page_reporting is not None:
        return "on" if vm.balloon.free_page_reporting else "off"
    return "unknown"


def fleet_page(vms: list[VMState], now: float | None = None) -> str:
    """``/``: one row per VM, with its RAM as a stacked bar."""
    now = time.time() if now is None else now
    head = (
        "VM", "up", "RAM", "host uses", "guest used", "guest free", "ballooned", "reported",
        "reclaimable", "RAM split", "reporting", "stats age", "last events",
    )  # fmt: skip
    rows = []
    for vm in sorted(vms, key=lambda v: v.name):
        stats = vm.guest_stats if vm.guest_stats is not None and vm.guest_stats.valid else None
        used = (
            stats.total_bytes - stats.free_bytes
            if stats is not None and stats.total_bytes is not None and stats.free_bytes is not None
            else None
        )
        known = _known(vm.estimate)
        host = vm.host.ledger.resident_bytes if vm.host and vm.host.ledger else None
        link = f'<a href="/vm/{quote(vm.name, safe="")}">{escape(vm.name)}</a>'
        cells = (
            link,
            "yes" if vm.up else f'<span title="{escape(vm.last_error or "")}">no</span>',
            mib(vm.memory.ram_bytes),
            mib(host),
            mib(used),
            mib(stats.free_bytes if stats else None),
            mib(known.get("ballooned")),
            mib(known.get("reported")),
            mib(known.get("reclaimable")),
            _bar(vm),
            escape(_reporting(vm)),
            _age(vm, now),
            '<span class="events muted">-</span>',
        )
        tds = "".join(f"<td>{cell}</td>" for cell in cells)
        rows.append(f'<tr class=vm data-vm="{escape(vm.name)}">{tds}</tr>')
    ths = "".join(f"<th>{escape(h)}</th>" for h in head)
    table = (
        f"<table id=fleet><thead><tr>{ths}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
        if rows
        else "<p id=fleet class=empty>No VMs known yet.</p>"
    )
    body = (
        f"<h1>Fleet: {len(vms)} VMs, {sum(vm.up for vm in vms)} up</h1>\n"
        f"<p class=muted>Sizes in MiB. The bar is each VM's RAM.</p>\n{table}\n{_legend()}"
    )
    return _page("reclaimd: fleet", body, " data-page=fleet")


def vm_page(vm: VMState, now: float | None = None) -> str:
    """``/vm/NAME``: the estimate's breakdown, and its history while the page is open."""
    now = time.time() if now is None else now
    estimate = vm.estimate
    rows = []
    if estimate is not None:
        for name, c in estimate.components.items():
            age = "-" if c.age_seconds is None else f"{c.age_seconds:.0f} s"
            rows.append(
                f"<tr data-component={escape(name)}><td>{escape(name)}</td>"
                f"<td>{mib(c.bytes)}</td><td>{escape(c.source)}</td><td>{age}</td>"
                f"<td>{escape(c.reason or '')}</td></tr>"
            )
    breakdown = (
        "<table id=estimate><thead><tr><th>component</th><th>MiB</th><th>source</th>"
        f"<th>input age</th><th>note</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
        if rows
        else "<p id=estimate class=empty>No estimate yet.</p>"
    )
    verdict = ""
    if estimate is not None:
        note = escape(estimate.reporting_note or "")
        verdict = f"<p>Free page reporting: <b>{escape(estimate.verdict)}</b> {note}</p>"
    body = (
        f"<h1>{escape(vm.name)} <span class=muted>{'up' if vm.up else 'down'}, "
        f"{escape(vm.attach)}, {escape(vm.address)}</span></h1>\n"
        f"<p>RAM {mib(vm.memory.ram_bytes)} MiB, stats age {_age(vm, now)}</p>\n"
        f"{_bar(vm)}\n{_legend()}\n{verdict}\n<h2>Estimate</h2>\n{breakdown}\n"
        "<h2>Over the last minutes</h2>\n"
        "<p class=muted>Reclaimable and returned memory, sampled every 5 s while this page is "
        "open; reported blocks per minute from the ledger's history.</p>\n"
        "<svg id=history viewBox='0 0 600 120' role=img aria-label=history></svg>\n"
        "<table id=reported><thead><tr><th>minute</th><th>reported MiB</th></tr></thead>"
        "<tbody></tbody></table>\n"
        "<h2>Recent events</h2>\n<ul id=events class=muted><li>-</li></ul>"
    )
    return _page(f"reclaimd: {vm.name}", body, f' data-page=vm data-vm="{escape(vm.name)}"')
