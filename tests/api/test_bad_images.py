"""A corpus of hostile and unusual images, sent to every image field of every protocol.

Hostile ones (bombs, truncations, wrong magic, bad base64, huge metadata) are refused with a clear
4xx naming the field, never a 500, a hang, or a memory blow-up; unusual but valid ones (palette,
16-bit, CMYK, animated, grayscale) are converted and served.
"""

from __future__ import annotations

import base64
import io
import resource
import struct
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.conftest import SIZE, half_mask, png_b64, scene


def _encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge size (decoding it would need gigabytes)."""
    raw = _encode(Image.new("RGB", (8, 8)), "PNG")
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return raw[:8] + _chunk(b"IHDR", ihdr) + raw[8 + 25 :]


def compressed_bomb() -> bytes:
    """A real 12000x12000 black PNG: ~100 KB on the wire, 432 MB decoded."""
    row = b"\x00" + b"\x00" * 12000 * 3
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(12000)) + compressor.flush()
    header = _chunk(b"IHDR", struct.pack(">IIBBBBB", 12000, 12000, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def huge_text_chunk() -> bytes:
    """A valid small PNG carrying a zTXt chunk that inflates to 64 MB."""
    raw = _encode(scene(), "PNG")
    text = b"Comment\x00\x00" + zlib.compress(b"A" * (64 << 20), 9)
    return raw[:33] + _chunk(b"zTXt", text) + raw[33:]


def animated(fmt: str) -> bytes:
    frames = [scene(), scene().rotate(90)]
    return _encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def _truncated(fmt: str) -> bytes:
    """A noisy image (so its data does not compress away) cut in the middle of its pixel data."""
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    raw = _encode(noise, fmt)
    return raw[: len(raw) // 2]


def sixteen_bit() -> bytes:
    array = (np.asarray(scene().convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    return _encode(Image.fromarray(array), "PNG")  # uint16 -> mode I;16


b64 = lambda raw: base64.b64encode(raw).decode()  # noqa: E731

HOSTILE: dict[str, Callable[[], str]] = {
    "header bomb": lambda: b64(png_claiming(60000, 60000)),
    "compressed bomb": lambda: b64(compressed_bomb()),
    "huge metadata chunk": lambda: b64(huge_text_chunk()),
    "truncated png": lambda: b64(_truncated("PNG")),
    "truncated jpeg": lambda: b64(_truncated("JPEG")),
    "png magic, jpeg body": lambda: b64(b"\x89PNG\r\n\x1a\n" + _encode(scene(), "JPEG")[2:]),
    "gif": lambda: b64(_encode(scene(), "GIF")),
    "bmp": lambda: b64(_encode(scene(), "BMP")),
    "tiff": lambda: b64(_encode(scene(), "TIFF")),
    "random bytes": lambda: b64(bytes(range(256)) * 8),
    "invalid base64": lambda: "iVBORw0KGgo%%%%***",
    "empty after prefix": lambda: "data:image/png;base64,",
    "text not image": lambda: b64(b"<svg xmlns='http://www.w3.org/2000/svg'/>"),
}

CONVERTIBLE: dict[str, Callable[[], str]] = {
    "palette png": lambda: b64(_encode(scene().convert("P"), "PNG")),
    "16-bit png": lambda: b64(sixteen_bit()),
    "cmyk jpeg": lambda: b64(_encode(scene().convert("CMYK"), "JPEG")),
    "grayscale jpeg": lambda: b64(_encode(scene().convert("L"), "JPEG")),
    "animated webp": lambda: b64(animated("WEBP")),
    "animated png": lambda: b64(animated("PNG")),
    "rgba webp": lambda: b64(_encode(scene().convert("RGBA"), "WEBP")),
}


def _original(path: str, field: str) -> Callable[[TestClient, str], Any]:
    def send(client: TestClient, image: str) -> Any:
        fields = {"prompt": "x", "num_inference_steps": "2", "strength": "0.5", "init_image": png_b64(scene())}
        if path == "/masking":
            fields["mask_image"] = png_b64(half_mask())
        return client.post(path, data={**fields, field: image})

    return send


def _jobs(task: str, field: str) -> Callable[[TestClient, str], Any]:
    def send(client: TestClient, image: str) -> Any:
        body = {"prompt": "x", "steps": 2, "strength": 0.5, "task": task, "init_image": png_b64(scene())}
        if task == "inpaint":
            body["mask_image"] = png_b64(half_mask())
        response = client.post("/v1/jobs", json={**body, field: image})
        if response.status_code == 202:  # valid input: wait for the job to finish
            job_id = response.json()["id"]
            client.app.state.scheduler.get(job_id).wait(60)  # type: ignore[attr-defined]
            response = client.get(f"/v1/jobs/{job_id}")
        return response

    return send


def _openai(path: str, field: str) -> Callable[[TestClient, str], Any]:
    def send(client: TestClient, image: str) -> Any:
        try:
            raw = base64.b64decode(image.split(",")[-1], validate=True)
        except ValueError:
            raw = image.encode()  # multipart carries bytes: send the broken text as the file
        files = {"image": ("image.png", _encode(scene().convert("RGBA"), "PNG"), "image/png")}
        if field == "mask":
            files["mask"] = ("mask.png", raw, "image/png")
        else:
            files["image"] = ("image.png", raw, "image/png")
        data = {"prompt": "x", "steps": "2", "response_format": "b64_json", "size": f"{SIZE}x{SIZE}"}
        response = client.post(path, data=data, files=files)
        return response

    return send


def _a1111(field: str) -> Callable[[TestClient, str], Any]:
    def send(client: TestClient, image: str) -> Any:
        body: dict[str, Any] = {"prompt": "x", "steps": 2, "init_images": [png_b64(scene())]}
        body.update(denoising_strength=0.5, width=SIZE, height=SIZE)
        if field == "mask":
            body["mask"] = image
        else:
            body["init_images"] = [image]
        return client.post("/sdapi/v1/img2img", json=body)

    return send


IMAGE_FIELDS: dict[str, Callable[[TestClient, str], Any]] = {
    "original /img2img init_image": _original("/img2img", "init_image"),
    "original /masking init_image": _original("/masking", "init_image"),
    "original /masking mask_image": _original("/masking", "mask_image"),
    "jobs img2img init_image": _jobs("img2img", "init_image"),
    "jobs inpaint init_image": _jobs("inpaint", "init_image"),
    "jobs inpaint mask_image": _jobs("inpaint", "mask_image"),
    "openai edits image": _openai("/v1/images/edits", "image"),
    "openai edits mask": _openai("/v1/images/edits", "mask"),
    "openai variations image": _openai("/v1/images/variations", "image"),
    "a1111 img2img init_images": _a1111("init_images"),
    "a1111 img2img mask": _a1111("mask"),
}


def message_of(response: Any) -> str:
    """The error text in any protocol's shape (original, /v1, A1111's 422 detail list)."""
    return response.text


@pytest.mark.parametrize("field", IMAGE_FIELDS)
def test_hostile_images_are_4xx_naming_the_field(client: TestClient, field: str) -> None:
    send = IMAGE_FIELDS[field]
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for name, make in HOSTILE.items():
        response = send(client, make())
        assert 400 <= response.status_code < 500, (field, name, response.status_code, response.text[:300])
        assert field.split()[-1] in message_of(response), (field, name, message_of(response))
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert peak_after - peak_before < 200, f"peak RSS grew {peak_after - peak_before:.0f} MB"


# An OpenAI mask must carry alpha (its transparent pixels are repainted): opaque ones are refused.
CONVERTED_FIELDS = [field for field in IMAGE_FIELDS if field != "openai edits mask"]


@pytest.mark.parametrize("field", CONVERTED_FIELDS)
def test_unusual_valid_images_are_converted_and_served(client: TestClient, field: str) -> None:
    send = IMAGE_FIELDS[field]
    for name, make in CONVERTIBLE.items():
        response = send(client, make())
        assert response.status_code == 200, (field, name, response.text[:300])
        body = response.json()
        images = body.get("images") or body.get("data") or []
        assert images, (field, name, body)
        first = images[0]
        encoded = first if isinstance(first, str) else first.get("base64") or first.get("b64_json")
        decoded = Image.open(io.BytesIO(base64.b64decode(encoded)))
        assert decoded.size == (SIZE, SIZE)
