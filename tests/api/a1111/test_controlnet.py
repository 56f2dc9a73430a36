"""ControlNet in generation: units sent as the sd-webui-controlnet extension takes them (through the
official `webuiapi` client) and as `controlnets` in the jobs API steer the denoiser of a tiny real pipeline
through a tiny random ControlNet built from its UNet."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import webuiapi
from PIL import Image, ImageDraw

from sdserver.core.types import GenerationRequest
from sdserver.service.running import group_key
from tests.api.a1111.test_sdapi import Live, info_of
from tests.conftest import SIZE, STEPS, max_pixel_diff, png_b64, wait_until
from tests.support.controlnets import make_tiny_controlnet

FAST: dict[str, Any] = {"prompt": "a red circle", "steps": STEPS, "width": SIZE, "height": SIZE, "seed": 5}


def fresh() -> dict[str, Any]:
    """FAST with a new `alwayson_scripts` for each webuiapi call: webuiapi puts the units into its mutable
    default dict, which every later call of the process (other test modules too) would then send."""
    return {**FAST, "alwayson_scripts": {}}


def square() -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), "black")
    ImageDraw.Draw(image).rectangle((16, 16, 48, 48), fill="white")
    return image


@pytest.fixture(scope="module")
def live(tiny_model: Path, models_root: Path) -> Iterator[Live]:
    folder = models_root / "controlnets"
    make_tiny_controlnet(tiny_model / "unet", folder / "tiny-canny")
    server = Live(model=str(tiny_model), controlnet_dir=str(folder))
    yield server
    server.stop()


def unit(**fields: Any) -> webuiapi.ControlNetUnit:
    return webuiapi.ControlNetUnit(image=square(), module="canny", model="tiny-canny", **fields)


class TestThroughWebuiapi:
    def test_a_canny_unit_changes_the_image_and_weight_zero_does_not(self, live: Live) -> None:
        plain = live.api.txt2img(**fresh()).image
        steered = live.api.txt2img(controlnet_units=[unit()], **fresh())
        silent = live.api.txt2img(controlnet_units=[unit(weight=0.0)], **fresh()).image
        assert max_pixel_diff(plain, steered.image) > 2
        assert max_pixel_diff(plain, silent) <= 1
        info = info_of(steered)
        assert not info["notes"]
        assert 'ControlNet 0: "Module: canny, Model: tiny-canny, Weight: 1' in info["infotexts"][0]

    def test_the_guidance_window_and_control_mode_matter(self, live: Live) -> None:
        full = live.api.txt2img(controlnet_units=[unit()], **fresh()).image
        late = live.api.txt2img(controlnet_units=[unit(guidance_start=0.6)], **fresh()).image
        favoured = live.api.txt2img(controlnet_units=[unit(control_mode=2)], **fresh()).image
        assert max_pixel_diff(full, late) > 0 and max_pixel_diff(full, favoured) > 0

    def test_img2img_uses_the_init_image_when_a_unit_has_none(self, live: Live) -> None:
        result = live.api.img2img(
            images=[square()], controlnet_units=[webuiapi.ControlNetUnit(module="canny", model="tiny-canny")],
            denoising_strength=0.9, **fresh(),
        )  # fmt: skip
        assert result.image.size == (SIZE, SIZE)

    def test_an_unknown_controlnet_or_module_is_refused_by_name(self, live: Live) -> None:
        for fields, named in (({"model": "nope"}, "nope"), ({"module": "openpose"}, "openpose")):
            arg = {"image": png_b64(square()), "module": "canny", "model": "tiny-canny", **fields}
            body = {**FAST, "alwayson_scripts": {"controlnet": {"args": [arg]}}}
            response = httpx.post(f"{live.url}/sdapi/v1/txt2img", json=body, timeout=60)
            assert response.status_code == 422, response.text
            assert named in response.text

    def test_other_scripts_are_reported_not_silently_dropped(self, live: Live) -> None:
        body = {**FAST, "alwayson_scripts": {"ADetailer": {"args": [True]}}}
        info = httpx.post(f"{live.url}/sdapi/v1/txt2img", json=body, timeout=60).json()["info"]
        assert "alwayson_scripts.ADetailer is not supported" in info


def test_the_jobs_api_takes_controlnets(live: Live) -> None:
    units = [{"model": "tiny-canny", "module": "canny", "image": png_b64(square()), "weight": 1.5}]
    created = httpx.post(f"{live.url}/v1/jobs", json={**FAST, "controlnets": units}, timeout=60)
    assert created.status_code == 202, created.text
    job_url = f"{live.url}/v1/jobs/{created.json()['id']}"
    wait_until(lambda: httpx.get(job_url, timeout=10).json()["status"] not in ("queued", "running"))
    assert httpx.get(job_url, timeout=10).json()["status"] == "succeeded"


def test_requests_with_different_controlnets_never_share_a_running_set() -> None:
    image = square()
    plain = GenerationRequest(prompt="a")
    with_one = GenerationRequest(prompt="a", controlnets=[{"model": "a", "image": image}])
    with_other = GenerationRequest(prompt="a", controlnets=[{"model": "b", "image": image}])
    same_other_weight = GenerationRequest(prompt="a", controlnets=[{"model": "a", "image": image, "weight": 0.5}])
    assert len({group_key(plain), group_key(with_one), group_key(with_other)}) == 3
    assert group_key(with_one) == group_key(same_other_weight)  # per-row weights: they may share
