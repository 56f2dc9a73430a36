"""The AUTOMATIC1111 API, spoken by the `webuiapi` package against a live server on tiny real
diffusers pipelines."""

from __future__ import annotations

import base64
import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import webuiapi
from PIL import Image

from tests.conftest import SIZE, STEPS, GatedFamily, LiveServer, half_mask, pixels, scene, spying, wait_until

FAST: dict[str, Any] = {"steps": STEPS, "width": SIZE, "height": SIZE}


class Live(LiveServer):
    def __init__(self, **settings: Any) -> None:
        super().__init__(**settings)
        self.start()
        self.api = webuiapi.WebUIApi(host="127.0.0.1", port=self.port)


@pytest.fixture(scope="module")
def live(tiny_model: Path, tiny_model_without_checker: Path) -> Iterator[Live]:
    custom = {"model_path": str(tiny_model_without_checker), "ui_label": "Mine", "url_path": "mine"}
    server = Live(model=str(tiny_model), custom_models=[custom])
    yield server
    server.stop()


def info_of(result: webuiapi.WebUIApiResult) -> dict[str, Any]:
    assert isinstance(result.info, dict), result.info
    return result.info


class SteppedFamily(GatedFamily):
    """A spy that holds the denoiser once the given numbers of steps are done, until released."""

    def __init__(self, real: Any, hold_after: set[int]) -> None:
        super().__init__(real)
        self.hold_after = hold_after
        self.holding = threading.Event()
        self.release = threading.Event()
        self.holds: list[int] = []

    def forward(self, model: Any, states: Any, inputs: Any, timesteps: Any) -> Any:
        done = states[0].index
        if done in self.hold_after:
            self.holds.append(done)
            self.release.clear()
            self.holding.set()
            assert self.release.wait(60), "never released"
        return super().forward(model, states, inputs, timesteps)


class TestTxt2Img:
    def test_images_info_and_parameters(self, live: Live) -> None:
        result = live.api.txt2img(
            prompt="a red circle",
            negative_prompt="blue",
            seed=7,
            batch_size=2,
            n_iter=2,
            cfg_scale=5,
            sampler_name="Euler a",
            **FAST,
        )
        assert len(result.images) == 4 and all(image.size == (SIZE, SIZE) for image in result.images)
        info = info_of(result)
        assert info["all_seeds"] == [7, 8, 9, 10]
        assert info["all_prompts"] == ["a red circle"] * 4
        assert info["sampler_name"] == "Euler a" and info["sd_model_name"] == "tiny"
        assert len(info["infotexts"]) == 4
        first = info["infotexts"][0]
        assert first.startswith("a red circle\nNegative prompt: blue\n")
        for part in (f"Steps: {STEPS}", "Sampler: Euler a", "CFG scale: 5", "Seed: 7", f"Size: {SIZE}x{SIZE}"):
            assert part in first
        assert result.images[0].info["parameters"] == first  # the PNG carries it
        assert result.parameters["prompt"] == "a red circle" and result.parameters["seed"] == 7

    def test_random_seed_and_subseed_note(self, live: Live) -> None:
        result = live.api.txt2img(prompt="a red circle", seed=-1, subseed=5, subseed_strength=0.5, **FAST)
        info = info_of(result)
        assert info["all_seeds"][0] > 0
        assert any("subseed" in note for note in info["notes"])

    def test_send_images_false(self, live: Live) -> None:
        result = live.api.txt2img(prompt="a red circle", send_images=False, seed=3, **FAST)
        assert result.images == [] and info_of(result)["all_seeds"] == [3]

    def test_sampler_with_karras_scheduler(self, live: Live) -> None:
        result = live.api.txt2img(prompt="x", sampler_name="DPM++ 2M", scheduler="karras", seed=2, **FAST)
        assert info_of(result)["sampler_name"] == "DPM++ 2M Karras"
        assert "Sampler: DPM++ 2M Karras" in result.images[0].info["parameters"]


class TestErrors:
    def post(self, live: Live, path: str, body: dict[str, Any]) -> httpx.Response:
        return httpx.post(f"{live.url}/sdapi/v1/{path}", json=body, timeout=60)

    def expect_422(self, response: httpx.Response, field: str, *words: str) -> None:
        assert response.status_code == 422, response.text
        (detail,) = response.json()["detail"]
        assert detail["loc"] == ["body", field]
        for word in words:
            assert word in detail["msg"], detail

    def test_unknown_sampler(self, live: Live) -> None:
        response = self.post(live, "txt2img", {"prompt": "x", "sampler_name": "Eulerish", **FAST})
        self.expect_422(response, "sampler_name", "sampler_name", "'Eulerish'", "DPM++ 2M Karras")

    def test_unknown_scheduler(self, live: Live) -> None:
        response = self.post(live, "txt2img", {"prompt": "x", "scheduler": "cosine", **FAST})
        self.expect_422(response, "scheduler", "'cosine'", "karras")

    def test_bad_size(self, live: Live) -> None:
        response = self.post(live, "txt2img", {"prompt": "x", "steps": STEPS, "width": 65, "height": SIZE})
        self.expect_422(response, "width", "multiple of 8", "65")

    def test_wrong_type(self, live: Live) -> None:
        self.expect_422(self.post(live, "txt2img", {"prompt": "x", "steps": "many"}), "steps", "steps")

    def test_img2img_needs_an_image(self, live: Live) -> None:
        self.expect_422(self.post(live, "img2img", {"prompt": "x", **FAST}), "init_images", "required")

    def test_img2img_bad_base64(self, live: Live) -> None:
        response = self.post(live, "img2img", {"prompt": "x", "init_images": ["%%%"], **FAST})
        self.expect_422(response, "init_images", "base64")

    def test_unknown_checkpoint(self, live: Live) -> None:
        response = httpx.post(f"{live.url}/sdapi/v1/options", json={"sd_model_checkpoint": "nope"})
        assert response.status_code == 404
        assert response.json()["error"] == "NotFound" and "'nope'" in response.json()["detail"]


class TestImg2Img:
    def test_inpainting_with_a_mask(self, live: Live) -> None:
        original = scene()
        result = live.api.img2img(
            images=[original],
            mask_image=half_mask(),
            prompt="a yellow circle",
            denoising_strength=1.0,
            mask_blur=0,
            seed=4,
            **FAST,
        )
        edited = pixels(result.image)
        assert np.array_equal(edited[SIZE // 2 :], pixels(original)[SIZE // 2 :]), "black mask area is kept"
        assert np.abs(edited[: SIZE // 2] - pixels(original)[: SIZE // 2]).max() > 10, "white area is repainted"
        assert info_of(result)["is_using_inpainting_conditioning"] is True
        assert result.parameters["init_images"] is None

    def test_inverted_and_blurred_mask(self, live: Live) -> None:
        original = scene()
        result = live.api.img2img(
            images=[original],
            mask_image=half_mask(),
            inpainting_mask_invert=1,
            mask_blur=2,
            prompt="a yellow circle",
            denoising_strength=1.0,
            seed=4,
            **FAST,
        )
        edited = pixels(result.image)
        kept = SIZE // 2 - 6  # a 2 px blur reaches 5 px past the mask's edge (A1111's kernel too)
        assert np.array_equal(edited[:kept], pixels(original)[:kept]), "inverted: top kept"
        assert np.abs(edited[SIZE // 2 + 4 :] - pixels(original)[SIZE // 2 + 4 :]).max() > 10

    def test_img2img_resizes_to_width_and_height(self, live: Live) -> None:
        result = live.api.img2img(images=[scene(2 * SIZE)], prompt="x", denoising_strength=0.5, seed=1, **FAST)
        assert result.image.size == (SIZE, SIZE)
        assert "Denoising strength: 0.5" in result.image.info["parameters"]


class TestModelsAndOptions:
    def test_listing(self, live: Live) -> None:
        models = live.api.get_sd_models()
        assert [m["model_name"] for m in models] == ["tiny", "mine"]
        for m in models:  # a hash once loaded (the base model always is); listing never loads a model
            if m["sha256"] is None:
                assert m["title"] == m["model_name"] and m["hash"] is None
            else:
                assert m["title"] == f"{m['model_name']} [{m['hash']}]" and len(m["sha256"]) == 64
        assert models[0]["sha256"] is not None
        names = live.api.util_get_sampler_names()
        for name in ("Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "DPM++ SDE Karras", "DDIM", "UniPC", "LCM"):
            assert name in names
        assert set(live.api.util_get_scheduler_names()) == {"automatic", "uniform", "karras"}
        assert live.api.get_loras() == []
        assert live.api.refresh_checkpoints() is None  # A1111 answers null

    def test_switching_the_model_through_options(self, live: Live) -> None:
        try:
            live.api.util_set_model("mine")
            assert live.api.util_get_current_model().startswith("mine [")
            result = live.api.txt2img(prompt="x", seed=1, **FAST)
            assert info_of(result)["sd_model_name"] == "mine"
            assert "Model: mine" in result.image.info["parameters"]
            overridden = live.api.txt2img(prompt="x", seed=1, override_settings={"sd_model_checkpoint": "tiny"}, **FAST)
            assert info_of(overridden)["sd_model_name"] == "tiny"
        finally:
            live.api.set_options({"sd_model_checkpoint": "tiny"})
        assert live.api.util_get_current_model().startswith("tiny [")

    def test_clip_skip_option(self, live: Live) -> None:
        plain = live.api.txt2img(prompt="a red circle", seed=9, **FAST)
        skipped = live.api.txt2img(
            prompt="a red circle", seed=9, override_settings={"CLIP_stop_at_last_layers": 2}, **FAST
        )
        assert "Clip skip: 2" in skipped.image.info["parameters"]
        assert np.abs(pixels(plain.image) - pixels(skipped.image)).max() > 0


def test_png_info_reads_the_parameters_back(live: Live) -> None:
    result = live.api.txt2img(prompt="a red, circle", negative_prompt="blue", seed=12, **FAST)
    read = live.api.png_info(result.image)
    assert read.info == result.image.info["parameters"]
    assert read.parameters["Prompt"] == "a red, circle" and read.parameters["Negative prompt"] == "blue"
    assert (read.parameters["Seed"], read.parameters["Steps"]) == (12, STEPS)
    plain = httpx.post(f"{live.url}/png-info", json={"image": result.json["images"][0]}).json()
    assert plain["parameters_json"]["seed"] == 12 and plain["parameters_json"]["prompt"] == "a red, circle"
    bad = httpx.post(f"{live.url}/sdapi/v1/png-info", json={"image": base64.b64encode(b"nope").decode()})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "image"]


def test_progress_preview_and_interrupt(live: Live) -> None:
    outcome: dict[str, Any] = {}
    with spying(live.app, SteppedFamily, hold_after={2, 3}) as spy:
        idle = live.api.get_progress()
        assert idle["progress"] == 0 and idle["state"]["job_count"] == 0
        worker = threading.Thread(
            target=lambda: outcome.update(result=live.api.txt2img(prompt="long", steps=10, width=SIZE, height=SIZE))
        )
        worker.start()
        assert spy.holding.wait(60)
        spy.holding.clear()
        first = live.api.get_progress()
        total = first["state"]["sampling_steps"]  # the scheduler's timesteps: PNDM runs one more than asked
        assert first["state"]["sampling_step"] == 2 and total in (10, 11)
        assert first["progress"] == pytest.approx(2 / total, abs=1e-3) and first["eta_relative"] > 0
        assert first["current_image"] is None  # previews start once someone watches
        spy.release.set()
        assert spy.holding.wait(60)
        second = live.api.get_progress()
        assert second["state"]["sampling_step"] == 3
        preview = Image.open(io.BytesIO(base64.b64decode(second["current_image"])))
        assert preview.width > 0
        live.api.interrupt()
        assert live.api.get_progress()["state"]["interrupted"] is True
        spy.release.set()
        worker.join(60)
        spy.release.set()
    result = outcome["result"]
    assert result.images == [] and info_of(result)["interrupted"] is True
    assert spy.holds == [2, 3]
    wait_until(lambda: live.api.get_progress()["state"]["job_count"] == 0)
    assert json.loads(json.dumps(live.api.get_progress()))["progress"] == 0
