"""The requests of AUTOMATIC1111's own API tests (its repository's test/test_txt2img.py, test_img2img.py,
test_extras.py and test_utils.py), restated here: every one of them is answered 200 by sdserver, and
what sdserver does not do is named in `info.notes` rather than dropped in silence."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import ClientFactory, half_mask, png_b64, scene

# A1111's test bodies carry every field with its API default: the fixture of each file.
TXT2IMG: dict[str, Any] = {
    "batch_size": 1, "cfg_scale": 7, "denoising_strength": 0, "enable_hr": False, "eta": 0,
    "firstphase_height": 0, "firstphase_width": 0, "height": 64, "n_iter": 1, "negative_prompt": "",
    "prompt": "example prompt", "restore_faces": False, "s_churn": 0, "s_noise": 1, "s_tmax": 0, "s_tmin": 0,
    "sampler_index": "Euler a", "seed": -1, "seed_resize_from_h": -1, "seed_resize_from_w": -1, "steps": 3,
    "styles": [], "subseed": -1, "subseed_strength": 0, "tiling": False, "width": 64,
}  # fmt: skip
IMG2IMG: dict[str, Any] = {
    **{k: v for k, v in TXT2IMG.items() if not k.startswith(("enable_hr", "firstphase"))},
    "denoising_strength": 0.75, "include_init_images": False, "inpaint_full_res": False,
    "inpaint_full_res_padding": 0, "inpainting_fill": 0, "inpainting_mask_invert": False, "mask": None,
    "mask_blur": 4, "override_settings": {}, "resize_mode": 0,
}  # fmt: skip


@pytest.fixture(scope="module")
def client(make_module_client: ClientFactory, tiny_model: Path) -> TestClient:
    return make_module_client(model=str(tiny_model))


def info(response: Any) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    return dict(json.loads(response.json()["info"]))


@pytest.mark.parametrize(
    "change",
    [
        {},
        {"negative_prompt": "example negative prompt"},
        {"prompt": "((emphasis)), (emphasis1:1.1), [to:1], [from::2], [from:to:0.3], [alt|alt1]"},
        {"height": 128},
        {"enable_hr": True},
        {"n_iter": 2},
        {"batch_size": 2},
        {"sampler_index": "PLMS"},
        {"sampler_index": "DDIM"},
        {"sampler_index": "UniPC"},
    ],
)
def test_txt2img_requests_are_performed(client: TestClient, change: dict[str, Any]) -> None:
    answer = info(client.post("/sdapi/v1/txt2img", json={**TXT2IMG, **change}))
    assert not answer["notes"]


def test_the_hires_fix_at_a1111s_default_strength_0_is_the_upscale(client: TestClient) -> None:
    response = client.post("/sdapi/v1/txt2img", json={**TXT2IMG, "enable_hr": True, "seed": 3})
    answer = info(response)
    assert (answer["width"], answer["height"]) == (128, 128)
    assert answer["extra_generation_params"]["Denoising strength"] == 0


@pytest.mark.parametrize(
    ("change", "noted"), [({"tiling": True}, "tiling"), ({"restore_faces": True}, "restore_faces")]
)
def test_txt2img_features_sdserver_lacks_are_performed_and_named(
    client: TestClient, change: dict[str, Any], noted: str
) -> None:
    answer = info(client.post("/sdapi/v1/txt2img", json={**TXT2IMG, **change}))
    assert any(noted in note for note in answer["notes"])


@pytest.mark.parametrize(
    "change",
    [
        {},
        {"mask": "mask"},
        {"mask": "mask", "inpainting_mask_invert": True},
        {"script_name": "sd upscale", "script_args": ["", 8, "Lanczos", 2.0]},
    ],
)
def test_img2img_requests_are_performed(client: TestClient, change: dict[str, Any]) -> None:
    body = {**IMG2IMG, "init_images": [png_b64(scene())], **change}
    if body["mask"] == "mask":
        body["mask"] = png_b64(half_mask())
    answer = info(client.post("/sdapi/v1/img2img", json=body))
    assert [note for note in answer["notes"] if "script_name" not in note] == []


@pytest.mark.parametrize(
    "body",
    [
        {"resize_mode": 0, "show_extras_results": True, "gfpgan_visibility": 0, "codeformer_visibility": 0,
         "codeformer_weight": 0, "upscaling_resize": 2, "upscaling_resize_w": 128, "upscaling_resize_h": 128,
         "upscaling_crop": True, "upscaler_1": "Lanczos", "upscaler_2": "None", "extras_upscaler_2_visibility": 0},
        {},
        {"model": "clip"},
    ],
)  # fmt: skip
def test_extras_requests_are_performed(client: TestClient, body: dict[str, Any]) -> None:
    response = client.post("/sdapi/v1/extra-single-image", json={**body, "image": png_b64(scene())})
    assert response.status_code == 200, response.text
    assert response.json()["image"]


def test_options_write_and_read_back(client: TestClient) -> None:
    before = client.get("/sdapi/v1/options").json()["send_seed"]
    assert client.post("/sdapi/v1/options", json={"send_seed": not before}).status_code == 200
    assert client.get("/sdapi/v1/options").json()["send_seed"] is (not before)
    client.post("/sdapi/v1/options", json={"send_seed": before})


@pytest.mark.parametrize(
    "route",
    [
        "cmd-flags", "samplers", "upscalers", "sd-models", "hypernetworks", "face-restorers",
        "realesrgan-models", "prompt-styles", "embeddings",
    ],
)  # fmt: skip
def test_listing_routes_answer(client: TestClient, route: str) -> None:
    assert client.get(f"/sdapi/v1/{route}").status_code == 200
