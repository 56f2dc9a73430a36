"""Access: API keys on every route, HTTP Basic for A1111 clients, the open original API, CORS."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from sdserver.api.security import ALWAYS_OPEN, PUBLIC_PAGES, PUBLIC_PREFIXES
from tests.conftest import SIZE, STEPS, ClientFactory

KEY = "s3cret-key"
TXT2IMG = {"prompt": "x", "width": SIZE, "height": SIZE, "num_inference_steps": STEPS}


def every_route(client: TestClient) -> list[tuple[str, str]]:
    """(method, concrete path) for every route of the app, path parameters filled in."""
    routes = []
    for template, operations in client.app.openapi()["paths"].items():  # type: ignore[attr-defined]
        path = re.sub(r"\{[^}]+\}", "x", template)
        routes += [(method.upper(), path) for method in operations]
    for path in ("/docs", "/redoc", "/openapi.json", "/", "/studio/studio.js", "/static-offline-docs/swagger-ui.css"):
        routes.append(("GET", path))
    return routes


@pytest.fixture
def keyed(make_client: ClientFactory, tiny_model: Path) -> TestClient:
    return make_client(model=str(tiny_model), api_keys=[KEY, "second-key"], api_auth=["user:pa55"])


def test_every_route_but_health_needs_a_key(keyed: TestClient) -> None:
    routes = every_route(keyed)
    assert len(routes) > 10
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic " + "x" * 8}):
            response = keyed.request(method, path, headers=headers)
            if path in ALWAYS_OPEN or path in PUBLIC_PAGES or path.startswith(PUBLIC_PREFIXES):  # pages and their files
                assert response.status_code != 401, (method, path)
            else:
                assert response.status_code == 401, (method, path, headers, response.status_code)
                assert "Bearer" in response.headers["www-authenticate"]


def test_a_refused_request_runs_nothing(keyed: TestClient) -> None:
    assert keyed.post("/txt2img", data=TXT2IMG).status_code == 401
    assert keyed.post("/v1/jobs", json={"prompt": "x"}).status_code == 401
    assert keyed.app.state.scheduler.jobs.all() == []  # type: ignore[attr-defined]


def test_a_right_key_gets_in(keyed: TestClient) -> None:
    for key in (KEY, "second-key"):
        response = keyed.post("/txt2img", data=TXT2IMG, headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 200, response.text


def test_basic_credentials_for_a1111_clients(keyed: TestClient) -> None:
    good = base64.b64encode(b"user:pa55").decode()
    bad = base64.b64encode(b"user:nope").decode()
    assert keyed.get("/v1/queue", headers={"Authorization": f"Basic {good}"}).status_code == 200
    assert keyed.get("/v1/queue", headers={"Authorization": f"Basic {bad}"}).status_code == 401


def test_failure_body_is_in_the_dialect_of_the_route(keyed: TestClient) -> None:
    original = keyed.post("/txt2img", data=TXT2IMG).json()
    assert original == {"status": "failure", "message": "authorization: missing API key"}
    assert keyed.get("/v1/queue").json()["error"]["type"] == "Unauthorized"


def test_health_and_ping_stay_open(keyed: TestClient) -> None:
    for path in ALWAYS_OPEN:
        assert keyed.get(path).status_code == 200


def test_open_original_api_keeps_only_the_original_routes_open(make_client: ClientFactory, tiny_model: Path) -> None:
    client = make_client(model=str(tiny_model), api_keys=[KEY], open_original_api=True)
    assert client.post("/txt2img", data=TXT2IMG).status_code == 200
    assert client.get("/custom_models").status_code == 200
    assert client.post("/custom/nope", data=TXT2IMG).status_code == 404
    assert client.get("/v1/queue").status_code == 401
    assert client.get("/metrics").status_code == 401


def test_no_keys_means_open(client: TestClient) -> None:
    assert client.get("/v1/queue").status_code == 200


class TestCors:
    def test_off_by_default(self, client: TestClient) -> None:
        response = client.get("/ping", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in response.headers

    def test_allowlisted_origin_only(self, make_client: ClientFactory, tiny_model: Path) -> None:
        client = make_client(model=str(tiny_model), cors_origins=["http://photoshop.local"])
        allowed = client.get("/ping", headers={"Origin": "http://photoshop.local"})
        assert allowed.headers["access-control-allow-origin"] == "http://photoshop.local"
        other = client.get("/ping", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        preflight = client.options(
            "/txt2img",
            headers={"Origin": "http://photoshop.local", "Access-Control-Request-Method": "POST"},
        )
        assert preflight.status_code == 200
