"""The original API, end to end over HTTP on tiny real diffusers pipelines."""

from __future__ import annotations

import base64
import io
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.conftest import (
    SIZE,
    STEPS,
    ClientFactory,
    GatedFamily,
    decode_png,
    half_mask,
    max_pixel_diff,
    pixels,
    png_b64,
    scene,
    spying,
)

TXT2IMG = {"prompt": "a red circle", "width": SIZE, "height": SIZE, "num_inference_steps": STEPS}


def post(client: TestClient, path: str, **fields: Any) -> Any:
    return client.post(path, data={k: str(v) for k, v in fields.items()})


def ok(response: Any) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "success"
    return list(body["images"])


def failure(response: Any, status: int, *words: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["status"] == "failure"
    for word in words:
        assert word in body["message"], body["message"]
    return str(body["message"])


class TestPingAndCustomModels:
    def test_ping(self, client: TestClient) -> None:
        assert client.get("/ping").json() == {"status": "success"}

    def test_custom_models_empty(self, client: TestClient) -> None:
        assert client.get("/custom_models").json() == []

    def test_custom_models_as_configured(
        self, make_client: ClientFactory, tiny_model: Path, tiny_model_without_checker: Path
    ) -> None:
        custom = {
            "model_path": str(tiny_model_without_checker),
            "ui_label": "Mine",
            "url_path": "mine",
            "requires_safety_checker": "true",
        }
        client = make_client(model=str(tiny_model), custom_models=[custom])
        assert client.get("/custom_models").json() == [{**custom, "requires_safety_checker": True}]


class TestTxt2Img:
    def test_response_shape(self, client: TestClient) -> None:
        (image,) = ok(post(client, "/txt2img", **TXT2IMG, seed=7))
        # the original's keys, plus ours: the size used (which the request may leave to the model)
        assert set(image) == {"base64", "seed", "mime_type", "mimetype", "nsfw", "width", "height"}
        assert image["mime_type"] == image["mimetype"] == "image/png"
        assert image["seed"] == 7 and image["nsfw"] is False
        assert decode_png(image["base64"]).size == (image["width"], image["height"]) == (SIZE, SIZE)

    def test_size_is_honoured(self, client: TestClient) -> None:
        (image,) = ok(post(client, "/txt2img", **{**TXT2IMG, "width": 96, "height": 48}))
        assert decode_png(image["base64"]).size == (96, 48)

    def test_num_outputs_seeds_count_up_from_seed(self, client: TestClient) -> None:
        images = ok(post(client, "/txt2img", **TXT2IMG, seed=100, num_outputs=3))
        assert [image["seed"] for image in images] == [100, 101, 102]
        assert len({image["base64"] for image in images}) == 3

    def test_same_seed_same_png(self, client: TestClient) -> None:
        first = ok(post(client, "/txt2img", **TXT2IMG, seed=5, num_outputs=2))
        again = ok(post(client, "/txt2img", **TXT2IMG, seed=5, num_outputs=2))
        assert [i["base64"] for i in first] == [i["base64"] for i in again]

    def test_reported_seed_reproduces_the_image_alone(self, client: TestClient) -> None:
        images = ok(post(client, "/txt2img", **TXT2IMG, seed=11, num_outputs=3))
        (alone,) = ok(post(client, "/txt2img", **TXT2IMG, seed=images[2]["seed"]))
        assert max_pixel_diff(decode_png(alone["base64"]), decode_png(images[2]["base64"])) <= 2

    @pytest.mark.parametrize("seed", [None, 0])
    def test_no_seed_means_random_and_reported(self, client: TestClient, seed: int | None) -> None:
        fields = TXT2IMG if seed is None else {**TXT2IMG, "seed": seed}
        first = ok(post(client, "/txt2img", **fields))[0]
        second = ok(post(client, "/txt2img", **fields))[0]
        assert first["seed"] != second["seed"] and first["seed"] > 0
        (replay,) = ok(post(client, "/txt2img", **TXT2IMG, seed=first["seed"]))
        assert replay["base64"] == first["base64"]

    def test_num_outputs_run_as_one_batch(self, client: TestClient) -> None:
        rows: list[int] = []

        class Spy(GatedFamily):
            def forward(self, model: Any, states: Any, inputs: Any, timesteps: Any) -> Any:
                rows.append(int(inputs.shape[0]))
                return super().forward(model, states, inputs, timesteps)

        with spying(client.app, Spy):
            assert len(ok(post(client, "/txt2img", **TXT2IMG, num_outputs=4))) == 4
        assert len(rows) >= STEPS and set(rows) == {2 * 4}  # every step: the 4 images, with and without guidance

    def test_json_body(self, client: TestClient) -> None:
        response = client.post("/txt2img", json={**TXT2IMG, "seed": 3, "num_outputs": 2})
        assert [image["seed"] for image in ok(response)] == [3, 4]

    def test_multipart_body(self, client: TestClient) -> None:
        files = {k: (None, str(v)) for k, v in {**TXT2IMG, "seed": 3}.items()}
        (image,) = ok(client.post("/txt2img", files=files))
        (form,) = ok(post(client, "/txt2img", **TXT2IMG, seed=3))
        assert image["base64"] == form["base64"]

    def test_concurrent_requests_each_get_their_own_images(self, client: TestClient) -> None:
        solo = {seed: ok(post(client, "/txt2img", **TXT2IMG, seed=seed))[0] for seed in (21, 22, 23, 24)}
        results: dict[int, dict[str, Any]] = {}

        def call(seed: int) -> None:
            results[seed] = ok(post(client, "/txt2img", **TXT2IMG, seed=seed))[0]

        threads = [threading.Thread(target=call, args=(seed,)) for seed in solo]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert sorted(results) == sorted(solo)
        for seed, image in results.items():
            assert image["seed"] == seed
            assert max_pixel_diff(decode_png(image["base64"]), decode_png(solo[seed]["base64"])) <= 2


class TestImg2Img:
    def test_output_takes_the_input_size(self, client: TestClient) -> None:
        fields = {
            "prompt": "x",
            "num_inference_steps": STEPS,
            "init_image": png_b64(scene(64).resize((80, 48))),
        }
        (image,) = ok(post(client, "/img2img", **fields, seed=1))
        assert decode_png(image["base64"]).size == (80, 48)

    @pytest.mark.parametrize("prefix", ["", "data:image/png;base64,", "data:image/jpeg;base64,"])
    def test_data_url_prefix_is_optional(self, client: TestClient, prefix: str) -> None:
        init = prefix + png_b64(scene())
        ok(post(client, "/img2img", prompt="x", num_inference_steps=STEPS, init_image=init))

    @pytest.mark.parametrize("mode,fmt", [("RGBA", "PNG"), ("RGB", "JPEG"), ("RGB", "WEBP"), ("P", "PNG")])
    def test_any_common_format_and_mode(self, client: TestClient, mode: str, fmt: str) -> None:
        init = png_b64(scene().convert(mode), fmt)
        ok(post(client, "/img2img", prompt="x", num_inference_steps=STEPS, init_image=init))

    def test_low_strength_stays_close_to_the_input(self, client: TestClient) -> None:
        init = scene()
        fields = {"prompt": "x", "num_inference_steps": 20, "init_image": png_b64(init), "seed": 1}
        (low,) = ok(post(client, "/img2img", **fields, strength=0.1))
        (high,) = ok(post(client, "/img2img", **fields, strength=1.0))
        low_diff = np.abs(pixels(decode_png(low["base64"])) - pixels(init)).mean()
        high_diff = np.abs(pixels(decode_png(high["base64"])) - pixels(init)).mean()
        assert low_diff < high_diff


class TestMasking:
    @pytest.mark.parametrize("model_fixture", ["tiny_model", "tiny_inpainting_model"])
    def test_pixels_outside_the_mask_are_unchanged(
        self, make_client: ClientFactory, request: pytest.FixtureRequest, model_fixture: str
    ) -> None:
        client = make_client(model=str(request.getfixturevalue(model_fixture)))
        init = scene()
        fields = {"prompt": "x", "num_inference_steps": STEPS, "strength": 1.0, "seed": 3}
        (image,) = ok(post(client, "/masking", **fields, init_image=png_b64(init), mask_image=png_b64(half_mask())))
        out = pixels(decode_png(image["base64"]))
        assert (out[SIZE // 2 :] == pixels(init)[SIZE // 2 :]).all(), "the kept half changed"
        assert (out[: SIZE // 2] != pixels(init)[: SIZE // 2]).any(), "the masked half was not repainted"

    def test_mask_of_another_size_is_resized(self, client: TestClient) -> None:
        init = scene()
        fields = {"prompt": "x", "num_inference_steps": STEPS, "seed": 3, "init_image": png_b64(init)}
        (image,) = ok(post(client, "/masking", **fields, mask_image=png_b64(half_mask(16))))
        out = pixels(decode_png(image["base64"]))
        assert out.shape == (SIZE, SIZE, 3)
        assert (out[SIZE // 2 :] == pixels(init)[SIZE // 2 :]).all()

    def test_inpainting_model_serves_txt2img_and_img2img(
        self, make_client: ClientFactory, tiny_inpainting_model: Path
    ) -> None:
        client = make_client(model=str(tiny_inpainting_model))
        (image,) = ok(post(client, "/txt2img", **TXT2IMG))
        assert decode_png(image["base64"]).size == (SIZE, SIZE)
        ok(post(client, "/img2img", prompt="x", num_inference_steps=STEPS, init_image=png_b64(scene())))


class TestSafetyChecker:
    def test_flagged_images_are_reported_and_blacked_out(
        self, make_client: ClientFactory, tiny_flagging_model: Path
    ) -> None:
        client = make_client(model=str(tiny_flagging_model))
        images = ok(post(client, "/txt2img", **TXT2IMG, num_outputs=2))
        assert [image["nsfw"] for image in images] == [True, True]
        assert all(pixels(decode_png(image["base64"])).max() == 0 for image in images)

    def test_custom_model_borrows_the_base_checker_when_required(
        self, make_client: ClientFactory, tiny_flagging_model: Path, tiny_model_without_checker: Path
    ) -> None:
        custom = [
            {
                "model_path": str(tiny_model_without_checker),
                "ui_label": "A",
                "url_path": "strict",
                "requires_safety_checker": True,
            },
            {
                "model_path": str(tiny_model_without_checker),
                "ui_label": "B",
                "url_path": "loose",
                "requires_safety_checker": False,
            },
        ]
        client = make_client(model=str(tiny_flagging_model), custom_models=custom)
        (strict,) = ok(post(client, "/custom/strict", **TXT2IMG))
        (loose,) = ok(post(client, "/custom/loose", **TXT2IMG))
        assert strict["nsfw"] is True
        assert loose["nsfw"] is False and pixels(decode_png(loose["base64"])).max() > 0

    def test_model_without_checker_reports_false(
        self, make_client: ClientFactory, tiny_model_without_checker: Path
    ) -> None:
        client = make_client(model=str(tiny_model_without_checker))
        (image,) = ok(post(client, "/txt2img", **TXT2IMG))
        assert image["nsfw"] is False


class TestCustomModels:
    @pytest.fixture
    def custom_client(self, make_client: ClientFactory, tiny_model: Path, tiny_inpainting_model: Path) -> TestClient:
        custom = {"model_path": str(tiny_inpainting_model), "ui_label": "Inp", "url_path": "inp"}
        return make_client(model=str(tiny_model), custom_models=[custom])

    def test_custom_txt2img_uses_the_custom_model(self, custom_client: TestClient) -> None:
        (base,) = ok(post(custom_client, "/txt2img", **TXT2IMG, seed=9))
        (custom,) = ok(post(custom_client, "/custom/inp", **TXT2IMG, seed=9))
        assert base["base64"] != custom["base64"]

    @pytest.mark.parametrize("task", ["img2img", "masking"])
    def test_custom_img2img_and_masking(self, custom_client: TestClient, task: str) -> None:
        fields = {"prompt": "x", "num_inference_steps": STEPS, "init_image": png_b64(scene())}
        if task == "masking":
            fields["mask_image"] = png_b64(half_mask())
        (image,) = ok(post(custom_client, f"/custom/inp/{task}", **fields))
        assert decode_png(image["base64"]).size == (SIZE, SIZE)

    def test_unknown_url_path_is_404(self, custom_client: TestClient) -> None:
        failure(post(custom_client, "/custom/nope", **TXT2IMG), 404, "nope")


class TestFailures:
    @pytest.mark.parametrize(
        "path,fields,words",
        [
            ("/txt2img", {"width": 64}, ["prompt"]),
            ("/txt2img", {"prompt": ""}, ["prompt"]),
            ("/txt2img", {"prompt": "x", "width": "abc"}, ["width", "abc"]),
            ("/txt2img", {"prompt": "x", "width": 65}, ["width", "multiple of 8", "65"]),
            ("/txt2img", {"prompt": "x", "num_outputs": 0}, ["num_outputs", "0"]),
            ("/txt2img", {"prompt": "x", "num_outputs": 1000}, ["num_outputs", "1000"]),
            ("/txt2img", {"prompt": "x", "num_inference_steps": -1}, ["num_inference_steps"]),
            ("/txt2img", {"prompt": "x", "guidance_scale": "nan"}, ["guidance_scale"]),
            ("/txt2img", {"prompt": "x", "seed": -5}, ["seed", "-5"]),
            ("/img2img", {"prompt": "x"}, ["init_image", "required"]),
            ("/img2img", {"prompt": "x", "init_image": "not an image!"}, ["init_image"]),
            (
                "/img2img",
                {"prompt": "x", "init_image": base64.b64encode(b"GIF89a...").decode()},
                ["init_image"],
            ),
            ("/masking", {"prompt": "x", "init_image": "<scene>"}, ["mask_image", "required"]),
            ("/masking", {"prompt": "x", "init_image": "<scene>", "mask_image": "AAAA"}, ["mask_image"]),
        ],
    )
    def test_bad_input_is_400_naming_the_field(
        self, client: TestClient, path: str, fields: dict[str, Any], words: list[str]
    ) -> None:
        fields = {k: png_b64(scene()) if v == "<scene>" else v for k, v in fields.items()}
        failure(post(client, path, **fields), 400, *words)

    @pytest.mark.parametrize("strength", ["1.5", "-0.1"])
    def test_strength_outside_0_1(self, client: TestClient, strength: str) -> None:
        fields = {"prompt": "x", "init_image": png_b64(scene()), "strength": strength}
        failure(post(client, "/img2img", **fields), 400, "strength", strength)

    def test_truncated_png(self, client: TestClient) -> None:
        raw = base64.b64decode(png_b64(scene()))[:100]
        fields = {"prompt": "x", "init_image": base64.b64encode(raw).decode()}
        failure(post(client, "/img2img", **fields), 400, "init_image")

    def test_malformed_json(self, client: TestClient) -> None:
        response = client.post("/txt2img", content=b"{oops", headers={"content-type": "application/json"})
        failure(response, 400, "JSON")

    def test_unknown_route_and_method_are_json(self, client: TestClient) -> None:
        failure(client.get("/nowhere"), 404)
        failure(client.get("/txt2img"), 405)

    def test_pipeline_crash_is_500_without_traceback(self, client: TestClient) -> None:
        with spying(client.app) as spy:
            spy.fail_on = TXT2IMG["prompt"]
            message = failure(post(client, "/txt2img", **TXT2IMG), 500, "injected fault")
        assert "Traceback" not in message
        ok(post(client, "/txt2img", **TXT2IMG))  # and the worker keeps serving


def test_rgba_init_image_transparency_becomes_white(client: TestClient) -> None:
    image = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    fields = {"prompt": "x", "num_inference_steps": 100, "strength": 0.01, "seed": 1}  # one step
    (out,) = ok(post(client, "/img2img", **fields, init_image=base64.b64encode(buffer.getvalue()).decode()))
    assert pixels(decode_png(out["base64"])).mean() > 100
