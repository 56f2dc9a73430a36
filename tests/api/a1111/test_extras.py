"""A1111's extras (upscaling) and upscaler lists, spoken by the `webuiapi` package against a live
server whose upscalers_dir holds a tiny random-weight ESRGAN."""

from __future__ import annotations

import base64
import io
import struct
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import webuiapi
from PIL import Image

from sdserver.engine.upscalers import import_spandrel
from tests.conftest import LiveServer, decode_png, max_pixel_diff, png_b64, scene
from tests.support.upscalers import make_tiny_upscaler


class Live(LiveServer):
    def __init__(self, folder: Path, **settings: Any) -> None:
        super().__init__(upscalers_dir=str(folder), **settings)
        self.folder = folder
        self.start()
        self.api = webuiapi.WebUIApi(host="127.0.0.1", port=self.port)

    def post(self, route: str, body: dict[str, Any]) -> httpx.Response:
        return httpx.post(f"{self.url}/sdapi/v1/{route}", json=body, timeout=60)


@pytest.fixture(scope="module")
def live(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    folder = tmp_path_factory.mktemp("upscalers")
    make_tiny_upscaler(folder / "tiny-esrgan.safetensors")
    server = Live(folder, model=str(tiny_model), limits={"max_side": 1024, "max_pixels": 1024 * 768, "max_images": 3})
    yield server
    server.stop()


def picture(width: int = 48, height: int = 40) -> Image.Image:
    return scene(64).resize((width, height))


def by_model(live: Live, image: Image.Image) -> Image.Image:
    """What the tiny ESRGAN makes of `image` (twice its size), run here with spandrel directly: the
    server must give the same pixels."""
    model = import_spandrel().ModelLoader().load_from_file(live.folder / "tiny-esrgan.safetensors")
    tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    output = model(tensor)[0].permute(1, 2, 0).numpy()
    return Image.fromarray((output * 255).round().clip(0, 255).astype(np.uint8))


def refusal(response: httpx.Response) -> tuple[str, str]:
    """A1111's 422: (the field it names, the message)."""
    assert response.status_code == 422, response.text
    detail = response.json()["detail"][0]
    return detail["loc"][-1], detail["msg"]


class TestLists:
    def test_upscalers_lists_the_builtins_then_the_files(self, live: Live) -> None:
        listed = live.api.get_upscalers()
        assert [item["name"] for item in listed] == ["None", "Lanczos", "Nearest", "tiny-esrgan"]
        model = listed[-1]
        assert model["model_name"] == "tiny-esrgan" and model["model_url"] is None
        assert model["model_path"] == "tiny-esrgan.safetensors", "the file's name, not where it lives"
        assert isinstance(model["scale"], (int, float))

    def test_realesrgan_models_are_the_esrgan_files(self, live: Live) -> None:
        assert [item["name"] for item in live.api.get_realesrgan_models()] == ["tiny-esrgan"]


class TestSingleImage:
    def test_upscaling_by_two_with_the_model(self, live: Live) -> None:
        image = picture()
        result = live.api.extra_single_image(image=image, upscaler_1="tiny-esrgan", upscaling_resize=2)
        assert result.image.size == (96, 80)
        assert max_pixel_diff(result.image, by_model(live, image)) <= 1
        assert "Postprocess upscale by: 2" in result.info and "Postprocess upscaler: tiny-esrgan" in result.info

    def test_upscaling_to_a_size_crops_to_it_or_keeps_the_aspect(self, live: Live) -> None:
        image = picture()  # 48x40: to cover 100x60 it is scaled by 100/48, to 100x83
        cropped = live.api.extra_single_image(
            image=image, resize_mode=1, upscaling_resize_w=100, upscaling_resize_h=60, upscaler_1="Lanczos"
        )
        assert cropped.image.size == (100, 60)
        assert max_pixel_diff(cropped.image, image.resize((100, 83), Image.LANCZOS).crop((0, 11, 100, 71))) <= 1
        kept = live.api.extra_single_image(
            image=image,
            resize_mode=1,
            upscaling_resize_w=100,
            upscaling_resize_h=60,
            upscaling_crop=False,
            upscaler_1="lanczos",  # any case, as A1111
        )
        assert kept.image.size == (100, 83)

    def test_a_second_upscaler_is_blended_in(self, live: Live) -> None:
        image = picture()
        result = live.api.extra_single_image(
            image=image, upscaler_1="tiny-esrgan", upscaler_2="Nearest", extras_upscaler_2_visibility=0.5
        )
        expected = Image.blend(by_model(live, image), image.resize((96, 80), Image.NEAREST), 0.5)
        assert max_pixel_diff(result.image, expected) <= 1
        assert "Postprocess upscaler 2: Nearest" in result.info

    def test_upscaler_none_returns_the_image_as_sent(self, live: Live) -> None:
        image = picture()
        result = live.api.extra_single_image(image=image, upscaler_1="None", upscaling_resize=2)
        assert result.image.size == image.size and max_pixel_diff(result.image, image) == 0

    def test_face_restoration_is_reported_not_silently_ignored(self, live: Live) -> None:
        response = live.post(
            "extra-single-image", {"image": png_b64(picture()), "upscaler_1": "Lanczos", "gfpgan_visibility": 0.5}
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert decode_png(body["image"]).size == (96, 80)
        assert any("GFPGAN" in note for note in body["notes"]) and "GFPGAN" in body["html_info"]


class TestBatch:
    def test_each_image_is_upscaled_in_order(self, live: Live) -> None:
        images = [picture(48, 40), picture(32, 24)]
        result = live.api.extra_batch_images(images=images, upscaler_1="tiny-esrgan", upscaling_resize=2)
        assert [image.size for image in result.images] == [(96, 80), (64, 48)]
        assert max_pixel_diff(result.images[1], by_model(live, images[1])) <= 1

    def test_more_images_than_max_images_are_refused(self, live: Live) -> None:
        items = [{"data": png_b64(picture()), "name": f"{index}.png"} for index in range(4)]
        field, message = refusal(live.post("extra-batch-images", {"imageList": items, "upscaler_1": "Lanczos"}))
        assert field == "imageList" and "over the limit of 3" in message

    def test_a_bad_image_is_named_by_its_place(self, live: Live) -> None:
        items = [{"data": png_b64(picture()), "name": "a"}, {"data": "bm90IGFuIGltYWdl", "name": "b"}]
        field, message = refusal(live.post("extra-batch-images", {"imageList": items, "upscaler_1": "Lanczos"}))
        assert field == "imageList.1.data" and "not a PNG, JPEG or WebP" in message


def header_only_png(width: int, height: int) -> str:
    """A PNG that claims `width` x `height` but carries no pixel data: only a header read passes it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return base64.b64encode(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")).decode()


class TestRefusals:
    def test_an_output_over_the_limits_is_refused_from_the_header_naming_the_field(self, live: Live) -> None:
        body = {"image": header_only_png(600, 400), "upscaler_1": "tiny-esrgan", "upscaling_resize": 2}
        field, message = refusal(live.post("extra-single-image", body))
        assert field == "upscaling_resize" and "600x400 image upscaled to 1200x800" in message
        sized = {**body, "resize_mode": 1, "upscaling_resize_w": 2000, "upscaling_resize_h": 100}
        assert refusal(live.post("extra-single-image", sized))[0] == "upscaling_resize_w"
        tall = {**sized, "upscaling_resize_w": 100, "upscaling_resize_h": 2000}
        assert refusal(live.post("extra-single-image", tall))[0] == "upscaling_resize_h"

    def test_an_unknown_upscaler_is_refused_listing_the_valid_ones(self, live: Live) -> None:
        field, message = refusal(
            live.post("extra-single-image", {"image": png_b64(picture()), "upscaler_2": "SwinIR_4x"})
        )
        assert field == "upscaler_2" and "valid: None, Lanczos, Nearest, tiny-esrgan" in message

    @pytest.mark.parametrize(
        ("body", "field"),
        [
            ({"image": "not base64!"}, "image"),
            ({}, "image"),
            ({"image": "", "upscaling_resize": 9}, "upscaling_resize"),
            ({"image": "", "resize_mode": 2}, "resize_mode"),
        ],
    )
    def test_bad_fields_are_named(self, live: Live, body: dict[str, Any], field: str) -> None:
        assert refusal(live.post("extra-single-image", {"upscaler_1": "Lanczos", **body}))[0] == field

    def test_a_corrupt_model_file_is_refused_by_name(self, live: Live) -> None:
        (live.folder / "broken.pth").write_bytes(b"garbage")
        try:
            response = live.post("extra-single-image", {"image": png_b64(picture()), "upscaler_1": "broken"})
        finally:
            (live.folder / "broken.pth").unlink()
        assert response.status_code == 503 and "broken.pth" in response.json()["detail"], response.text


def test_the_upscaling_runs_on_the_worker_thread(live: Live, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = live.app.state.engine
    threads: list[str] = []

    def spy(*args: Any) -> Any:
        threads.append(threading.current_thread().name)
        return real(*args)

    real = engine.upscale
    monkeypatch.setattr(engine, "upscale", spy)
    assert live.post("extra-single-image", {"image": png_b64(picture()), "upscaler_1": "Nearest"}).status_code == 200
    assert threads == ["sdserver-worker"]


def test_the_result_is_a_png(live: Live) -> None:
    response = live.post("extra-single-image", {"image": png_b64(picture(), "JPEG"), "upscaler_1": "Nearest"})
    raw = base64.b64decode(response.json()["image"])
    assert Image.open(io.BytesIO(raw)).format == "PNG"
