"""A request that names no size or steps gets the model's own: its native size and its default steps,
in every protocol, and every response says what was used."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from sdserver.cli import app
from sdserver.core.errors import ModelLoadError
from sdserver.core.types import GenerationRequest
from sdserver.engine import Engine
from sdserver.metadata import params_of
from sdserver.settings import Settings
from tests.conftest import ClientFactory, decode_png, png_b64, scene, wait_until

NATIVE = 64  # the tiny model: 8x8 latents, 8x VAE
OWN_STEPS = 3  # what its sdserver.json declares


@pytest.fixture(scope="module")
def model_with_defaults(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """The tiny model, plus an sdserver.json declaring its default steps."""
    folder = tmp_path_factory.mktemp("own-defaults") / "tiny-own-steps"
    folder.mkdir()
    for item in tiny_model.iterdir():
        (folder / item.name).symlink_to(item)
    (folder / "sdserver.json").write_text(json.dumps({"default_steps": OWN_STEPS}))
    return folder


@pytest.fixture
def client(make_client: ClientFactory, model_with_defaults: Path) -> TestClient:
    return make_client(model=str(model_with_defaults))


def used(png_base64: str) -> tuple[int, int, int]:
    params = params_of(decode_png(png_base64))
    assert params is not None
    return params["width"], params["height"], params["steps"]


def test_original_api(client: TestClient) -> None:
    image = client.post("/txt2img", data={"prompt": "x", "seed": 3}).json()["images"][0]
    assert (image["width"], image["height"]) == (NATIVE, NATIVE)
    assert used(image["base64"]) == (NATIVE, NATIVE, OWN_STEPS)
    sized = client.post("/txt2img", data={"prompt": "x", "width": 128, "height": 64}).json()["images"][0]
    assert (sized["width"], sized["height"]) == (128, 64)


def test_jobs_api(client: TestClient) -> None:
    job = client.post("/v1/jobs", json={"prompt": "x"}).json()
    wait_until(lambda: client.get(f"/v1/jobs/{job['id']}").json()["status"] == "succeeded")
    done = client.get(f"/v1/jobs/{job['id']}").json()
    assert (done["width"], done["height"], done["steps"]) == (NATIVE, NATIVE, OWN_STEPS)
    assert used(done["images"][0]["base64"]) == (NATIVE, NATIVE, OWN_STEPS)


def test_openai_api(client: TestClient) -> None:
    body = client.post("/v1/images/generations", json={"prompt": "x"}).json()
    assert body["size"] == f"{NATIVE}x{NATIVE}"
    assert used(body["data"][0]["b64_json"]) == (NATIVE, NATIVE, OWN_STEPS)


def test_a1111_api(client: TestClient) -> None:
    body = client.post("/sdapi/v1/txt2img", json={"prompt": "x"}).json()
    info = json.loads(body["info"])
    assert (info["width"], info["height"], info["steps"]) == (NATIVE, NATIVE, OWN_STEPS)
    params = body["parameters"]
    assert (params["width"], params["height"], params["steps"]) == (NATIVE, NATIVE, OWN_STEPS)
    assert used(body["images"][0]) == (NATIVE, NATIVE, OWN_STEPS)


def test_a1111_img2img_keeps_the_init_images_size(client: TestClient) -> None:
    body = client.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": [png_b64(scene(128))]}).json()
    info = json.loads(body["info"])
    assert (info["width"], info["height"]) == (128, 128)


def test_the_cli(model_with_defaults: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.png"
    args = ["generate", "x", "-o", str(out), "--model", str(model_with_defaults), "--device", "cpu"]
    result = CliRunner().invoke(app, [*args, "--config", str(tmp_path / "none.json")])
    assert result.exit_code == 0, result.output
    assert f"{NATIVE}x{NATIVE}, {OWN_STEPS} steps)" in result.output


def test_a_model_folder_without_its_own_steps_gets_stable_diffusions_50(tiny_model: Path) -> None:
    engine = Engine.from_settings(Settings(model=str(tiny_model), device="cpu"))
    prepared = engine.prepare(GenerationRequest(prompt="x"))
    assert (prepared.width, prepared.height, prepared.steps) == (NATIVE, NATIVE, 50)
    assert engine.prepare(GenerationRequest(prompt="x", steps=7)).steps == 7


def test_the_demo_model_declares_20_steps() -> None:
    engine = Engine.from_settings(Settings(model="demo", device="cpu"))
    assert engine.prepare(GenerationRequest(prompt="x")).steps == 20


def test_the_default_steps_are_checked_against_strength(client: TestClient) -> None:
    # img2img runs steps x strength steps: 3 x 0.2 is none at all
    fields = {"prompt": "x", "init_image": png_b64(scene()), "strength": 0.2}
    response = client.post("/img2img", data=fields)
    assert response.status_code == 400 and "strength" in response.json()["message"]


def test_a_bad_default_steps_file_fails_the_load_naming_it(tmp_path: Path, tiny_model: Path) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    for item in tiny_model.iterdir():
        (folder / item.name).symlink_to(item)
    (folder / "sdserver.json").write_text('{"default_steps": "many"}')
    engine = Engine.from_settings(Settings(model=str(folder), device="cpu"))
    with pytest.raises(ModelLoadError, match=r"sdserver\.json: default_steps must be a positive integer"):
        engine.load()
