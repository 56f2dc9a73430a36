"""SD 1.x, 2.x and XL models, as diffusers folders or single files, serve txt2img, img2img and masking
through the same API; a model without a checker of its own borrows the base model's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import SIZE, STEPS, ArchModels, ClientFactory, decode_png, half_mask, pixels, png_b64, scene

MODELS = [
    ("sd2-file", "sd2", False, "safetensors"),
    ("sd2-inpainting-file", "sd2", True, "ckpt"),
    ("sdxl-file", "sdxl", False, "safetensors"),
    ("sdxl-inpainting-folder", "sdxl", True, "folder"),
]


def source(arch_model: ArchModels, arch: str, inpainting: bool, form: str) -> str:
    model = arch_model(arch, inpainting)
    return str({"safetensors": model.safetensors, "ckpt": model.ckpt, "folder": model.folder}[form])


@pytest.fixture
def arch_client(make_client: ClientFactory, tiny_flagging_model: Path, arch_model: ArchModels) -> TestClient:
    """The base model flags every image; the custom models below have no checker of their own."""
    custom = [
        {
            "url_path": name,
            "ui_label": name,
            "model_path": source(arch_model, arch, inpainting, form),
            "requires_safety_checker": name.startswith("sdxl"),
        }
        for name, arch, inpainting, form in MODELS
    ]
    return make_client(model=str(tiny_flagging_model), custom_models=custom)


def images(response: Any) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    return list(response.json()["images"])


@pytest.mark.parametrize(("name", "arch", "inpainting", "form"), MODELS, ids=[m[0] for m in MODELS])
def test_every_task_is_served_by_every_architecture(
    arch_client: TestClient, name: str, arch: str, inpainting: bool, form: str
) -> None:
    base = {"prompt": "a red circle", "num_inference_steps": STEPS, "seed": 3}
    flagged = name.startswith("sdxl")  # borrowed the base model's (always flagging) checker
    (drawn,) = images(arch_client.post(f"/custom/{name}", data={**base, "width": SIZE, "height": SIZE}))
    assert decode_png(drawn["base64"]).size == (SIZE, SIZE) and drawn["nsfw"] is flagged

    init = png_b64(scene())
    (changed,) = images(arch_client.post(f"/custom/{name}/img2img", data={**base, "init_image": init}))
    assert changed["nsfw"] is flagged

    masked = {**base, "init_image": init, "mask_image": png_b64(half_mask())}
    (painted,) = images(arch_client.post(f"/custom/{name}/masking", data=masked))
    assert painted["nsfw"] is flagged
    if not flagged:  # below the mask, the picture comes back exactly
        kept = pixels(decode_png(painted["base64"]))[SIZE // 2 :]
        assert (kept == pixels(scene())[SIZE // 2 :]).all()


def test_the_models_listing_names_each_kind(arch_client: TestClient) -> None:
    listed = {model["name"]: (model["kind"], model["inpainting"]) for model in arch_client.get("/models").json()}
    assert listed["sd2-file"] == ("sd2", False)
    assert listed["sdxl-file"] == ("sdxl", False)
    assert listed["sdxl-inpainting-folder"] == ("sdxl", True)
    assert listed["sd2-inpainting-file"] == ("unknown", None)  # a .ckpt is only read when it loads
    assert arch_client.post("/models/sd2-inpainting-file/load").json()["kind"] == "sd2"
