"""The /models routes on the real app: list, load, unload, refresh; and serving past the budget."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from sdserver.core.types import SAMPLER_NAMES
from sdserver.engine.tiny import make_tiny_model
from tests.conftest import SIZE, STEPS, ClientFactory, decode_png, wait_until


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("api_models_dir")
    make_tiny_model(root / "alpha", safety_checker=False, seed=30)
    make_tiny_model(root / "beta", inpainting=True, seed=31)
    (root / "broken").mkdir()
    (root / "broken" / "model_index.json").write_text("[1, 2")
    return root


@pytest.fixture
def client(make_client: ClientFactory, tiny_model: Path, models_dir: Path) -> TestClient:
    return make_client(model=str(tiny_model), models_dir=str(models_dir), max_loaded_models=2)


def listing(client: TestClient) -> dict[str, dict[str, object]]:
    response = client.get("/models")
    assert response.status_code == 200, response.text
    return {model["name"]: model for model in response.json()}


def generate(client: TestClient, model: str) -> None:
    job = client.post(
        "/v1/jobs", json={"prompt": "a cat", "model": model, "steps": STEPS, "width": SIZE, "height": SIZE}
    )
    assert job.status_code == 202, job.text
    url = f"/v1/jobs/{job.json()['id']}"
    wait_until(lambda: client.get(url).json()["status"] not in ("queued", "running"))
    done = client.get(url).json()
    assert done["status"] == "succeeded", done
    assert decode_png(done["images"][0]["base64"]).size == (SIZE, SIZE)


def test_listing_names_every_model_with_kind_source_and_state(client: TestClient, tiny_model: Path) -> None:
    models = listing(client)
    assert list(models) == [tiny_model.name, "alpha", "beta"]  # the broken folder is skipped
    assert models[tiny_model.name]["source"] == "base" and models[tiny_model.name]["loaded"] is True
    assert models["alpha"] == {
        "name": "alpha",
        "label": "alpha",
        "source": "models_dir",
        "kind": "sd1",  # an OpenAI-CLIP text encoder with one UNet: the SD 1.x layout
        "inpainting": False,
        "loaded": False,
        "native_size": None,  # known once loaded: listing never loads a model
        "samplers": list(SAMPLER_NAMES),
    }
    assert models[tiny_model.name]["native_size"] == SIZE  # the tiny models draw 64 px natively
    assert models["beta"]["inpainting"] is True
    assert client.get("/custom_models").json() == []  # keeps its original meaning: config.json's list


def test_load_and_unload(client: TestClient, tiny_model: Path) -> None:
    response = client.post("/models/alpha/load")
    assert response.status_code == 200, response.text
    assert response.json()["loaded"] is True and response.json()["native_size"] == SIZE
    engine = client.app.state.engine  # type: ignore[attr-defined]
    loads = engine.registry.load_count
    assert client.post("/models/alpha/load").json()["loaded"] is True
    assert engine.registry.load_count == loads  # already loaded: not again
    response = client.post("/models/alpha/unload")
    assert response.status_code == 200 and response.json()["loaded"] is False
    assert listing(client)["alpha"]["loaded"] is False


def test_errors(client: TestClient, tiny_model: Path) -> None:
    for route in ("/models/nope/load", "/models/nope/unload", "/models/broken/load"):
        response = client.post(route)
        assert response.status_code == 404, route
        assert "not found" in response.json()["message"]
    response = client.post(f"/models/{tiny_model.name}/unload")
    assert response.status_code == 400 and "base model" in response.json()["message"]


def test_serving_past_the_budget_unloads_the_least_recently_used(client: TestClient) -> None:
    generate(client, "alpha")
    assert listing(client)["alpha"]["loaded"] is True
    generate(client, "beta")  # a budget of 2: the base stays, alpha goes
    models = listing(client)
    assert models["beta"]["loaded"] is True and models["alpha"]["loaded"] is False
    generate(client, "alpha")
    assert client.app.state.engine.registry.load_count == 4  # type: ignore[attr-defined]
    metrics = client.get("/metrics").text
    assert 'sdserver_models{kind="unloads"} 2.0' in metrics


def test_refresh_rescans_models_dir(make_client: ClientFactory, tiny_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "models"
    make_tiny_model(folder / "one", safety_checker=False, seed=40)
    client = make_client(model=str(tiny_model), models_dir=str(folder))
    assert list(listing(client)) == [tiny_model.name, "one"]
    shutil.copytree(folder / "one", folder / "two")
    shutil.rmtree(folder / "one")
    response = client.post("/models/refresh")
    assert response.status_code == 200
    assert [model["name"] for model in response.json()] == [tiny_model.name, "two"]
    generate(client, "two")
    assert client.post("/models/one/load").status_code == 404


def test_listing_models_never_loads_one(
    make_client: ClientFactory, tiny_model: Path, tiny_model_without_checker: Path
) -> None:
    custom = [{"model_path": str(tiny_model_without_checker), "ui_label": "M", "url_path": "mine"}]
    client = make_client(model=str(tiny_model), custom_models=custom)
    registry = client.app.state.engine.registry  # type: ignore[attr-defined]
    loads = registry.load_count
    a1111 = client.get("/sdapi/v1/sd-models").json()
    ours = client.get("/models").json()
    assert registry.load_count == loads
    assert [m["title"] for m in a1111][1] == "mine" and a1111[1]["sha256"] is None
    assert [m["loaded"] for m in (ours if isinstance(ours, list) else ours["models"])] == [True, False]
