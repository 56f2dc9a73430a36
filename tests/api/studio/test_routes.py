"""Serving the studio and the API docs: from files inside the package, open without a key, nothing
fetched from anywhere else."""

from __future__ import annotations

import re
from pathlib import Path

from fastapi.testclient import TestClient

from tests.conftest import ClientFactory

EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", re.IGNORECASE)


def local_references(html: str) -> list[str]:
    return re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html)


def test_the_studio_page_and_its_files_come_from_the_package(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]  # the browser refuses anything else
    assert not EXTERNAL.search(page.text)
    references = local_references(page.text)
    assert {"/studio/studio.css", "/studio/studio.js", "/studio/icon.svg"} <= set(references)
    for path in references:
        if path.startswith("/studio/"):
            assert client.get(path).status_code == 200, path
    for module in ("api.js", "mask.js"):
        script = client.get(f"/studio/{module}")
        assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert client.get("/studio/nope.js").status_code == 404


def test_the_api_docs_load_swagger_ui_and_redoc_from_this_server(client: TestClient) -> None:
    for path in ("/docs", "/redoc"):
        response = client.get(path)
        html = response.text
        assert not EXTERNAL.search(html), path
        assert "default-src 'self'" in response.headers["content-security-policy"], path
        assets = [ref for ref in local_references(html) if ref.endswith((".js", ".css"))]
        assert assets, path
        for asset in assets:
            response = client.get(asset)
            assert response.status_code == 200 and len(response.content) > 10_000, asset


def test_with_keys_the_pages_are_open_and_the_api_is_not(make_client: ClientFactory, tiny_model: Path) -> None:
    client = make_client(model=str(tiny_model), api_keys=["k"])
    for path in ("/", "/studio/studio.js", "/docs", "/redoc", "/openapi.json", "/static-offline-docs/swagger-ui.css"):
        assert client.get(path).status_code == 200, path
    for path in ("/models", "/v1/history", "/v1/queue"):
        assert client.get(path).status_code == 401, path
    schema = client.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    assert schema["security"] == [{"bearer": []}]  # so /docs offers "Authorize"
