"""One paging style: a cursor from the last page (``next_...``) for the VM list, events and
reported ranges; every item once, in order, and the last page says so."""

from __future__ import annotations

from typing import Any

import httpx

from api.app import create_app
from daemon.config import Settings
from daemon.ledger.ranges import RangeHistory, ReportedRange
from daemon.service import Reclaimd
from tests.api.test_metrics_golden import known_fleet


def client_of(settings: Settings, daemon: Reclaimd) -> httpx.AsyncClient:
    app = create_app(settings, daemon)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


async def pages(
    client: httpx.AsyncClient, path: str, items: str, cursor: str, next_key: str, limit: int
) -> list[list[Any]]:
    out: list[list[Any]] = []
    params: dict[str, Any] = {"limit": limit}
    while True:
        body = (await client.get(path, params=params)).json()
        out.append(body[items])
        if body[next_key] is None:
            return out
        params[cursor] = body[next_key]


async def test_the_vm_list_pages_by_name(settings: Settings) -> None:
    daemon = Reclaimd(settings)
    daemon.fleet = known_fleet()
    for i in range(5):
        daemon.fleet.add(f"vm{i}", f"unix:/run/{i}.qmp", "connect")
    async with client_of(settings, daemon) as client:
        got = await pages(client, "/api/v1/vms", "vms", "after", "next_after", 3)
        whole = (await client.get("/api/v1/vms")).json()
    names = [[vm["name"] for vm in page] for page in got]
    assert names == [["db1", "vm0", "vm1"], ["vm2", "vm3", "vm4"], ["web1"]]
    assert whole["next_after"] is None and len(whole["vms"]) == 7


async def test_reported_ranges_page_newest_first_by_id(settings: Settings) -> None:
    daemon = Reclaimd(settings)
    daemon.fleet = known_fleet()
    web = daemon.fleet.get("web1")
    assert web is not None
    web.ranges = RangeHistory(maxlen=5)  # keeps the newest 5 of the 7 seen
    web.ranges.extend(
        [ReportedRange(float(i), "pc.ram", i << 21, 2 << 20, 9, None, 2 << 20) for i in range(7)]
    )
    async with client_of(settings, daemon) as client:
        path = "/api/v1/vms/web1/reported-ranges"
        got = await pages(client, path, "ranges", "before_id", "next_before_id", 2)
        recent = (await client.get(path, params={"since": 4.5})).json()
    ids = [[r["id"] for r in page] for page in got]
    assert ids == [[7, 6], [5, 4], [3]]  # 1 and 2 are no longer kept
    assert [r["offset"] for page in got for r in page] == [i << 21 for i in (6, 5, 4, 3, 2)]
    assert [r["id"] for r in recent["ranges"]] == [7, 6] and recent["total"] == 7
