"""The daemon's own instrumentation: counters and histograms of its work.

VM data is never kept here: it is built from the fleet at scrape time (``api.metrics``). These
instruments live in their own registry so tests and embedders get exactly the daemon's series.
"""

from __future__ import annotations

import asyncio

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)

# A `_created` series per counter and histogram only adds series; dashboards never read them.
disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped upstream

REGISTRY = CollectorRegistry(auto_describe=True)
# The process's own memory, CPU, open files (process_*) and the interpreter (python_*), as
# every client_python exporter has them, so operators can alert on reclaimd itself. The
# collectors are prometheus_client's own; they read /proc/self at scrape time, a few small files.
for _collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
    REGISTRY.register(_collector)

QMP_COMMANDS = Counter(
    "reclaimd_qmp_commands",
    "QMP commands issued, by command and outcome (ok, error, timeout, disconnected)",
    ["command", "outcome"],
    registry=REGISTRY,
)
QMP_COMMAND_SECONDS = Histogram(
    "reclaimd_qmp_command_duration_seconds",
    "Round-trip time of QMP commands",
    ["command"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
    registry=REGISTRY,
)
QMP_RECONNECTS = Counter(
    "reclaimd_qmp_reconnects",
    "Times a VM's QMP session was re-established after a loss",
    ["vm"],
    registry=REGISTRY,
)
QMP_EVENTS_DROPPED = Counter(
    "reclaimd_qmp_events_dropped",
    "QMP events of a VM dropped before they were recorded (event queue or journal saturated "
    "by a flood), counted as they are dropped",
    ["vm"],
    registry=REGISTRY,
)
LISTEN_REFUSED = Counter(
    "reclaimd_listen_refused",
    "Connections to the listen socket refused, by reason (peer_uid: not allowed to connect; "
    "identity: claimed an attached VM's identity; handshake: no valid QMP handshake)",
    ["reason"],
    registry=REGISTRY,
)
JOURNAL_ERRORS = Counter(
    "reclaimd_journal_errors",
    "Journal writes that failed (the entry is lost; the daemon goes on)",
    registry=REGISTRY,
)
RECLAIM_ACTIONS = Counter(
    "reclaimd_reclaim_actions",
    "Balloon changes the reclaim controller made (--reclaim act), by action (inflate, "
    "deflate) and reason (advice, pressure, near_margin, deflate_on_oom, failed)",
    ["action", "reason"],
    registry=REGISTRY,
)
RESIDENCY_SCAN_SECONDS = Histogram(
    "reclaimd_residency_scan_seconds",
    "Duration of one host residency scan of a VM's guest RAM",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
    registry=REGISTRY,
)
HTTP_CONNECTIONS = Gauge(
    "reclaimd_http_connections",
    "HTTP connections open to the API",
    registry=REGISTRY,
)
HTTP_CONNECTION_LIMIT = Gauge(
    "reclaimd_http_connection_limit",
    "HTTP connections the API keeps open at most (see docs/operations.md)",
    registry=REGISTRY,
)
HTTP_CONNECTIONS_CLOSED = Counter(
    "reclaimd_http_connections_closed",
    "HTTP connections the API closed to stay within its bounds, by reason "
    "(limit: the oldest idle one beyond the connection limit; read_timeout: no whole request "
    "in time)",
    ["reason"],
    registry=REGISTRY,
)


def _tasks() -> float:
    # A scrape runs on the daemon's event loop; anywhere else there is nothing to count.
    try:
        return float(len(asyncio.all_tasks()))
    except RuntimeError:
        return float("nan")


ASYNCIO_TASKS = Gauge(
    "reclaimd_asyncio_tasks",
    "Tasks on the daemon's event loop: steady for a steady fleet (growth is a leak)",
    registry=REGISTRY,
)
ASYNCIO_TASKS.set_function(_tasks)
