"""AUTOMATIC1111's inpainting options and resize modes, honoured (issue: "`mask_blur` and `inpaint_full_res`
keep the pixels outside the (blurred) mask as A1111 does"), on a regular and an inpainting model; the
same options by their core names through the jobs API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from sdserver.core.inpainting import blurred_mask, crop_region
from tests.conftest import SIZE, ClientFactory, decode_png, pixels, png_b64, scene, wait_until

STEPS = 3
MODELS = ("tiny", "inpainting")  # a regular model (blends latents) and a 9-channel inpainting model
OPTIONS = ("resize_mode", "inpainting_fill", "inpaint_full_res", "inpaint_full_res_padding", "mask_blur")


@pytest.fixture(scope="module")
def client(make_module_client: ClientFactory, tiny_model: Path, tiny_inpainting_model: Path) -> TestClient:
    inpainting = {"url_path": "inpainting", "ui_label": "inpainting", "model_path": str(tiny_inpainting_model)}
    return make_module_client(model=str(tiny_model), custom_models=[{**inpainting, "requires_safety_checker": False}])


def square_mask(size: int, box: tuple[int, int, int, int]) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, box)
    return mask


def img2img(client: TestClient, model: str = "tiny", **fields: Any) -> tuple[Image.Image, dict[str, Any]]:
    body = {
        "prompt": "a yellow circle", "steps": STEPS, "seed": 11, "denoising_strength": 0.9,
        "init_images": [png_b64(scene())], "override_settings": {"sd_model_checkpoint": model}, **fields,
    }  # fmt: skip
    response = client.post("/sdapi/v1/img2img", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    return decode_png(answer["images"][0]), json.loads(answer["info"])


@pytest.mark.parametrize("model", MODELS)
def test_mask_blur_keeps_every_pixel_outside_the_blurred_mask(client: TestClient, model: str) -> None:
    mask = square_mask(SIZE, (20, 20, 44, 44))
    out, info = img2img(client, model, mask=png_b64(mask), mask_blur=4, inpaint_full_res=False, inpainting_fill=1)
    soft = np.asarray(blurred_mask(mask, 4))
    sent, made = pixels(scene()), pixels(out)
    assert out.size == (SIZE, SIZE)
    assert (made[soft == 0] == sent[soft == 0]).all(), "outside the blurred mask: exactly the original"
    assert (soft[:, :] > 0).sum() > (np.asarray(mask) > 0).sum(), "the blur reaches past the mask"
    assert np.abs(made[soft >= 128] - sent[soft >= 128]).max() > 10, "inside: repainted"
    assert info["notes"] == []


@pytest.mark.parametrize("model", MODELS)
def test_inpaint_full_res_changes_only_the_box_and_returns_the_whole_picture(client: TestClient, model: str) -> None:
    picture, mask = scene(2 * SIZE), square_mask(2 * SIZE, (56, 48, 72, 64))  # 128 x 128, worked at 64 x 64
    fields = {"init_images": [png_b64(picture)], "mask": png_b64(mask), "width": SIZE, "height": SIZE}
    out, info = img2img(client, model, **fields, mask_blur=2, inpaint_full_res=True, inpaint_full_res_padding=8)
    assert out.size == picture.size, "the whole picture, at its own size"
    soft = blurred_mask(mask, 2)
    left, top, right, bottom = crop_region(soft, 8, (SIZE, SIZE)) or (0, 0, 0, 0)
    assert (right - left, bottom - top) == (42, 42)  # the square, 16 + 2 x 5 blurred, + 2 x 8 padding
    sent, made = pixels(picture), pixels(out)
    outside = np.ones(sent.shape[:2], bool)
    outside[top:bottom, left:right] = False
    assert (made[outside] == sent[outside]).all(), "outside the box: exactly the original"
    zero = np.asarray(soft) == 0
    assert (made[zero] == sent[zero]).all(), "outside the blurred mask: exactly the original"
    assert np.abs(made[56:60, 60:68] - sent[56:60, 60:68]).max() > 10, "inside the mask: repainted"
    assert info["notes"] == [] and info["width"] == 2 * SIZE


def test_a_flagged_image_has_the_whole_pictures_size(make_client: ClientFactory, tiny_flagging_model: Path) -> None:
    flagging = make_client(model=str(tiny_flagging_model))
    picture, mask = scene(2 * SIZE), square_mask(2 * SIZE, (56, 48, 72, 64))
    fields = {"init_images": [png_b64(picture)], "mask": png_b64(mask), "width": SIZE, "height": SIZE}
    out, info = img2img(flagging, "tiny-flagging", **fields, inpaint_full_res=True)
    assert info["nsfw"] == [True] and out.size == picture.size and pixels(out).max() == 0


def test_each_inpainting_fill_runs_and_latent_noise_is_not_original(client: TestClient) -> None:
    mask = png_b64(square_mask(SIZE, (16, 16, 48, 48)))
    made = {}
    for fill in (0, 1, 2, 3):
        out, _ = img2img(client, mask=mask, mask_blur=0, inpaint_full_res=False, inpainting_fill=fill)
        made[fill] = pixels(out)
        assert (made[fill][:16] == pixels(scene())[:16]).all()
    inside = (slice(16, 48), slice(16, 48))
    assert np.abs(made[2][inside] - made[1][inside]).max() > 10, "latent noise starts from noise, not the image"
    assert np.abs(made[3][inside] - made[1][inside]).max() > 10, "latent nothing starts from zeros"
    assert np.abs(made[0][inside] - made[1][inside]).max() > 10, "fill starts from the colours around"


def test_the_resize_modes_give_the_size_asked_for(client: TestClient) -> None:
    """What each mode keeps is core/inpainting's test; here each reaches the model (a random-weight VAE
    does not give the colours back, so only the difference shows)."""
    wide = Image.new("RGB", (2 * SIZE, SIZE), (30, 30, 200))
    wide.paste((30, 200, 30), (0, 0, SIZE // 2, SIZE))  # a green band on the left quarter
    wide.paste((200, 30, 30), (0, 24, 2 * SIZE, 40))  # and a red one across: filled, it is thinner
    common: dict[str, Any] = {"init_images": [png_b64(wide)], "width": SIZE, "height": SIZE, "denoising_strength": 0.5}
    made = []
    for mode in (0, 1, 2, 3):
        out, info = img2img(client, **common, resize_mode=mode)
        assert out.size == (SIZE, SIZE) and info["notes"] == []
        made.append(pixels(out))
    assert np.array_equal(made[3], made[0]), "3, latent upscale, is taken as just resize"
    assert np.abs(made[0] - made[1]).max() > 10 and np.abs(made[1] - made[2]).max() > 10
    assert np.abs(made[0] - made[2]).max() > 10


def test_the_options_are_no_longer_noted(client: TestClient) -> None:
    sent: dict[str, Any] = {
        "resize_mode": 1,
        "inpainting_fill": 3,
        "inpaint_full_res": True,
        "inpaint_full_res_padding": 16,
    }
    _, info = img2img(client, mask=png_b64(square_mask(SIZE, (8, 8, 24, 24))), mask_blur=8, **sent)
    assert not [note for note in info["notes"] if any(name in note for name in OPTIONS)], info["notes"]


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("inpainting_fill", 4, "0 (fill), 1 (original), 2 (latent_noise), 3 (latent_nothing)"),
        ("resize_mode", -1, "0 (just_resize)"),
        ("inpaint_full_res_padding", 300, "256"),
        ("mask_blur", 65, "64"),
    ],
)
def test_a_bad_value_is_refused_by_name(client: TestClient, field: str, value: int, words: str) -> None:
    body = {"prompt": "x", "steps": STEPS, "init_images": [png_b64(scene())], "mask": png_b64(scene()), field: value}
    response = client.post("/sdapi/v1/img2img", json=body)
    assert response.status_code == 422, response.text
    (detail,) = response.json()["detail"]
    assert detail["loc"] == ["body", field] and words in detail["msg"], detail


class TestJobsApi:
    def run(self, client: TestClient, **fields: Any) -> Any:
        mask = png_b64(square_mask(SIZE, (16, 16, 48, 48)))
        body = {"task": "inpaint", "prompt": "a yellow circle", "steps": STEPS, "seed": 3, "strength": 0.9,
                "init_image": png_b64(scene()), "mask_image": mask, **fields}  # fmt: skip
        return client.post("/v1/jobs", json=body)

    def test_the_core_names_are_honoured(self, client: TestClient) -> None:
        fields = {"mask_blur": 3, "inpaint_fill": "latent_nothing", "inpaint_full_res": True, "inpaint_padding": 4}
        response = self.run(client, **fields)
        assert response.status_code == 202, response.text
        url = f"/v1/jobs/{response.json()['id']}"
        wait_until(lambda: client.get(url).json()["status"] not in ("queued", "running"))
        job = client.get(url).json()
        assert job["status"] == "succeeded", job
        made, sent = pixels(decode_png(job["images"][0]["base64"])), pixels(scene())
        zero = np.asarray(blurred_mask(square_mask(SIZE, (16, 16, 48, 48)), 3)) == 0
        assert (made[zero] == sent[zero]).all()

    def test_a_bad_value_is_refused_by_name(self, client: TestClient) -> None:
        response = self.run(client, inpaint_fill="latent")
        assert response.status_code in (400, 422), response.text
        error = response.json()["error"]
        assert error["param"] == "inpaint_fill" and "'latent'" in error["message"]
