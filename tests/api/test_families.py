"""SD 3 and FLUX.1 models serve every task through every protocol: the original API and /custom, the jobs
API, OpenAI's Images API, AUTOMATIC1111's API and the command line."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from sdserver.cli import app
from tests.conftest import SIZE, ClientFactory, FlowModels, decode_png, half_mask, pixels, png_b64, scene

FAMILIES = ("sd3", "flux", "flux-fill")
STEPS = 2


@pytest.fixture(scope="module")
def family_client(
    make_module_client: ClientFactory, tiny_model: Path, family_model: Callable[[str], Path], flow_model: FlowModels
) -> TestClient:
    custom = [
        {"url_path": arch, "ui_label": arch, "model_path": str(family_model(arch)), "requires_safety_checker": False}
        for arch in FAMILIES
    ]
    files = {  # single files as people download them
        "flux-gguf": {"model_path": str(flow_model("flux").gguf), "encoders": str(flow_model("flux").folder)},
        "sd3-all-in-one": {"model_path": str(flow_model("sd3", t5=False).all_in_one)},
        "sd3-transformer": {
            "model_path": str(flow_model("sd3").transformer), "encoders": str(flow_model("sd3").folder)
        },
    }  # fmt: skip
    custom += [{"url_path": name, "ui_label": name, **entry} for name, entry in files.items()]
    return make_module_client(model=str(tiny_model), custom_models=custom)


def png(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


def ok(response: Any) -> Any:
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("arch", [*FAMILIES, "flux-gguf", "sd3-all-in-one", "sd3-transformer"])
def test_the_original_api_serves_every_task(family_client: TestClient, arch: str) -> None:
    base = {"prompt": "a red circle", "num_inference_steps": STEPS, "seed": 3}
    (drawn,) = ok(family_client.post(f"/custom/{arch}", data={**base, "width": SIZE, "height": SIZE}))["images"]
    assert decode_png(drawn["base64"]).size == (SIZE, SIZE) and drawn["nsfw"] is False
    init = png_b64(scene())
    (changed,) = ok(family_client.post(f"/custom/{arch}/img2img", data={**base, "init_image": init}))["images"]
    assert decode_png(changed["base64"]).size == (SIZE, SIZE)
    masked = {**base, "init_image": init, "mask_image": png_b64(half_mask())}
    (painted,) = ok(family_client.post(f"/custom/{arch}/masking", data=masked))["images"]
    kept = pixels(decode_png(painted["base64"]))[SIZE // 2 :]
    assert (kept == pixels(scene())[SIZE // 2 :]).all()  # below the mask, the picture comes back exactly


@pytest.mark.parametrize("arch", FAMILIES)
def test_the_jobs_api_streams_progress_and_previews(family_client: TestClient, arch: str) -> None:
    body = {"model": arch, "prompt": "a red circle", "steps": 3, "width": SIZE, "height": SIZE, "preview_every": 1}
    images = {"task": "inpaint", "init_image": png_b64(scene()), "mask_image": png_b64(half_mask())}
    job = family_client.post("/v1/jobs", json={**body, **images})
    assert job.status_code == 202, job.text
    with family_client.stream("GET", f"/v1/jobs/{job.json()['id']}/events") as events:
        text = "".join(events.iter_text())
    assert "event: progress" in text and '"preview"' in text and "event: succeeded" in text


@pytest.mark.parametrize("arch", FAMILIES)
def test_openai_generations_and_edits(family_client: TestClient, arch: str) -> None:
    asked = {"model": arch, "prompt": "a red circle", "size": f"{SIZE}x{SIZE}", "steps": STEPS}
    made = ok(family_client.post("/v1/images/generations", json=asked))
    assert png(made["data"][0]["b64_json"]).size == (SIZE, SIZE)
    picture = io.BytesIO()
    scene().save(picture, format="PNG")
    edited = family_client.post(
        "/v1/images/edits",
        data={"model": arch, "prompt": "a blue square", "steps": str(STEPS)},
        files={"image": ("in.png", picture.getvalue(), "image/png")},
    )
    assert png(ok(edited)["data"][0]["b64_json"]).size == (SIZE, SIZE)


@pytest.mark.parametrize("arch", FAMILIES)
def test_a1111_txt2img_and_inpainting(family_client: TestClient, arch: str) -> None:
    common = {"prompt": "a red circle", "steps": STEPS, "width": SIZE, "height": SIZE, "seed": 5,
              "override_settings": {"sd_model_checkpoint": arch}}  # fmt: skip
    made = ok(family_client.post("/sdapi/v1/txt2img", json=common))
    assert png(made["images"][0]).size == (SIZE, SIZE)
    inpaint = {**common, "init_images": [png_b64(scene())], "mask": png_b64(half_mask()), "mask_blur": 0}
    painted = ok(family_client.post("/sdapi/v1/img2img", json=inpaint))
    assert png(painted["images"][0]).size == (SIZE, SIZE)


@pytest.mark.parametrize(("arch", "valid"), [("sd3", "Euler, Euler a, DPM++ 2M, UniPC"), ("flux", "UniPC")])
def test_a_sampler_of_another_family_is_refused_with_the_valid_ones(
    family_client: TestClient, arch: str, valid: str
) -> None:
    refused = family_client.post("/v1/jobs", json={"model": arch, "prompt": "x", "sampler": "DPM2 a Karras"})
    assert refused.status_code == 400 and valid in refused.json()["error"]["message"]
    assert refused.json()["error"]["param"] == "sampler"


def test_the_models_listing_names_each_family(family_client: TestClient) -> None:
    listed = {model["name"]: model for model in family_client.get("/models").json()}
    assert (listed["flux-fill"]["kind"], listed["flux-fill"]["inpainting"]) == ("flux", True)
    assert (listed["flux-gguf"]["kind"], listed["sd3-all-in-one"]["kind"]) == ("flux", "sd3")
    assert listed["flux"]["samplers"] == ["Euler", "Euler a", "DPM++ 2M", "UniPC"]
    assert "DPM2 a Karras" in listed[next(name for name in listed if listed[name]["source"] == "base")]["samplers"]


def test_a_negative_prompt_on_flux_is_refused_by_name(family_client: TestClient) -> None:
    response = family_client.post("/v1/jobs", json={"model": "flux", "prompt": "x", "negative_prompt": "blue"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "negative_prompt"


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_the_command_line_draws_with_each_family(
    family_model: Callable[[str], Path], arch: str, tmp_path: Path
) -> None:
    out = tmp_path / "out.png"
    args = ["generate", "a red circle", "-o", str(out), "--model", str(family_model(arch)), "--size", f"{SIZE}x{SIZE}"]
    result = CliRunner().invoke(app, [*args, "--steps", str(STEPS), "--device", "cpu", "--config", str(tmp_path / "x")])
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (SIZE, SIZE)


def test_flow_models_borrow_the_base_models_safety_checker(
    make_client: ClientFactory, tiny_flagging_model: Path, family_model: Callable[[str], Path]
) -> None:
    custom = [
        {"url_path": arch, "ui_label": arch, "model_path": str(family_model(arch)), "requires_safety_checker": True}
        for arch in ("sd3", "flux")
    ]
    client = make_client(model=str(tiny_flagging_model), custom_models=custom)
    for arch in ("sd3", "flux"):
        fields = {"prompt": "x", "width": SIZE, "height": SIZE, "num_inference_steps": STEPS}
        (flagged,) = ok(client.post(f"/custom/{arch}", data=fields))["images"]
        assert flagged["nsfw"] is True and pixels(decode_png(flagged["base64"])).max() == 0  # blacked out
