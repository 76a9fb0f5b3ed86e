"""Every error is an RFC 9457 problem details body that matches the OpenAPI document: each
status the API answers with (401, 403, 404, 409, 413, 422, 500) is produced for real and its
body validated against the schema the operation declares for it."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jsonschema
import pytest
from fastapi import FastAPI
from pydantic import SecretStr

from api.app import create_app
from api.limits import MAX_BODY_BYTES
from api.problems import PROBLEM_JSON, readable
from daemon.config import Address, Settings
from daemon.service import Reclaimd
from tests.api.test_api import TOKEN, attach
from tests.qmp.fake_qmp import Behaviour
from tests.qmp.test_session import eventually

MiB = 1 << 20
AUTH = {"Authorization": f"Bearer {TOKEN}"}
OPERATION_IDS = {
    ("get", "/healthz"): "getHealth",
    ("get", "/readyz"): "getReadiness",
    ("get", "/metrics"): "getMetrics",
    ("get", "/api/v1/vms"): "listVMs",
    ("get", "/api/v1/vms/{name}"): "getVM",
    ("get", "/api/v1/vms/{name}/events"): "listVMEvents",
    ("get", "/api/v1/vms/{name}/reported-ranges"): "listReportedRanges",
    ("get", "/api/v1/vms/{name}/estimate"): "getEstimate",
    ("get", "/api/v1/vms/{name}/advice"): "getAdvice",
    ("post", "/api/v1/vms/{name}/balloon"): "setBalloon",
}


class Documented:
    """Checks replies against the app's own OpenAPI document."""

    def __init__(self, app: FastAPI) -> None:
        self.doc = app.openapi()

    def operation(self, method: str, path: str) -> dict[str, Any]:
        for template, operations in self.doc["paths"].items():
            pattern = "^" + re.sub(r"\{[^/]+\}", "[^/]+", template) + "$"
            if re.match(pattern, path) and method in operations:
                found: dict[str, Any] = operations[method]
                return found
        raise AssertionError(f"{method} {path} is not in the document")

    def check(self, reply: httpx.Response, status: int) -> dict[str, Any]:
        """Assert ``reply`` has ``status`` and the problem body its operation declares."""
        request = reply.request
        assert reply.status_code == status, (request.url, reply.status_code, reply.text)
        declared = self.operation(request.method.lower(), request.url.path)["responses"]
        assert str(status) in declared, f"{request.url.path}: {status} not declared"
        content = declared[str(status)]["content"]
        assert list(content) == [PROBLEM_JSON]
        assert reply.headers["content-type"] == PROBLEM_JSON
        schema = {**content[PROBLEM_JSON]["schema"], "components": self.doc["components"]}
        body: dict[str, Any] = reply.json()
        jsonschema.validate(body, schema, cls=jsonschema.Draft202012Validator)
        assert body["status"] == status and body["instance"] == readable(request.url.path)
        return body


@pytest.fixture
async def daemon(settings: Settings) -> AsyncIterator[Reclaimd]:
    d = Reclaimd(settings.model_copy(update={"token": SecretStr(TOKEN)}))
    await d.start()
    yield d
    await d.stop()


@pytest.fixture
def app(daemon: Reclaimd) -> FastAPI:
    return create_app(daemon.settings, daemon)


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        yield c


def test_every_operation_has_its_id_and_declares_its_errors_as_problems(app: FastAPI) -> None:
    doc = app.openapi()
    found = {
        (method, path): operation["operationId"]
        for path, operations in doc["paths"].items()
        for method, operation in operations.items()
    }
    assert found == OPERATION_IDS
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert {"413", "500"} <= set(responses), (method, path)
            for status, response in responses.items():
                if int(status) >= 400:
                    assert list(response["content"]) == [PROBLEM_JSON], (method, path, status)
    assert "HTTPValidationError" not in doc["components"]["schemas"]


async def test_401_403_404(client: httpx.AsyncClient, app: FastAPI, settings: Settings) -> None:
    documented = Documented(app)
    balloon = "/api/v1/vms/vm1/balloon"
    unauthorized = await client.post(balloon, json={"target_bytes": MiB})
    documented.check(unauthorized, 401)
    assert unauthorized.headers["www-authenticate"] == "Bearer"
    for path in ("", "/events", "/estimate", "/reported-ranges"):
        body = documented.check(await client.get(f"/api/v1/vms/nope{path}"), 404)
        assert body["detail"] == "no VM named 'nope'"
    documented.check(await client.post(balloon, json={"target_bytes": MiB}, headers=AUTH), 404)
    # A name of 10,000 characters is echoed bounded.
    body = documented.check(await client.get("/api/v1/vms/" + "n" * 10_000), 404)
    assert len(body["detail"]) < 200

    no_token = Reclaimd(settings.model_copy(update={"journal": settings.journal.with_suffix(".2")}))
    await no_token.start()
    try:
        transport = httpx.ASGITransport(app=create_app(settings, no_token))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as other:
            forbidden = await other.post(balloon, json={"target_bytes": MiB}, headers=AUTH)
        body = documented.check(forbidden, 403)
        assert "disabled" in body["detail"]
    finally:
        await no_token.stop()


async def test_409_when_the_vm_cannot_take_a_balloon_change(
    client: httpx.AsyncClient, app: FastAPI, daemon: Reclaimd, fake_qmp: Any
) -> None:
    server = await fake_qmp(behaviour=Behaviour(lacks=frozenset({"qom-list"})))
    vm = daemon.add_vm("vm1", Address("unix", path=str(server.path)))
    await eventually(lambda: vm.up and vm.memory.ram_bytes is not None and vm.last_poll)
    assert not vm.balloon.present
    reply = await client.post("/api/v1/vms/vm1/balloon", json={"target_bytes": MiB}, headers=AUTH)
    body = Documented(app).check(reply, 409)
    assert "balloon" in body["detail"]
    assert "balloon" not in server.commands


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/events", {"before_id": 2**63}),  # beyond SQLite's int64
        ("/events", {"before_id": 10**30}),
        ("/events", {"before_id": 0}),
        ("/events", {"before_id": "x"}),
        ("/events", {"limit": 0}),
        ("/events", {"limit": 10**6}),
        ("/events", {"since": "nan"}),
        ("/events", {"since": "inf"}),
        ("/events", {"since": "1e400"}),
        ("/events", {"since": -1}),
        ("/reported-ranges", {"since": "nan"}),
        ("/reported-ranges", {"limit": 0}),
        ("/estimate", {"order": 11}),
        ("/estimate", {"order": 2**64}),
    ],
)
async def test_422_for_queries_out_of_range(
    client: httpx.AsyncClient,
    app: FastAPI,
    daemon: Reclaimd,
    fake_qmp: Any,
    path: str,
    params: dict[str, Any],
) -> None:
    await attach(daemon, await fake_qmp())
    body = Documented(app).check(await client.get(f"/api/v1/vms/vm1{path}", params=params), 422)
    assert body["errors"] and body["errors"][0]["loc"][0] == "query"


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        (b'{"target_bytes": true}', "application/json"),
        (b'{"target_bytes": 1.5}', "application/json"),
        (b'{"target_bytes": 268435456.0}', "application/json"),
        (b'{"target_bytes": "268435456"}', "application/json"),
        (b'{"target_bytes": 0}', "application/json"),
        (b'{"target_bytes": -1}', "application/json"),
        (b'{"target_bytes": 1e400}', "application/json"),
        (b'{"target_bytes": 99999999999999999999999}', "application/json"),
        (b'{"target_bytes": 268435456, "extra": 1}', "application/json"),
        (b'{"target": 268435456}', "application/json"),
        (b"[268435456]", "application/json"),
        (b'{"target_bytes": 2684', "application/json"),
        (b"", "application/json"),
        (b'{"target_bytes": 268435456}', "text/plain"),
        (b'{"target_bytes": 268435456}', ""),
    ],
)
async def test_422_for_balloon_bodies_that_are_not_a_target(
    client: httpx.AsyncClient,
    app: FastAPI,
    daemon: Reclaimd,
    fake_qmp: Any,
    content: bytes,
    content_type: str,
) -> None:
    server = await fake_qmp()
    await attach(daemon, server)
    headers = {**AUTH, "Content-Type": content_type}
    reply = await client.post("/api/v1/vms/vm1/balloon", content=content, headers=headers)
    body = Documented(app).check(reply, 422)
    assert body["errors"] and body["errors"][0]["loc"][0] == "body"
    assert "balloon" not in server.commands


async def test_422_for_a_target_beyond_the_vms_ram(
    client: httpx.AsyncClient, app: FastAPI, daemon: Reclaimd, fake_qmp: Any
) -> None:
    await attach(daemon, await fake_qmp())
    reply = await client.post(
        "/api/v1/vms/vm1/balloon", json={"target_bytes": 4096 * MiB}, headers=AUTH
    )
    body = Documented(app).check(reply, 422)
    assert "exceeds" in body["detail"]


async def test_413_for_a_body_over_the_limit_on_any_route(
    client: httpx.AsyncClient, app: FastAPI
) -> None:
    documented = Documented(app)
    big = b"x" * (MAX_BODY_BYTES + 1)
    # Refused before the token is checked, and before any route runs: nothing of it is read.
    documented.check(await client.post("/api/v1/vms/vm1/balloon", content=big), 413)
    documented.check(await client.request("GET", "/api/v1/vms", content=big), 413)
    documented.check(await client.request("GET", "/metrics", content=big), 413)


async def test_500_is_a_problem_that_tells_nothing_of_the_bug(app: FastAPI) -> None:
    async def broken() -> None:
        raise RuntimeError("secret internals")

    app.add_api_route("/api/v1/vms", broken, methods=["PUT"])
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        reply = await client.put("/api/v1/vms")
    assert reply.status_code == 500
    assert reply.headers["content-type"] == PROBLEM_JSON
    doc = app.openapi()
    schema = {"$ref": "#/components/schemas/Problem", "components": doc["components"]}
    jsonschema.validate(reply.json(), schema, cls=jsonschema.Draft202012Validator)
    assert "secret" not in reply.text
