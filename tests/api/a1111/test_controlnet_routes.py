"""The sd-webui-controlnet extension's routes: version, the ControlNets of controlnet_dir, the modules,
and /controlnet/detect running a module on pictures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.conftest import ClientFactory, decode_png, png_b64
from tests.support.controlnets import make_tiny_controlnet


@pytest.fixture(scope="module")
def client(make_module_client: ClientFactory, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    folder = tmp_path_factory.mktemp("controlnets")
    make_tiny_controlnet(tiny_model / "unet", folder / "tiny-canny")
    return make_module_client(model=str(tiny_model), controlnet_dir=str(folder))


def square(size: tuple[int, int] = (128, 128)) -> Image.Image:
    image = Image.new("RGB", size)
    image.paste((255, 255, 255), (32, 32, 96, 96))
    return image


def detect(client: TestClient, **body: Any) -> Any:
    return client.post("/controlnet/detect", json=body)


def problem(response: Any) -> tuple[str, str]:
    """The field and message of an A1111-style 422."""
    assert response.status_code == 422, response.text
    (detail,) = response.json()["detail"]
    return detail["loc"][-1], detail["msg"]


def test_version(client: TestClient) -> None:
    assert client.get("/controlnet/version").json() == {"version": 2}


def test_model_list_shows_name_and_hash(client: TestClient) -> None:
    (title,) = client.get("/controlnet/model_list").json()["model_list"]
    name, hashed = title.split(" ")
    assert name == "tiny-canny" and len(hashed) == 10 and hashed[0] == "[" and hashed[-1] == "]"


def test_module_list_with_details(client: TestClient) -> None:
    body = client.get("/controlnet/module_list").json()
    assert "canny" in body["module_list"] and "openpose" not in body["module_list"]
    assert body["module_detail"]["canny"]["sliders"][1]["name"] == "Canny Low Threshold"
    aliases = client.get("/controlnet/module_list", params={"alias_names": "true"}).json()
    assert "invert (from white bg & black line)" in aliases["module_list"]
    assert set(aliases["module_detail"]) == set(aliases["module_list"])


def test_settings(client: TestClient) -> None:
    assert client.get("/controlnet/settings").json()["control_net_unit_count"] >= 3


def test_detect_canny(client: TestClient) -> None:
    response = detect(
        client,
        controlnet_module="canny",
        controlnet_input_images=[png_b64(square()), png_b64(square((64, 32)))],
        controlnet_processor_res=128,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["info"] == "Success" and len(body["images"]) == 2
    first, second = (decode_png(image) for image in body["images"])
    assert first.size == (128, 128) and second.size == (256, 128)  # short side at processor_res
    edges = np.asarray(first.convert("L"))
    assert edges[29:35, 40:88].max(axis=0).min() == 255  # the top side, along its length
    assert edges[50:80, 50:80].max() == 0


def test_detect_with_webuiapis_field_names(client: TestClient) -> None:
    image = "data:image/png;base64," + png_b64(square((64, 64)))
    response = detect(client, controlnet_module="invert", controlnet_images=[image], controlnet_threshold_a=64)
    assert response.status_code == 200, response.text
    assert decode_png(response.json()["images"][0]).getpixel((0, 0)) == (255, 255, 255)


def test_detect_refuses_modules_that_need_weights_by_name(client: TestClient) -> None:
    field, message = problem(
        detect(client, controlnet_module="openpose_full", controlnet_input_images=[png_b64(square())])
    )
    assert field == "controlnet_module"
    assert "'openpose_full'" in message and "needs a model file" in message and "canny" in message


@pytest.mark.parametrize(
    ("images", "field", "words"),
    [
        ([], "controlnet_input_images", "no image"),
        (["@@@@"], "controlnet_input_images[0]", "base64"),
        ([png_b64(square()), "aGVsbG8="], "controlnet_input_images[1]", "image"),
    ],
)
def test_detect_names_bad_images(client: TestClient, images: list[str], field: str, words: str) -> None:
    got_field, message = problem(detect(client, controlnet_module="canny", controlnet_input_images=images))
    assert got_field == field and words in message


def test_detect_checks_the_input_pixel_limit_from_the_header(make_client: ClientFactory, tiny_model: Path) -> None:
    client = make_client(model=str(tiny_model), limits={"max_input_pixels": 1000})
    field, message = problem(detect(client, controlnet_module="canny", controlnet_input_images=[png_b64(square())]))
    assert field == "controlnet_input_images[0]" and "over the limit" in message
