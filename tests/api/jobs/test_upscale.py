"""The jobs API's upscale task: an image through an upscaler (built-in or a model file), queued and
answered like any job, never sharing a denoising step."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.api.jobs.test_routes import finished
from tests.conftest import ClientFactory, png_b64, scene
from tests.support.upscalers import make_tiny_upscaler


@pytest.fixture(scope="module")
def client(make_module_client: ClientFactory, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    folder = tmp_path_factory.mktemp("upscalers")
    make_tiny_upscaler(folder / "tiny-x2.safetensors", scale=2)
    return make_module_client(model=str(tiny_model), upscalers_dir=str(folder))


@pytest.mark.parametrize(("fields", "size"), [({"upscaler": "tiny-x2"}, (128, 128)), ({"width": 96}, (96, 96))])
def test_an_upscale_job_returns_the_image_at_its_new_size(
    client: TestClient, fields: dict[str, object], size: tuple[int, int]
) -> None:
    created = client.post("/v1/jobs", json={"task": "upscale", "init_image": png_b64(scene()), **fields})
    assert created.status_code == 202, created.text
    job = finished(client, created.json()["id"])
    assert job["status"] == "succeeded", job
    assert job["progress"]["step"] == job["progress"]["total"] == 1
    png = client.get(f"/v1/jobs/{job['id']}/images/0")
    assert png.status_code == 200
    assert Image.open(io.BytesIO(png.content)).size == size


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"upscaler": "nope"}, "upscaler"),
        ({"upscale_by": 8, "width": None}, "upscale_by"),
        ({"num_images": 2}, "num_images"),
        ({"init_image": None}, "init_image"),
    ],
)
def test_a_bad_upscale_is_refused_by_field(client: TestClient, fields: dict[str, object], named: str) -> None:
    body = {"task": "upscale", "init_image": png_b64(scene(1024)), **fields}
    response = client.post("/v1/jobs", json={key: value for key, value in body.items() if value is not None})
    assert response.status_code in (400, 422), response.text
    assert named in response.text


def test_other_tasks_still_need_a_prompt(client: TestClient) -> None:
    response = client.post("/v1/jobs", json={"task": "txt2img"})
    assert response.status_code in (400, 422) and "prompt" in response.text
