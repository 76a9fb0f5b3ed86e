"""reclaimd's Grafana dashboards as code: a fleet overview and a per-VM drill-down.

Built with grafana-foundation-sdk (types generated from Grafana 11.6's schema). The JSON is
committed beside this file and provisioned from there; regenerate after a change:

    python deploy/grafana/dashboards.py           # write dashboards/*.json
    python deploy/grafana/dashboards.py --check   # exit 1 if the committed JSON is stale

Every query selects on the ``cluster`` and ``instance`` variables, so one dashboard serves a
single host, a Prometheus with many hosts, and a federated or remote-written fleet where each
site's Prometheus adds a ``cluster`` external label. Panels whose honest value is zero (no VM
down, no reconnect yet) are written to return 0 rather than nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import (
    bargauge,
    common,
    dashboard,
    prometheus,
    stat,
    statetimeline,
    table,
    timeseries,
)
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import (
    BarGaugeDisplayMode,
    LegendDisplayMode,
    LegendPlacement,
    StackingMode,
    VizOrientation,
)
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DashboardLinkType,
    DataSourceRef,
    DataTransformerConfig,
    Threshold,
    ThresholdsMode,
    ValueMap,
    ValueMappingResult,
    VariableOption,
    VariableRefresh,
    VariableSort,
)
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

OUT_DIR = Path(__file__).resolve().parent / "dashboards"
DS = DataSourceRef(type_val="prometheus", uid="${datasource}")
TAGS = ["reclaimd", "qemu"]

HOSTS = 'cluster=~"$cluster", instance=~"$instance"'
ONE_VM = HOSTS + ', vm="$vm"'
# A timestamp: time() - it is the stats' age.
STATS_TIME = "qemu_guest_stats_last_update_timestamp_seconds"

# Grafana's unit ids.
BYTES = "bytes"
BYTES_PER_S = "Bps"
SECONDS = "s"
OPS = "ops"
NONE = "none"

ALL = VariableOption(text="All", value="$__all", selected=True)
UP_DOWN = [
    ValueMap(
        {
            "0": ValueMappingResult(text="down", color="red", index=0),
            "1": ValueMappingResult(text="up", color="green", index=1),
        }
    )
]
ON_OFF = [
    ValueMap(
        {
            "0": ValueMappingResult(text="off", color="orange", index=0),
            "1": ValueMappingResult(text="on", color="green", index=1),
        }
    )
]
EFFECTIVE = [
    ValueMap(
        {
            "0": ValueMappingResult(text="nothing discarded", color="red", index=0),
            "1": ValueMappingResult(text="effective", color="green", index=1),
        }
    )
]


def q(expr: str, legend: str = "", *, instant: bool = False) -> prometheus.Dataquery:
    """A Prometheus query; instant queries are for panels that show the current value only."""
    query = prometheus.Dataquery().expr(expr).datasource(DS)
    if legend:
        query = query.legend_format(legend)
    return query.instant() if instant else query.range()


def _with_targets(panel: Any, targets: Sequence[prometheus.Dataquery]) -> Any:
    for i, target in enumerate(targets):
        panel = panel.with_target(target.ref_id(chr(ord("A") + i)))
    return panel


def thresholds(*steps: tuple[float | None, str]) -> dashboard.ThresholdsConfig:
    return (
        dashboard.ThresholdsConfig()
        .mode(ThresholdsMode.ABSOLUTE)
        .steps([Threshold(value=value, color=color) for value, color in steps])
    )


def series(
    title: str,
    unit: str,
    targets: Sequence[prometheus.Dataquery],
    *,
    description: str,
    stacked: bool = False,
    span: int = 12,
    height: int = 8,
) -> timeseries.Panel:
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DS)
        .unit(unit)
        .span(span)
        .height(height)
        .fill_opacity(20 if stacked else 5)
        .legend(
            common.VizLegendOptions()
            .display_mode(LegendDisplayMode.LIST)
            .placement(LegendPlacement.BOTTOM)
            .show_legend(True)
        )
    )
    if stacked:
        panel = panel.stacking(common.StackingConfig().mode(StackingMode.NORMAL))
    return _with_targets(panel, targets)  # type: ignore[no-any-return]


def single(
    title: str,
    unit: str,
    target: prometheus.Dataquery,
    *,
    description: str,
    span: int = 4,
    mappings: list[ValueMap] | None = None,
    steps: Iterable[tuple[float | None, str]] = ((None, "blue"),),
) -> stat.Panel:
    panel = (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DS)
        .unit(unit)
        .span(span)
        .height(4)
        .thresholds(thresholds(*steps))
    )
    if mappings:
        panel = panel.mappings(list(mappings))
    return _with_targets(panel, [target])  # type: ignore[no-any-return]


def _variables(*, with_vm: bool) -> list[Any]:
    variables: list[Any] = [
        dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus"),
        dashboard.QueryVariable("cluster")
        .label("Cluster")
        .description("external label set by each site's Prometheus; absent on a single site")
        .datasource(DS)
        .query("label_values(qemu_vm_up, cluster)")
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
        .current(ALL),
        dashboard.QueryVariable("instance")
        .label("Host")
        .datasource(DS)
        .query('label_values(qemu_vm_up{cluster=~"$cluster"}, instance)')
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
        .current(ALL),
    ]
    if with_vm:
        variables.append(
            dashboard.QueryVariable("vm")
            .label("VM")
            .datasource(DS)
            .query(f"label_values(qemu_vm_up{{{HOSTS}}}, vm)")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(VariableSort.ALPHABETICAL_ASC)
        )
    return variables


def _base(title: str, uid: str, description: str, *, with_vm: bool) -> dashboard.Dashboard:
    board = (
        dashboard.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags(TAGS)
        .time("now-6h", "now")
        .refresh("30s")
        .timezone("browser")
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .link(
            dashboard.DashboardLink("reclaimd dashboards")
            .type(DashboardLinkType.DASHBOARDS)
            .tags(["reclaimd"])
            .as_dropdown(True)
            .include_vars(True)
            .keep_time(True)
        )
    )
    for variable in _variables(with_vm=with_vm):
        board = board.with_variable(variable)
    return board


def fleet() -> dashboard.Dashboard:
    """Fleet overview: what the hosts got back, what is still reclaimable, which VMs are unwell."""
    board = _base(
        "reclaimd / Fleet",
        "reclaimd-fleet",
        "Memory returned and still reclaimable across QEMU hosts, and VMs that are down or stale",
        with_vm=False,
    )
    board = (
        board.with_row(dashboard.Row("Now"))
        .with_panel(
            single(
                "VMs",
                NONE,
                q(f"sum(instance:qemu_vms:count{{{HOSTS}}})", instant=True),
                description="VMs reclaimd knows on the selected hosts",
            )
        )
        .with_panel(
            single(
                "VMs down",
                NONE,
                q(f"sum(instance:qemu_vms_down:sum{{{HOSTS}}})", instant=True),
                description="Known VMs without a working QMP session",
                steps=((None, "green"), (1, "red")),
            )
        )
        .with_panel(
            single(
                "VMs with stale guest stats",
                NONE,
                q(
                    f"count(time() - {STATS_TIME}{{{HOSTS}}} > 60) or vector(0)",
                    instant=True,
                ),
                description="Guest statistics older than 60 s: the guest side of the estimate is"
                " out of date",
                steps=((None, "green"), (1, "orange")),
            )
        )
        .with_panel(
            single(
                "Guest RAM",
                BYTES,
                q(f"sum(instance:qemu_vm_memory_bytes:sum{{{HOSTS}}})", instant=True),
                description="RAM of all VMs as QEMU sizes it (base plus hot-plugged)",
            )
        )
        .with_panel(
            single(
                "Returned to the hosts",
                BYTES,
                q(f"sum(instance:qemu_returned_bytes:sum{{{HOSTS}}})", instant=True),
                description="Held by balloons or discarded through free page reporting",
                steps=((None, "green"),),
            )
        )
        .with_panel(
            single(
                "Still reclaimable",
                BYTES,
                q(f"sum(instance:qemu_reclaimable_bytes:sum{{{HOSTS}}})", instant=True),
                description="What the hosts could still get back without pushing guests below"
                " the safety margin",
                steps=((None, "orange"),),
            )
        )
        .with_row(dashboard.Row("Reclaimable"))
        .with_panel(
            series(
                "Reclaimable by VM",
                BYTES,
                [
                    q(
                        f"sum by (instance, vm) (qemu_reclaimable_bytes{{{HOSTS}}})",
                        "{{instance}} / {{vm}}",
                    )
                ],
                description="The estimate's total per VM; open the VM dashboard for its parts",
                stacked=True,
            )
        )
        .with_panel(
            _with_targets(
                bargauge.Panel()
                .title("Most reclaimable VMs")
                .description("The ten VMs with the most memory the host could still get back")
                .datasource(DS)
                .unit(BYTES)
                .span(12)
                .height(8)
                .display_mode(BarGaugeDisplayMode.GRADIENT)
                .orientation(VizOrientation.HORIZONTAL),
                [
                    q(
                        f"topk(10, qemu_reclaimable_bytes{{{HOSTS}}})",
                        "{{instance}} / {{vm}}",
                        instant=True,
                    )
                ],
            )
        )
        .with_panel(
            series(
                "Returned: free page reporting vs balloon",
                BYTES,
                [
                    q(
                        f'sum(instance_part:qemu_returned_bytes:sum{{{HOSTS}, part="reported"}})',
                        "free page reporting",
                    ),
                    q(
                        f'sum(instance_part:qemu_returned_bytes:sum{{{HOSTS}, part="ballooned"}})',
                        "balloon",
                    ),
                ],
                description="Guest memory the hosts no longer back, by the mechanism that"
                " returned it",
                stacked=True,
            )
        )
        .with_panel(
            series(
                "Still reclaimable, by how",
                BYTES,
                [
                    q(
                        f"sum by (part) (instance_part:qemu_guest_free_resident_parts_bytes:sum"
                        f"{{{HOSTS}}}) or "
                        + _as_part(
                            f"sum(instance:qemu_guest_reclaimable_cache_bytes:sum{{{HOSTS}}})",
                            "cache",
                        ),
                        "{{part}}",
                    ),
                ],
                description="reportable: free page reporting will return it; stranded: free"
                " blocks below the reporting order, only a balloon gets them; cache: caches a"
                " balloon would squeeze out",
                stacked=True,
            )
        )
        .with_row(dashboard.Row("Health"))
        .with_panel(
            _with_targets(
                statetimeline.Panel()
                .title("QMP sessions")
                .description("Per VM: up while reclaimd holds or polls a working QMP session")
                .datasource(DS)
                .span(12)
                .height(8)
                .mappings(list(UP_DOWN)),
                [q(f"qemu_vm_up{{{HOSTS}}}", "{{instance}} / {{vm}}")],
            )
        )
        .with_panel(
            series(
                "Guest stats age",
                SECONDS,
                [
                    q(
                        f"max by (instance, vm) (time() - {STATS_TIME}{{{HOSTS}}})",
                        "{{instance}} / {{vm}}",
                    )
                ],
                description="Seconds since the guest last updated its balloon statistics;"
                " the stale alert fires above 60 s",
            ).thresholds(thresholds((None, "green"), (60, "red")))
        )
        .with_panel(
            _with_targets(
                table.Panel()
                .title("VMs")
                .description("Current state per VM")
                .datasource(DS)
                .span(24)
                .height(8)
                .with_transformation(DataTransformerConfig(id_val="merge", options={}))
                .with_transformation(
                    DataTransformerConfig(
                        id_val="organize",
                        options={
                            "excludeByName": {"Time": True, "job": True},
                            "renameByName": {
                                "Value #A": "session up",
                                "Value #B": "running",
                                "Value #C": "stats age (s)",
                                "Value #D": "free page reporting",
                                "Value #E": "RAM",
                            },
                        },
                    )
                ),
                [
                    _table(f"qemu_vm_up{{{HOSTS}}}"),
                    _table(f"qemu_vm_running{{{HOSTS}}}"),
                    _table(f"time() - {STATS_TIME}{{{HOSTS}}}"),
                    _table(f"qemu_balloon_free_page_reporting_enabled{{{HOSTS}}}"),
                    _table(f"qemu_vm_memory_bytes{{{HOSTS}}}"),
                ],
            )
        )
        .with_row(dashboard.Row("reclaimd"))
        .with_panel(
            series(
                "QMP commands",
                OPS,
                [
                    q(
                        f"sum by (outcome) (rate(reclaimd_qmp_commands_total{{{HOSTS}}}"
                        f"[$__rate_interval]))",
                        "{{outcome}}",
                    )
                ],
                description="QMP commands per second across the selected hosts, by outcome",
                span=8,
            )
        )
        .with_panel(
            series(
                "QMP latency (p99)",
                SECONDS,
                [
                    q(
                        "histogram_quantile(0.99, sum by (le, command) (rate("
                        f"reclaimd_qmp_command_duration_seconds_bucket{{{HOSTS}}}"
                        "[$__rate_interval])))",
                        "{{command}}",
                    )
                ],
                description="99th percentile round trip per QMP command",
                span=8,
            )
        )
        .with_panel(
            series(
                "Residency scan (p99) and QMP reconnects",
                SECONDS,
                [
                    q(
                        "histogram_quantile(0.99, sum by (le, instance) (rate("
                        f"reclaimd_residency_scan_seconds_bucket{{{HOSTS}}}[$__rate_interval])))",
                        "scan p99 {{instance}}",
                    ),
                    # Counters per VM appear at the first reconnect; a host without one shows 0.
                    q(
                        f"sum by (instance) (increase(reclaimd_qmp_reconnects_total{{{HOSTS}}}"
                        f"[$__rate_interval]))"
                        f" or sum by (instance) (0 * reclaimd_build_info{{{HOSTS}}})",
                        "reconnects {{instance}}",
                    ),
                ],
                description="Duration of one residency scan of a VM's guest RAM; reconnects"
                " (right axis) are QMP sessions re-established after a loss",
                span=8,
            ).override_by_regexp(
                "^reconnects.*",
                [
                    {"id": "unit", "value": NONE},  # type: ignore[list-item]
                    {"id": "custom.axisPlacement", "value": "right"},  # type: ignore[list-item]
                ],
            )
        )
    )
    return board


def _table(expr: str) -> prometheus.Dataquery:
    return q(expr, instant=True).format(PromQueryFormat.TABLE)


def _estimate_queries(*, instant: bool) -> list[prometheus.Dataquery]:
    """The estimate's families as one series per part, legend ``part``: returned, free resident
    by part, caches and the total. One query, so the panel has data once any part is known
    (the split of free memory may take a while on a guest without its agent)."""
    expr = " or ".join(
        (
            f"qemu_returned_bytes{{{ONE_VM}}}",
            f"qemu_guest_free_resident_parts_bytes{{{ONE_VM}}}",
            _as_part(f"qemu_guest_reclaimable_cache_bytes{{{ONE_VM}}}", "cache"),
            _as_part(f"qemu_reclaimable_bytes{{{ONE_VM}}}", "reclaimable"),
        )
    )
    return [q(expr, "{{part}}", instant=instant)]


def _as_part(expr: str, part: str) -> str:
    """``expr`` with a ``part`` label, to stand beside the families that have one."""
    return f'label_replace({expr}, "part", "{part}", "", "")'


def vm() -> dashboard.Dashboard:
    """Per-VM drill-down: the estimate's parts, the balloon, the guest's view, the host's view."""
    board = _base(
        "reclaimd / VM",
        "reclaimd-vm",
        "One VM: the reclaim estimate and its inputs, the balloon, guest statistics and the"
        " host's residency view; QEMU events are annotations",
        with_vm=True,
    )
    board = (
        board.annotation(
            dashboard.AnnotationQuery()
            .name("QEMU events")
            .datasource(DS)
            .enable(True)
            .icon_color("purple")
            # changes() misses an event type's first event (its series starts then), so a
            # series that did not exist one interval earlier counts as an event too.
            .expr(
                f"sum by (event) (changes(qemu_events_total{{{ONE_VM}}}[$__interval]) > 0"
                f" or (qemu_events_total{{{ONE_VM}}}"
                f" unless qemu_events_total{{{ONE_VM}}} offset $__interval))"
            )
        )
        .with_row(dashboard.Row("Now"))
        .with_panel(
            single(
                "QMP session",
                NONE,
                q(f"qemu_vm_up{{{ONE_VM}}}", instant=True),
                description="up while reclaimd holds or polls a working QMP session",
                mappings=UP_DOWN,
                span=3,
            )
        )
        .with_panel(
            single(
                "RAM",
                BYTES,
                q(f"qemu_vm_memory_bytes{{{ONE_VM}}}", instant=True),
                description="Base plus hot-plugged memory (query-memory-size-summary)",
                span=3,
            )
        )
        .with_panel(
            single(
                "Host resident",
                BYTES,
                q(f"qemu_host_resident_bytes{{{ONE_VM}}}", instant=True),
                description="Guest RAM the host still backs, from the residency scan",
                span=3,
            )
        )
        .with_panel(
            single(
                "Still reclaimable",
                BYTES,
                q(f"qemu_reclaimable_bytes{{{ONE_VM}}}", instant=True),
                description="What the host could still get back without pushing the guest"
                " below the safety margin",
                span=3,
                steps=((None, "orange"),),
            )
        )
        .with_panel(
            single(
                "Free page reporting",
                NONE,
                q(f"qemu_balloon_free_page_reporting_enabled{{{ONE_VM}}}", instant=True),
                description="virtio-balloon free-page-reporting property",
                mappings=ON_OFF,
                span=3,
            )
        )
        .with_panel(
            single(
                "Reporting effective",
                NONE,
                q(f"qemu_free_page_reporting_effective{{{ONE_VM}}}", instant=True),
                description="Whether reported pages actually leave host memory (QEMU discards"
                " nothing under VFIO, postcopy or guest page poisoning)",
                mappings=EFFECTIVE,
                span=3,
            )
        )
        .with_panel(
            single(
                "Deflate on OOM",
                NONE,
                q(f"qemu_balloon_deflate_on_oom_enabled{{{ONE_VM}}}", instant=True),
                description="Whether the guest may take balloon pages back under memory pressure",
                mappings=ON_OFF,
                span=3,
            )
        )
        .with_panel(
            single(
                "Guest stats age",
                SECONDS,
                q(
                    f"time() - {STATS_TIME}{{{ONE_VM}}}",
                    instant=True,
                ),
                description="Seconds since the guest last updated its balloon statistics",
                span=3,
                steps=((None, "green"), (60, "red")),
            )
        )
        .with_row(dashboard.Row("Reclaim estimate"))
        .with_panel(
            _with_targets(
                bargauge.Panel()
                .title("Estimate breakdown")
                .description(
                    "ballooned and reported are already back on the host; reportable and"
                    " stranded split free_resident by the reporting order; cache is what a"
                    " balloon would squeeze out; reclaimable is the total with the margin"
                )
                .datasource(DS)
                .unit(BYTES)
                .span(8)
                .height(9)
                .display_mode(BarGaugeDisplayMode.GRADIENT)
                .orientation(VizOrientation.HORIZONTAL),
                _estimate_queries(instant=True),
            )
        )
        .with_panel(
            series(
                "Estimate over time",
                BYTES,
                _estimate_queries(instant=False),
                description="Each part of the estimate (reportable and stranded are the parts"
                " of free resident memory; reclaimable is the total, less the margin)",
                span=16,
                height=9,
            )
        )
        .with_row(dashboard.Row("Balloon and guest"))
        .with_panel(
            series(
                "Balloon: actual vs target",
                BYTES,
                [
                    q(f"qemu_balloon_actual_bytes{{{ONE_VM}}}", "actual"),
                    q(f"qemu_balloon_target_bytes{{{ONE_VM}}}", "target (set through reclaimd)"),
                    q(f"qemu_vm_memory_bytes{{{ONE_VM}}}", "RAM"),
                ],
                description="Memory the guest has with the balloon as it is (actual) and the"
                " target last set through reclaimd; QEMU has no query for a target set"
                " elsewhere",
            )
        )
        .with_panel(
            series(
                "Guest memory",
                BYTES,
                [
                    q(f"qemu_guest_memory_total_bytes{{{ONE_VM}}}", "total"),
                    q(f"qemu_guest_memory_available_bytes{{{ONE_VM}}}", "available"),
                    q(f"qemu_guest_memory_free_bytes{{{ONE_VM}}}", "free"),
                    q(f"qemu_guest_disk_caches_bytes{{{ONE_VM}}}", "disk caches"),
                ],
                description="As the guest's balloon driver reports it (untrusted input)",
            )
        )
        .with_panel(
            series(
                "Guest paging",
                BYTES_PER_S,
                [
                    q(
                        f"rate(qemu_guest_swap_in_bytes_total{{{ONE_VM}}}[$__rate_interval])",
                        "swap in",
                    ),
                    q(
                        f"rate(qemu_guest_swap_out_bytes_total{{{ONE_VM}}}[$__rate_interval])",
                        "swap out",
                    ),
                    q(
                        f"rate(qemu_guest_major_faults_total{{{ONE_VM}}}[$__rate_interval])",
                        "major faults/s",
                    ),
                ],
                description="A ballooned guest that starts swapping or faulting has been"
                " squeezed too far",
            ).override_by_regexp(
                "^major faults.*",
                [
                    {"id": "unit", "value": OPS},  # type: ignore[list-item]
                    {"id": "custom.axisPlacement", "value": "right"},  # type: ignore[list-item]
                ],
            )
        )
        .with_panel(
            series(
                "QEMU events",
                NONE,
                [
                    q(
                        f"sum by (event) (increase(qemu_events_total{{{ONE_VM}}}"
                        f"[$__rate_interval]))",
                        "{{event}}",
                    )
                ],
                description="QMP events received, per type",
            )
        )
        .with_row(dashboard.Row("Host view"))
        .with_panel(
            series(
                "Host resident vs RAM",
                BYTES,
                [
                    q(f"qemu_host_resident_bytes{{{ONE_VM}}}", "host resident"),
                    q(f"qemu_reported_absent_bytes{{{ONE_VM}}}", "reported, still absent"),
                    q(f"qemu_vm_memory_bytes{{{ONE_VM}}}", "RAM"),
                ],
                description="Guest RAM the host backs, and reported ranges the guest has not"
                " touched again",
            )
        )
        .with_panel(
            series(
                "Reported and refaulted",
                BYTES_PER_S,
                [
                    q(
                        f"rate(qemu_reported_bytes_total{{{ONE_VM}}}[$__rate_interval])",
                        "reported",
                    ),
                    q(
                        f"rate(qemu_refaulted_bytes_total{{{ONE_VM}}}[$__rate_interval])",
                        "refaulted",
                    ),
                ],
                description="Bytes per second discarded by free page reporting, and bytes"
                " brought back by the guest touching them again",
            )
        )
    )
    return board


def _prometheus_annotation_fields(model: dict[str, Any]) -> None:
    """Add the Prometheus annotation fields the SDK's AnnotationQuery type does not carry."""
    for annotation in model.get("annotations", {}).get("list", []):
        if "expr" in annotation:
            annotation.update(
                {"titleFormat": "{{event}}", "tagKeys": "event", "useValueForTime": False}
            )


def _number_panels(model: dict[str, Any]) -> None:
    """Give every panel a stable id, in layout order (the SDK leaves them 0)."""
    for number, panel in enumerate(model["panels"], start=1):
        panel["id"] = number


def render(board: dashboard.Dashboard) -> str:
    model: dict[str, Any] = json.loads(json.dumps(board.build(), cls=JSONEncoder))
    _prometheus_annotation_fields(model)
    _number_panels(model)
    return json.dumps(model, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def build_all() -> dict[str, str]:
    """File name -> dashboard JSON, for every dashboard."""
    return {"reclaimd-fleet.json": render(fleet()), "reclaimd-vm.json": render(vm())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if committed JSON is stale")
    args = parser.parse_args(argv)
    stale = []
    for name, text in build_all().items():
        path = OUT_DIR / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"stale: {', '.join(stale)}; run python {Path(__file__).name}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
