"""The OpenAI Images API, spoken by the official `openai` package against a live server on tiny real
diffusers pipelines."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from sdserver.metadata import params_of, parse_infotext
from tests.conftest import SIZE, STEPS, LiveServer, half_mask, max_pixel_diff, pixels, scene

FAST = {"steps": STEPS}


class Live(LiveServer):
    """The real app on a real socket (the openai package brings its own HTTP client)."""

    def __init__(self, **settings: Any) -> None:
        super().__init__(**settings)
        self.start()
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture
def live_factory() -> Iterator[Callable[..., Live]]:
    servers: list[Live] = []

    def factory(**settings: Any) -> Live:
        servers.append(Live(**settings))
        return servers[-1]

    yield factory
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def live(tiny_model: Path) -> Iterator[Live]:
    """One server for the module's tests that need no special settings (start-up is the slow part)."""
    server = Live(model=str(tiny_model))
    yield server
    server.stop()


def png_of(b64: str | None) -> Image.Image:
    assert b64 is not None
    raw = base64.b64decode(b64)
    assert raw.startswith(b"\x89PNG\r\n\x1a\n"), "expected a PNG"
    return Image.open(io.BytesIO(raw))


def upload(image: Image.Image, name: str = "image.png") -> tuple[str, bytes, str]:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return (name, buffer.getvalue(), "image/png")


def openai_mask(size: int = SIZE) -> Image.Image:
    """OpenAI's convention: transparent top half (repaint), opaque bottom half (keep)."""
    mask = Image.new("RGBA", (size, size), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, size, size // 2))
    return mask


class TestGenerations:
    def test_b64_json_png_carries_its_parameters(self, live: Live) -> None:
        response = live.client.images.generate(
            prompt="a red circle",
            size=f"{SIZE}x{SIZE}",  # type: ignore[arg-type]
            response_format="b64_json",
            extra_body={**FAST, "seed": 7, "negative_prompt": "blue", "guidance_scale": 5},
        )
        assert response.created > 0
        (item,) = response.data
        image = png_of(item.b64_json)
        assert image.size == (SIZE, SIZE)
        info = parse_infotext(image.info["parameters"])
        assert info["Prompt"] == "a red circle" and info["Negative prompt"] == "blue"
        assert (info["Seed"], info["Steps"], info["CFG scale"], info["Size"]) == (7, STEPS, 5, f"{SIZE}x{SIZE}")
        assert info["Model"] == "tiny" and len(info["Model hash"]) == 10
        params = params_of(image)
        assert params is not None and params["seed"] == 7 and params["prompt"] == "a red circle"
        assert item.model_extra == {"seed": 7}

    def test_n_images_seeded_one_apart(self, live: Live) -> None:
        response = live.client.images.generate(
            prompt="a red circle",
            n=3,
            size=f"{SIZE}x{SIZE}",
            extra_body={**FAST, "seed": 40},  # type: ignore[arg-type]
        )
        assert [item.model_extra for item in response.data] == [{"seed": 40}, {"seed": 41}, {"seed": 42}]
        images = [png_of(item.b64_json) for item in response.data]
        assert max_pixel_diff(images[0], images[1]) > 0 and max_pixel_diff(images[1], images[2]) > 0
        alone = live.client.images.generate(
            prompt="a red circle",
            size=f"{SIZE}x{SIZE}",
            extra_body={**FAST, "seed": 41},  # type: ignore[arg-type]
        )
        assert max_pixel_diff(png_of(alone.data[0].b64_json), images[1]) <= 2

    def test_sampler_extension(self, live: Live) -> None:
        response = live.client.images.generate(
            prompt="a red circle",
            size=f"{SIZE}x{SIZE}",
            extra_body={**FAST, "seed": 3, "sampler": "dpm++ 2m karras"},  # type: ignore[arg-type]
        )
        assert parse_infotext(png_of(response.data[0].b64_json).info["parameters"])["Sampler"] == "DPM++ 2M Karras"

    def test_jpeg_and_webp_output(self, live: Live) -> None:
        for output_format, magic in (("jpeg", b"\xff\xd8\xff"), ("webp", b"RIFF")):
            response = live.client.images.generate(
                prompt="a red circle",
                size=f"{SIZE}x{SIZE}",  # type: ignore[arg-type]
                output_format=output_format,  # type: ignore[arg-type]
                output_compression=80,
                extra_body=FAST,
            )
            assert response.output_format == output_format
            assert response.data[0].b64_json is not None
            assert base64.b64decode(response.data[0].b64_json).startswith(magic)

    def test_openai_model_names_mean_the_default_model(self, live: Live) -> None:
        response = live.client.images.generate(
            model="dall-e-3",
            prompt="a red circle",
            size=f"{SIZE}x{SIZE}",
            extra_body=FAST,  # type: ignore[arg-type]
        )
        assert png_of(response.data[0].b64_json).size == (SIZE, SIZE)

    def test_url_serves_the_image_until_it_expires(self, live_factory: Callable[..., Live], tiny_model: Path) -> None:
        live = live_factory(model=str(tiny_model), image_url_ttl=1.5)
        response = live.client.images.generate(
            prompt="a red circle",
            size=f"{SIZE}x{SIZE}",
            response_format="url",
            extra_body={**FAST, "seed": 5},  # type: ignore[arg-type]
        )
        url = response.data[0].url
        assert url is not None and url.startswith(live.url) and response.data[0].b64_json is None
        token = url.rsplit("/", 1)[1]
        assert len(token) >= 40  # 256 random bits
        fetched = httpx.get(url)
        assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
        assert parse_infotext(Image.open(io.BytesIO(fetched.content)).info["parameters"])["Seed"] == 5
        guessed = httpx.get(url[:-4] + "AAAA")
        assert guessed.status_code == 404 and "expired" in guessed.json()["error"]["message"]
        time.sleep(2.0)
        gone = httpx.get(url)
        assert gone.status_code == 404 and gone.json()["error"]["code"] == 404
        assert len(live.app.state.openai_image_urls) == 0  # nothing kept past its expiry


class TestErrors:
    def expect(self, error: type[openai.APIStatusError], call: Callable[[], object], param: str, *words: str) -> None:
        with pytest.raises(error) as caught:
            call()
        body = caught.value.body
        assert isinstance(body, dict), body
        assert body["param"] == param, body
        for word in words:
            assert word in body["message"], body
        assert "Traceback" not in body["message"]

    def test_bad_size(self, live: Live) -> None:
        call = lambda: live.client.images.generate(prompt="x", size="huge")  # type: ignore[arg-type]  # noqa: E731
        self.expect(openai.BadRequestError, call, "size", "size", "'huge'")

    def test_size_not_a_multiple_of_8(self, live: Live) -> None:
        call = lambda: live.client.images.generate(prompt="x", size="65x64")  # type: ignore[arg-type]  # noqa: E731
        self.expect(openai.BadRequestError, call, "size", "multiple of 8", "65")

    def test_n_zero(self, live: Live) -> None:
        call = lambda: live.client.images.generate(prompt="x", n=0, size="64x64")  # type: ignore[arg-type]  # noqa: E731
        self.expect(openai.BadRequestError, call, "n", "n:", "0")

    def test_unknown_sampler_lists_the_valid_ones(self, live: Live) -> None:
        call = lambda: live.client.images.generate(prompt="x", extra_body={"sampler": "Eulerish"})  # noqa: E731
        self.expect(openai.BadRequestError, call, "sampler", "sampler", "'Eulerish'", "Euler a", "DPM++ 2M Karras")

    def test_unknown_model(self, live: Live) -> None:
        call = lambda: live.client.images.generate(prompt="x", model="nope")  # noqa: E731
        self.expect(openai.NotFoundError, call, "model", "'nope'", "tiny")

    def test_bad_response_format(self, live: Live) -> None:
        call = lambda: live.client.images.generate(prompt="x", response_format="gif")  # type: ignore[arg-type]  # noqa: E731
        self.expect(openai.BadRequestError, call, "response_format", "response_format")

    def test_empty_prompt(self, live: Live) -> None:
        call = lambda: live.client.images.generate(prompt="")  # noqa: E731
        self.expect(openai.BadRequestError, call, "prompt", "prompt")

    def test_mask_without_alpha(self, live: Live) -> None:
        call = lambda: live.client.images.edit(  # noqa: E731
            image=upload(scene()),
            mask=upload(half_mask()),
            prompt="x",
            size="64x64",  # type: ignore[arg-type]
        )
        self.expect(openai.BadRequestError, call, "mask", "alpha", "transparent")

    def test_edit_of_something_not_an_image(self, live: Live) -> None:
        call = lambda: live.client.images.edit(image=("a.png", b"not a png", "image/png"), prompt="x")  # noqa: E731
        self.expect(openai.BadRequestError, call, "image", "not a PNG")


class TestEditsAndVariations:
    def test_edit_with_mask_repaints_only_the_transparent_pixels(self, live: Live) -> None:
        original = scene()
        response = live.client.images.edit(
            image=upload(original),
            mask=upload(openai_mask(), "mask.png"),
            prompt="a yellow circle",
            n=2,
            size=f"{SIZE}x{SIZE}",  # type: ignore[arg-type]
            extra_body={**FAST, "seed": 11},
        )
        assert len(response.data) == 2
        for item in response.data:
            edited = png_of(item.b64_json)
            assert edited.size == (SIZE, SIZE)
            kept = pixels(edited)[SIZE // 2 :], pixels(original)[SIZE // 2 :]
            assert np.array_equal(*kept), "opaque mask pixels must come back as sent"
            repainted = np.abs(pixels(edited)[: SIZE // 2] - pixels(original)[: SIZE // 2]).max()
            assert repainted > 10, "transparent mask pixels must be repainted"
            assert parse_infotext(edited.info["parameters"])["Prompt"] == "a yellow circle"

    def test_edit_without_mask_uses_the_images_transparency(self, live: Live) -> None:
        original = scene().convert("RGBA")
        original.paste((0, 0, 0, 0), (0, 0, SIZE, SIZE // 2))
        response = live.client.images.edit(image=upload(original), prompt="a yellow circle", extra_body=FAST)
        edited = pixels(png_of(response.data[0].b64_json))
        assert np.array_equal(edited[SIZE // 2 :], pixels(scene())[SIZE // 2 :])

    def test_edit_without_transparency_reworks_the_whole_image(self, live: Live) -> None:
        response = live.client.images.edit(
            image=upload(scene()), prompt="a yellow circle", extra_body={**FAST, "strength": 0.9}
        )
        edited = png_of(response.data[0].b64_json)
        assert edited.size == (SIZE, SIZE)
        assert np.abs(pixels(edited)[SIZE // 2 :] - pixels(scene())[SIZE // 2 :]).max() > 10

    def test_variations(self, live: Live) -> None:
        response = live.client.images.create_variation(image=upload(scene()), n=2, extra_body=FAST)
        images = [png_of(item.b64_json) for item in response.data]
        assert [image.size for image in images] == [(SIZE, SIZE)] * 2
        assert max_pixel_diff(images[0], images[1]) > 0


def test_models_lists_the_registry(
    live_factory: Callable[..., Live], tiny_model: Path, tiny_model_without_checker: Path
) -> None:
    custom = {"model_path": str(tiny_model_without_checker), "ui_label": "Mine", "url_path": "mine"}
    live = live_factory(model=str(tiny_model), custom_models=[custom])
    assert [model.id for model in live.client.models.list()] == ["tiny", "mine"]
    assert live.client.models.retrieve("mine").id == "mine"
    response = live.client.images.generate(model="mine", prompt="x", size=f"{SIZE}x{SIZE}", extra_body=FAST)  # type: ignore[arg-type]
    assert parse_infotext(png_of(response.data[0].b64_json).info["parameters"])["Model"] == "mine"
    with pytest.raises(openai.NotFoundError):
        live.client.models.retrieve("nope")
