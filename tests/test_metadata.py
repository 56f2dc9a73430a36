"""Generation parameters inside PNGs: A1111's infotext and JSON, written and read back."""

from __future__ import annotations

import io

from fastapi.testclient import TestClient
from PIL import Image

from sdserver.core.types import GenerationRequest
from sdserver.imaging import encode_image, encode_png
from sdserver.metadata import attach, infotext, parameters_for, parse_infotext, read_info
from tests.conftest import SIZE, STEPS, decode_png


def params(**overrides: object) -> dict[str, object]:
    request = GenerationRequest(
        prompt='a "red", circle\nsecond line', negative_prompt="blue, green", steps=20, guidance_scale=7.5
    )
    values = parameters_for(
        request, seed=42, width=512, height=768, model="sd15", model_hash="0123456789abcdef", sampler="DPM++ 2M Karras"
    )
    return {**values, **overrides}


def test_infotext_in_a1111_format() -> None:
    text = infotext(params())
    lines = text.split("\n")
    assert lines[:3] == ['a "red", circle', "second line", "Negative prompt: blue, green"]
    assert lines[3].startswith("Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 42, Size: 512x768, ")
    assert "Model hash: 0123456789, Model: sd15" in lines[3]


def test_infotext_round_trip() -> None:
    parsed = parse_infotext(infotext(params(clip_skip=2)))
    assert parsed["Prompt"] == 'a "red", circle\nsecond line'
    assert parsed["Negative prompt"] == "blue, green"
    assert (parsed["Steps"], parsed["Seed"], parsed["CFG scale"], parsed["Clip skip"]) == (20, 42, 7.5, 2)
    assert (parsed["Size-1"], parsed["Size-2"], parsed["Sampler"]) == (512, 768, "DPM++ 2M Karras")


def test_png_carries_both_chunks_and_reads_back() -> None:
    image = Image.new("RGB", (8, 8))
    attach(image, params())
    text, structured, others = read_info(encode_png(image))
    assert text == infotext(params())
    assert structured is not None and structured["seed"] == 42 and structured["prompt"].startswith('a "red"')
    assert others == {}
    assert read_info(encode_png(Image.new("RGB", (8, 8))))[:2] == (None, None)


def test_non_ascii_prompt_survives() -> None:
    image = Image.new("RGB", (8, 8))
    attach(image, params(prompt="un chat très mignon, 猫"))
    text, structured, _ = read_info(encode_png(image))
    assert text is not None and text.startswith("un chat très mignon, 猫")
    assert structured is not None and structured["prompt"] == "un chat très mignon, 猫"


def test_jpeg_and_webp_encoding_with_quality() -> None:
    image = Image.effect_noise((64, 64), 50).convert("RGB")
    small, large = encode_image(image, "jpeg", 10), encode_image(image, "jpeg", 95)
    assert small.startswith(b"\xff\xd8") and len(small) < len(large)
    assert Image.open(io.BytesIO(encode_image(image, "webp", 50))).format == "WEBP"


def test_original_api_keeps_its_shape_and_its_pngs_carry_the_parameters(client: TestClient) -> None:
    fields = {"prompt": "a red circle", "width": SIZE, "height": SIZE, "num_inference_steps": STEPS, "seed": 7}
    response = client.post("/txt2img", data={k: str(v) for k, v in fields.items()})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"status", "images"}
    (image,) = body["images"]
    assert set(image) == {"base64", "seed", "mime_type", "mimetype", "nsfw", "width", "height"}  # + the size used
    png = decode_png(image["base64"])
    parsed = parse_infotext(png.info["parameters"])
    assert (parsed["Prompt"], parsed["Seed"], parsed["Steps"], parsed["Model"]) == ("a red circle", 7, STEPS, "tiny")
    assert parsed["Sampler"] == "PNDM" and parsed["Size"] == f"{SIZE}x{SIZE}"
    read = client.post("/png-info", json={"image": image["base64"]}).json()
    assert read["parameters_json"]["seed"] == 7 and read["info"] == png.info["parameters"]
