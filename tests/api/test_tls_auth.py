"""TLS and read authentication from the web config, on a real uvicorn server with certificates
made in the test: every route but the health probe needs a configured user (bcrypt) or the
bearer token, and balloon changes still need the token."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import bcrypt
import httpx
import pytest
from pydantic import SecretStr

import api.readauth
from api.app import create_app
from api.webconfig import WebConfig, parse_web_config
from daemon.config import Settings
from daemon.service import Reclaimd
from tests.api.certs import Certs, make_certs
from tests.api.live import live_server
from tests.api.test_api import TOKEN, attach

MiB = 1 << 20
USER, PASSWORD = "prometheus", "scrape-secret-0123"
# Cost 4, bcrypt's least: the tests check behaviour, not bcrypt's cost.
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()
READ_PATHS = ("/api/v1/vms", "/api/v1/vms/vm1", "/metrics", "/openapi.json", "/docs")


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return make_certs(tmp_path)


def web_config(certs: Certs, **tls: str) -> WebConfig:
    raw: dict[str, Any] = {
        "tls_server_config": {"cert_file": "server.crt", "key_file": "server.key", **tls},
        "basic_auth_users": {USER: HASH},
    }
    return parse_web_config(raw, base=certs.ca.parent)


@pytest.fixture
async def daemon(settings: Settings) -> AsyncIterator[Reclaimd]:
    d = Reclaimd(settings.model_copy(update={"token": SecretStr(TOKEN)}))
    await d.start()
    yield d
    await d.stop()


def client_context(certs: Certs, *, client_cert: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=certs.ca)
    if client_cert:
        context.load_cert_chain(certs.client_cert, certs.client_key)
    return context


async def test_tls_with_basic_auth_on_every_route_but_the_probe(
    daemon: Reclaimd, certs: Certs, fake_qmp: Any
) -> None:
    await attach(daemon, await fake_qmp())
    async with live_server(daemon.settings, daemon, web_config(certs)) as url:
        assert url.startswith("https://")
        async with httpx.AsyncClient(base_url=url, verify=client_context(certs)) as client:
            assert (await client.get("/healthz")).status_code == 200
            for path in READ_PATHS:
                refused = await client.get(path)
                assert refused.status_code == 401, path
                assert refused.headers["www-authenticate"].startswith('Basic realm="reclaimd"')
                assert refused.headers["content-type"] == "application/problem+json"
                assert refused.json()["instance"] == path
                wrong = await client.get(path, auth=(USER, "wrong-password"))
                assert wrong.status_code == 401, path
                stranger = await client.get(path, auth=("mallory", PASSWORD))
                assert stranger.status_code == 401, path
                assert (await client.get(path, auth=(USER, PASSWORD))).status_code == 200, path
                # The token that may change VMs may read them.
                bearer = {"Authorization": f"Bearer {TOKEN}"}
                assert (await client.get(path, headers=bearer)).status_code == 200, path

            balloon = "/api/v1/vms/vm1/balloon"
            body = {"target_bytes": 256 * MiB}
            basic_only = await client.post(balloon, json=body, auth=(USER, PASSWORD))
            assert basic_only.status_code == 401 and "bearer" in basic_only.json()["detail"]
            changed = await client.post(
                balloon, json=body, headers={"Authorization": f"Bearer {TOKEN}"}
            )
            assert changed.status_code == 202, changed.text

            doc = (await client.get("/openapi.json", auth=(USER, PASSWORD))).json()
        assert doc["components"]["securitySchemes"]["basicAuth"] == {
            "type": "http",
            "scheme": "basic",
        }
        vms = doc["paths"]["/api/v1/vms"]["get"]
        assert vms["security"] == [{"basicAuth": []}, {"HTTPBearer": []}]
        assert "401" in vms["responses"]
        assert "401" not in doc["paths"]["/healthz"]["get"]["responses"]
        assert "security" not in doc["paths"]["/healthz"]["get"]
        balloon_op = doc["paths"]["/api/v1/vms/{name}/balloon"]["post"]
        assert balloon_op["security"] == [{"HTTPBearer": []}]

        # Plain HTTP to the TLS port gets no answer.
        async with httpx.AsyncClient(base_url=url.replace("https", "http")) as plain:
            with pytest.raises(httpx.HTTPError):
                await plain.get("/healthz")
        # Nor does a client that does not trust the server's certificate.
        async with httpx.AsyncClient(base_url=url) as untrusting:
            with pytest.raises(httpx.ConnectError):
                await untrusting.get("/healthz")


async def test_client_certificates_when_required(daemon: Reclaimd, certs: Certs) -> None:
    web = web_config(certs, client_auth_type="RequireAndVerifyClientCert", client_ca_file="ca.crt")
    async with live_server(daemon.settings, daemon, web) as url:
        async with httpx.AsyncClient(base_url=url, verify=client_context(certs)) as anonymous:
            with pytest.raises(httpx.HTTPError):
                await anonymous.get("/healthz")
        context = client_context(certs, client_cert=True)
        async with httpx.AsyncClient(base_url=url, verify=context) as client:
            assert (await client.get("/healthz")).status_code == 200
            assert (await client.get("/api/v1/vms", auth=(USER, PASSWORD))).status_code == 200


async def test_min_version(daemon: Reclaimd, certs: Certs) -> None:
    async with live_server(daemon.settings, daemon, web_config(certs, min_version="TLS13")) as url:
        old = client_context(certs)
        old.maximum_version = ssl.TLSVersion.TLSv1_2
        async with httpx.AsyncClient(base_url=url, verify=old) as client:
            with pytest.raises(httpx.ConnectError):
                await client.get("/healthz")
        async with httpx.AsyncClient(base_url=url, verify=client_context(certs)) as client:
            reply = await client.get("/healthz")
            assert reply.status_code == 200
            assert reply.extensions["network_stream"].get_extra_info("ssl_object").version() == (
                "TLSv1.3"
            )


async def test_bcrypt_runs_once_per_credentials_and_for_unknown_users_too(
    daemon: Reclaimd, monkeypatch: pytest.MonkeyPatch
) -> None:
    checked: list[bytes] = []
    real = api.readauth._bcrypt_matches

    def counting(password: bytes, hashed: bytes) -> bool:
        checked.append(hashed)
        return real(password, hashed)

    monkeypatch.setattr(api.readauth, "_bcrypt_matches", counting)
    app = create_app(daemon.settings, daemon, WebConfig(users={USER: HASH.encode()}))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        for _ in range(5):
            assert (await client.get("/api/v1/vms", auth=(USER, PASSWORD))).status_code == 200
        assert checked == [HASH.encode()]
        for _ in range(3):
            assert (await client.get("/api/v1/vms", auth=("mallory", "x"))).status_code == 401
        # An unknown user costs a bcrypt like a known one (once, then cached), against a decoy
        # hash of the same cost.
        assert len(checked) == 2 and checked[1] != HASH.encode()
        assert checked[1].split(b"$")[2] == HASH.encode().split(b"$")[2]
        too_long = await client.get("/api/v1/vms", auth=(USER, "p" * 100))
        assert too_long.status_code == 401
        for header in ("Basic !!!", "Basic " + "x" * 7, "Digest abc", "Bearer wrong-token-000"):
            reply = await client.get("/api/v1/vms", headers={"Authorization": header})
            assert reply.status_code == 401, header
