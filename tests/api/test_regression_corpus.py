"""Regression corpus (issue 18): every input class found by trying to break the server, sent to every
protocol it applies to. Each case is one member of its class; the parametrisation is the class.

Items (the issue's numbers): 1 deep JSON; 2 png-info on hostile PNGs; 3, 4, 6, 7 sizes: requested
sizes, sizes from input images, and pixels refused from headers before anything is decoded or
resized; 5, 8 A1111's options: known names, typed and bounded; 9 empty keys; 10 a reused
Idempotency-Key; 12 413 for chunked bodies; 13 A1111's image counts; 14 fields we recognise are
honoured or said to be ignored; 15 links and Host; 16 keys as tenants; 17 no paths but to the admin;
19 webhooks signed and kept off private addresses. (11 and 18 belong to the CLI's tests.)
Schemathesis (item 20) runs in test_schema_fuzz.py.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageFile, PngImagePlugin

from sdserver.api.a1111.options import DEFAULTS as A1111_DEFAULTS
from sdserver.api.jobs import webhooks
from sdserver.core.errors import ConfigError
from sdserver.core.limits import Limits
from sdserver.settings import load_settings
from tests.api.test_bad_images import huge_text_chunk, png_claiming
from tests.conftest import ClientFactory, LiveServer, spying, wait_until

# Small limits, so that every size class is cheap to reach and valid requests stay cheap to run.
LIMITS = Limits(max_images=4, max_steps=4, max_side=128, max_pixels=128 * 64, max_input_pixels=256 * 256)
MAX_BODY_MB = 1.0


def png(size: tuple[int, int], mode: str = "RGB") -> bytes:
    """A picture of `size` (drawn, not resized: the tests count the server's resizes)."""
    image = Image.new("RGB", size, (200, 30, 30))
    image.paste((30, 200, 30), (size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4))
    buffer = io.BytesIO()
    image.convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def one_bit_png(side: int) -> bytes:
    """A real side x side 1-bit PNG: a few KB on the wire, side² bytes once decoded (and 3x as RGB)."""
    row = b"\x00" + b"\x00" * (side // 8)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = _chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def message(response: httpx.Response) -> str:
    return response.text


def assert_refused(response: httpx.Response, *words: str) -> None:
    """A 4xx (never a 5xx) whose message names the field."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    for word in words:
        assert word in message(response), (word, response.text[:300])


@pytest.fixture(scope="module")
def live(tiny_model: Path) -> Iterator[LiveServer]:
    mine = {"model_path": str(tiny_model), "ui_label": "Mine", "url_path": "mine"}
    server = LiveServer(model=str(tiny_model), limits=LIMITS, max_body_mb=MAX_BODY_MB, custom_models=[mine]).start()
    yield server
    server.stop()


@pytest.fixture
def http(live: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live.url, timeout=120) as client:
        yield client


class PixelSpy:
    """Counts pixel decodes and resizes anywhere in the process (the server runs in this process)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.decodes = self.resizes = 0
        real_load, real_resize = ImageFile.ImageFile.load, Image.Image.resize

        def load(image: Any) -> Any:
            self.decodes += 1
            return real_load(image)

        def resize(image: Any, *args: Any, **kwargs: Any) -> Any:
            self.resizes += 1
            return real_resize(image, *args, **kwargs)

        monkeypatch.setattr(ImageFile.ImageFile, "load", load)
        monkeypatch.setattr(Image.Image, "resize", resize)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> PixelSpy:
    return PixelSpy(monkeypatch)


# --- 1. deep JSON: every route that reads JSON answers 400 (A1111: 422), never a RecursionError ---------

JSON_ROUTES = [
    "/txt2img", "/img2img", "/masking", "/v1/jobs", "/v1/images/generations", "/sdapi/v1/txt2img",
    "/sdapi/v1/img2img", "/sdapi/v1/options", "/sdapi/v1/png-info", "/png-info",
]  # fmt: skip


def _deep(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"a": [value]}
    return value


DEEP_BODIES = {
    "5000 nested lists": "[" * 5000 + "]" * 5000,
    "5000 unclosed lists": "[" * 5000,
    "5000 nested objects": '{"a":' * 5000 + "1" + "}" * 5000,
    "too deep inside a field": json.dumps({"prompt": "x", "override_settings": _deep(40), "image": _deep(40)}),
}


@pytest.mark.parametrize("route", JSON_ROUTES)
@pytest.mark.parametrize("body", DEEP_BODIES)
def test_1_deep_json_is_a_4xx_naming_the_body(http: httpx.Client, route: str, body: str) -> None:
    response = http.post(route, content=DEEP_BODIES[body], headers={"content-type": "application/json"})
    assert_refused(response, "JSON")


# --- 2. png-info: hostile PNGs are a 4xx, hostile metadata is read as text; never a 500 --------------


def png_with_text(**chunks: str) -> bytes:
    info = PngImagePlugin.PngInfo()
    for key, text in chunks.items():
        info.add_text(key, text)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


HOSTILE_PNGS = {
    "decompression bomb (header)": png_claiming(60000, 60000),
    "past the decode cap": png_claiming(9000, 9000),
    "huge zTXt chunk": huge_text_chunk(),
    "not an image": b"GIF89a no",
}
HOSTILE_METADATA = {
    "bad escape": png_with_text(parameters='a cat\nSteps: 20, Foo: "\\q", Seed: 1'),
    "unclosed quote": png_with_text(parameters='a cat\nSteps: 20, Foo: "abc'),
    "numbers that are not": png_with_text(parameters="x\nSteps: nan, CFG scale: 1e999, Seed: " + "9" * 5000),
    "deep parameters_json": png_with_text(parameters_json="[" * 5000 + "]" * 5000),
    "parameters_json too deep to echo": png_with_text(parameters_json=json.dumps(_deep(300))),
    "parameters_json with NaN": png_with_text(parameters_json='{"seed": NaN}'),
    "parameters_json not an object": png_with_text(parameters_json="[1, 2]"),
}


@pytest.mark.parametrize("route", ["/png-info", "/sdapi/v1/png-info"])
@pytest.mark.parametrize("case", HOSTILE_PNGS)
def test_2_hostile_pngs_are_a_4xx_naming_the_image(http: httpx.Client, spy: PixelSpy, route: str, case: str) -> None:
    assert_refused(http.post(route, json={"image": b64(HOSTILE_PNGS[case])}), "image")
    assert spy.decodes == 0, "png-info reads header chunks only"


@pytest.mark.parametrize("route", ["/png-info", "/sdapi/v1/png-info"])
@pytest.mark.parametrize("case", HOSTILE_METADATA)
def test_2_hostile_metadata_is_read_as_text(http: httpx.Client, route: str, case: str) -> None:
    response = http.post(route, json={"image": b64(HOSTILE_METADATA[case])})
    assert response.status_code == 200, response.text[:300]
    body = response.json()
    assert body["parameters_json"] is None or isinstance(body["parameters_json"], dict)
    if case == "bad escape":
        assert body["parameters"]["Foo"] == '"\\q"' and body["parameters"]["Seed"] == 1


# --- 3, 4, 6, 7. sizes: what is requested, and what an input image implies, on every protocol -----------

Sender = Callable[[httpx.Client, Any, Any], httpx.Response]


def _multipart_image(raw: bytes, name: str = "image") -> dict[str, tuple[str, bytes, str]]:
    return {name: (f"{name}.png", raw, "image/png")}


ORIGINAL = {"prompt": "x", "num_inference_steps": 2}
JOBS = {"prompt": "x", "steps": 2}
OPENAI = {"prompt": "x", "steps": 2}
A1111 = {"prompt": "x", "steps": 2}
INIT = png((64, 64))

REQUESTED: dict[str, Sender] = {
    "original /txt2img": lambda c, w, h: c.post("/txt2img", data={**ORIGINAL, "width": w, "height": h}),
    "jobs txt2img": lambda c, w, h: c.post("/v1/jobs", json={**JOBS, "width": w, "height": h}),
    "jobs img2img": lambda c, w, h: c.post(
        "/v1/jobs", json={**JOBS, "task": "img2img", "init_image": b64(INIT), "width": w, "height": h}
    ),
    "a1111 txt2img": lambda c, w, h: c.post("/sdapi/v1/txt2img", json={**A1111, "width": w, "height": h}),
    "a1111 img2img": lambda c, w, h: c.post(
        "/sdapi/v1/img2img", json={**A1111, "init_images": [b64(INIT)], "width": w, "height": h}
    ),
    "openai generations": lambda c, w, h: c.post("/v1/images/generations", json={**OPENAI, "size": f"{w}x{h}"}),
    "openai edits": lambda c, w, h: c.post(
        "/v1/images/edits", data={**OPENAI, "size": f"{w}x{h}"}, files=_multipart_image(INIT)
    ),
    "openai variations": lambda c, w, h: c.post(
        "/v1/images/variations", data={"steps": 2, "size": f"{w}x{h}"}, files=_multipart_image(INIT)
    ),
}
BAD_SIZES = {
    "zero width": (0, 64),
    "zero height": (64, 0),
    "both zero": (0, 0),  # was OpenAI's "auto"
    "not a multiple of 8": (65, 64),
    "one past a multiple of 8": (64, 65),  # was silently 64 on OpenAI's edits
    "negative": (64, -8),
    "past any integer type": (1180591620717411303424, 64),  # was an OverflowError
    "past 20 digits": (64, 99999999999999999999),
    "past max_side": (136, 64),
    "past max_pixels": (128, 128),
    "far past memory": (12000, 12000),  # was 909 MB allocated before the 422
}


@pytest.mark.parametrize("route", REQUESTED)
@pytest.mark.parametrize("size", BAD_SIZES)
def test_3_4_7_bad_requested_sizes_are_refused_before_any_pixel(
    http: httpx.Client, spy: PixelSpy, route: str, size: str
) -> None:
    response = REQUESTED[route](http, *BAD_SIZES[size])
    assert_refused(
        response, "size" if route.startswith("openai") else ("width" if "height" not in message(response) else "height")
    )
    assert (spy.decodes, spy.resizes) == (0, 0), "refused after touching pixels"


ImageSender = Callable[[httpx.Client, bytes], httpx.Response]
MASK = png((64, 64), "L")

# Routes whose output size comes from the init image (no size sent), by the image field's name.
FROM_IMAGE: dict[str, tuple[ImageSender, str]] = {
    "original /img2img": (lambda c, raw: c.post("/img2img", data={**ORIGINAL, "init_image": b64(raw)}), "init_image"),
    "original /masking": (
        lambda c, raw: c.post("/masking", data={**ORIGINAL, "init_image": b64(raw), "mask_image": b64(MASK)}),
        "init_image",
    ),
    "jobs img2img": (
        lambda c, raw: c.post("/v1/jobs", json={**JOBS, "task": "img2img", "init_image": b64(raw)}),
        "init_image",
    ),
    "jobs inpaint": (
        lambda c, raw: c.post(
            "/v1/jobs", json={**JOBS, "task": "inpaint", "init_image": b64(raw), "mask_image": b64(MASK)}
        ),
        "init_image",
    ),
    "openai edits": (lambda c, raw: c.post("/v1/images/edits", data=OPENAI, files=_multipart_image(raw)), "image"),
    "openai variations": (
        lambda c, raw: c.post("/v1/images/variations", data={"steps": 2}, files=_multipart_image(raw)),
        "image",
    ),
}
BAD_IMAGES = {
    "past max_side": png((136, 8)),  # was a 136x8 output (2056x8 past 2048 by default)
    "past max_pixels": png((128, 128)),
    "8000x8000 1-bit in a few KB": one_bit_png(8000),  # was +304 MB of RSS
    "60000x60000 header": png_claiming(60000, 60000),
}


@pytest.mark.parametrize("route", FROM_IMAGE)
@pytest.mark.parametrize("image", BAD_IMAGES)
def test_6_7_sizes_from_input_images_get_the_same_limits_before_any_pixel(
    http: httpx.Client, spy: PixelSpy, route: str, image: str
) -> None:
    send, field = FROM_IMAGE[route]
    assert_refused(send(http, BAD_IMAGES[image]), field)
    assert (spy.decodes, spy.resizes) == (0, 0), "refused after touching pixels"


# Every image field, with an image too large to decode at all (whatever the size sent).
IMAGE_FIELDS: dict[str, tuple[ImageSender, str]] = {
    **FROM_IMAGE,
    "original /masking mask": (
        lambda c, raw: c.post("/masking", data={"prompt": "x", "init_image": b64(MASK), "mask_image": b64(raw)}),
        "mask_image",
    ),
    "jobs inpaint mask": (
        lambda c, raw: c.post(
            "/v1/jobs", json={"prompt": "x", "task": "inpaint", "init_image": b64(MASK), "mask_image": b64(raw)}
        ),
        "mask_image",
    ),
    "openai edits mask": (
        lambda c, raw: c.post(
            "/v1/images/edits", data={"prompt": "x"}, files={**_multipart_image(MASK), **_multipart_image(raw, "mask")}
        ),
        "mask",
    ),
    "a1111 img2img": (
        lambda c, raw: c.post(
            "/sdapi/v1/img2img", json={"prompt": "x", "init_images": [b64(raw)], "width": 64, "height": 64}
        ),
        "init_images",
    ),
    "a1111 img2img mask": (
        lambda c, raw: c.post(
            "/sdapi/v1/img2img",
            json={"prompt": "x", "init_images": [b64(MASK)], "mask": b64(raw), "width": 64, "height": 64},
        ),
        "mask",
    ),
}


@pytest.mark.parametrize("route", IMAGE_FIELDS)
def test_7_an_input_image_past_max_input_pixels_is_refused_from_its_header(
    http: httpx.Client, spy: PixelSpy, route: str
) -> None:
    send, field = IMAGE_FIELDS[route]
    assert_refused(send(http, one_bit_png(8000)), field, "65536 pixels")
    assert (spy.decodes, spy.resizes) == (0, 0)


def _output_size(response: httpx.Response, http: httpx.Client) -> tuple[int, int]:
    assert response.status_code in (200, 202), response.text[:300]
    body = response.json()
    if "id" in body:  # a job: wait for it
        wait_until(lambda: http.get(f"/v1/jobs/{body['id']}").json()["status"] not in ("queued", "running"))
        body = http.get(f"/v1/jobs/{body['id']}").json()
    images = body.get("images") or body.get("data")
    assert images, body
    first = images[0] if isinstance(images[0], str) else images[0].get("base64") or images[0].get("b64_json")
    return Image.open(io.BytesIO(base64.b64decode(first))).size


@pytest.mark.parametrize("route", FROM_IMAGE)
def test_6_every_protocol_rounds_an_image_size_down_to_a_multiple_of_8(http: httpx.Client, route: str) -> None:
    send, _ = FROM_IMAGE[route]
    assert _output_size(send(http, png((80, 50))), http) == (80, 48)


@pytest.mark.parametrize(
    ("route", "fields", "expected"),
    [
        ("jobs", {"width": 32, "height": 64}, (32, 64)),  # the jobs API ignored a width sent with an image
        ("jobs", {"width": 32}, (32, 16)),  # one side: the other keeps the image's aspect
        ("a1111", {"width": 64, "height": 32}, (64, 32)),
        ("openai", {"size": "32x64"}, (32, 64)),
    ],
)
def test_6_a_size_sent_with_an_init_image_is_the_size_generated(
    http: httpx.Client, route: str, fields: dict[str, Any], expected: tuple[int, int]
) -> None:
    init = png((64, 32))
    if route == "jobs":
        response = http.post("/v1/jobs", json={**JOBS, "task": "img2img", "init_image": b64(init), **fields})
    elif route == "a1111":
        response = http.post(
            "/sdapi/v1/img2img", json={"prompt": "x", "steps": 2, "init_images": [b64(init)], **fields}
        )
    else:
        response = http.post("/v1/images/edits", data={**OPENAI, **fields}, files=_multipart_image(init))
    assert _output_size(response, http) == expected


# --- 5, 8. A1111's options: known names only, each value checked by type when set ---------------------


def _wrong_value(default: Any) -> Any:
    """A value of another type than the option's default."""
    if isinstance(default, str | type(None)):
        return 12345
    return "not a " + type(default).__name__ if not isinstance(default, list) else {"a": 1}


@pytest.mark.parametrize("name", sorted(A1111_DEFAULTS))
def test_5_every_option_refuses_a_value_of_another_type(http: httpx.Client, name: str) -> None:
    response = http.post("/sdapi/v1/options", json={name: _wrong_value(A1111_DEFAULTS[name])})
    assert_refused(response, name)


@pytest.mark.parametrize("value", ["abc", [1], {}, 1.5, 10**12, None])
def test_5_a_bad_preview_interval_is_refused_and_progress_keeps_working(
    http: httpx.Client, live: LiveServer, value: Any
) -> None:
    assert_refused(http.post("/sdapi/v1/options", json={"show_progress_every_n_steps": value}), "show_progress")
    scheduler = live.app.state.scheduler
    wait_until(lambda: all(job.done for job in scheduler.jobs.all()))  # the previous case's job is not caught
    with spying(live.app) as gated:
        gated.gate.clear()
        job = http.post("/v1/jobs", json={"prompt": "x", "width": 64, "height": 64, "steps": 2}).json()
        assert gated.entered.wait(60)
        progress = http.get("/sdapi/v1/progress")
        assert progress.status_code == 200 and progress.json()["state"]["job"] == f"job {job['id']}"


@pytest.mark.parametrize(
    "values",
    [
        {"no_such_option": 1},
        {f"key{i}": i for i in range(20000)},  # was 112 MB of RSS and a 102 MB GET
        {"CLIP_stop_at_last_layers": 2, "unknown": True},  # one unknown name refuses the whole update
    ],
    ids=["one unknown", "20k unknown", "known and unknown"],
)
def test_8_unknown_option_names_are_refused_and_the_table_never_grows(
    http: httpx.Client, values: dict[str, Any]
) -> None:
    before = http.get("/sdapi/v1/options").json()
    assert_refused(http.post("/sdapi/v1/options", json=values), "not an AUTOMATIC1111 option")
    after = http.get("/sdapi/v1/options").json()
    assert after == before and len(after) == len(A1111_DEFAULTS)
    assert_refused(
        http.post("/sdapi/v1/txt2img", json={"prompt": "x", "override_settings": values}), "override_settings."
    )


def test_8_known_options_are_kept_typed_and_echoed(http: httpx.Client) -> None:
    assert http.post("/sdapi/v1/options", json={"send_seed": False, "jpeg_quality": "90"}).status_code == 200
    echoed = http.get("/sdapi/v1/options").json()
    assert (echoed["send_seed"], echoed["jpeg_quality"]) == (False, 90)
    http.post("/sdapi/v1/options", json={"send_seed": True, "jpeg_quality": 80})


# --- 9. an empty or blank key stops start-up, from every source ---------------------------------------


@pytest.mark.parametrize("source", ["argument", "environment", "config.json"])
@pytest.mark.parametrize("keys", [[""], [" "], ["good", ""], ["name:"], ["name: "], "", "a,,b", "a,"])
@pytest.mark.parametrize("field", ["api_keys", "admin_keys"])
def test_9_an_empty_key_stops_start_up_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, keys: Any, field: str
) -> None:
    config = tmp_path / "config.json"
    config.write_text("{}")
    overrides: dict[str, Any] = {"model": "demo"}
    if source == "argument":
        overrides[field] = keys
    elif source == "environment":
        monkeypatch.setenv(f"SDSERVER_{field.upper()}", keys if isinstance(keys, str) else ",".join(keys))
    else:
        config.write_text(json.dumps({field: keys}))
    with pytest.raises(ConfigError) as error:
        load_settings(config, **overrides)
    assert "\n" not in error.value.message and "empty or blank" in error.value.message


@pytest.mark.parametrize("header", ["Bearer", "Bearer ", "Bearer  ", "Basic ", "Basic Og==", ""])
def test_9_an_empty_credential_never_matches(make_client: ClientFactory, tiny_model: Path, header: str) -> None:
    client = make_client(model=str(tiny_model), api_keys=["k"], api_auth=["u:p"])
    assert client.get("/v1/queue", headers={"Authorization": header} if header else {}).status_code == 401


# --- 10. a reused Idempotency-Key with another body is an error naming the key -------------------------


def test_10_idempotency_key_reused_with_another_body(http: httpx.Client) -> None:
    job = {"prompt": "same", "width": 64, "height": 64, "steps": 2, "seed": 3}
    first = http.post("/v1/jobs", json=job, headers={"Idempotency-Key": "k-10"})
    reordered = http.post("/v1/jobs", content=json.dumps(dict(reversed(job.items()))), headers={
        "Idempotency-Key": "k-10", "content-type": "application/json"})  # fmt: skip
    assert first.json()["id"] == reordered.json()["id"]  # the same request, however it is spelt
    for changed in ({"prompt": "other"}, {"seed": 4}, {"steps": 3}, {"preview_every": 1}):
        response = http.post("/v1/jobs", json={**job, **changed}, headers={"Idempotency-Key": "k-10"})
        assert response.status_code == 422, response.text
        assert (
            "Idempotency-Key" in response.json()["error"]["message"] and "'k-10'" in response.json()["error"]["message"]
        )


# --- 12. bodies over the limit get 413 on every route, chunked or not -----------------------------------


def _post_routes(live: LiveServer) -> list[str]:
    """Every route that takes a request body (the others never read one)."""
    paths = {path: ops for path, ops in live.app.openapi()["paths"].items() if "requestBody" in ops.get("post", {})}
    return sorted(
        path.replace("{url_path}", "mine").replace("{name}", "tiny") for path, ops in paths.items() if "post" in ops
    )


BIG = 4 * int(MAX_BODY_MB * 1e6)


def _bodies() -> dict[str, tuple[str, bytes]]:
    boundary = "xyzzy"
    filler = b"A" * BIG
    multipart = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + filler
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return {
        "json": ("application/json", b'{"prompt": "' + filler + b'"}'),
        "form": ("application/x-www-form-urlencoded", b"prompt=" + filler),
        "multipart": (f"multipart/form-data; boundary={boundary}", multipart),
    }


def _chunks(data: bytes, size: int = 8192) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


@pytest.mark.parametrize("kind", ["json", "form", "multipart"])
@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "content-length"])
def test_12_a_body_over_the_limit_is_413_on_every_route(live: LiveServer, kind: str, chunked: bool) -> None:
    content_type, data = _bodies()[kind]
    for route in _post_routes(live):
        with httpx.Client(base_url=live.url, timeout=60) as client:  # a fresh connection: 413 closes it
            content: Any = _chunks(data) if chunked else data
            response = client.post(route, content=content, headers={"content-type": content_type})
        assert response.status_code == 413, (route, response.status_code, response.text[:200])
        assert "over the limit" in response.text


# --- 13. A1111 counts images as batch_size x n_iter, each at least 1 ----------------------------------


@pytest.mark.parametrize("route", ["txt2img", "img2img"])
@pytest.mark.parametrize(
    ("batch_size", "n_iter", "field"),
    [
        (-2, -4, "batch_size"),
        (0, 1, "batch_size"),
        (1, 0, "n_iter"),
        (-1, 1, "batch_size"),
        (1, -3, "n_iter"),
        (3, 2, "batch_size"),
        (2**40, 2**40, "batch_size"),
    ],
)
def test_13_image_counts_are_positive_and_within_the_limit(
    http: httpx.Client, route: str, batch_size: int, n_iter: int, field: str
) -> None:
    body = {"prompt": "x", "batch_size": batch_size, "n_iter": n_iter, "width": 64, "height": 64}
    if route == "img2img":
        body["init_images"] = [b64(png((64, 64)))]
    response = http.post(f"/sdapi/v1/{route}", json=body)
    assert response.status_code == 422, response.text[:300]
    assert response.json()["detail"][0]["loc"] == ["body", field]


# --- 14. fields we recognise are honoured, or the client is told ---------------------------------------

ORIGINAL_ROUTES = ["/txt2img", "/img2img", "/masking"]


def _original(route: str, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"prompt": "x", "num_inference_steps": 2, "seed": 5, "width": 64, "height": 64}
    if route != "/txt2img":
        base["init_image"] = b64(png((64, 64)))
    if route == "/masking":
        base["mask_image"] = b64(png((64, 64), "L"))
    return {**base, **fields}


@pytest.mark.parametrize("route", ORIGINAL_ROUTES)
@pytest.mark.parametrize(
    ("field", "value"), [("sampler", "nope"), ("clip_skip", 0), ("clip_skip", 13), ("clip_skip", "x")]
)
def test_14_the_original_api_refuses_a_bad_sampler_or_clip_skip(
    http: httpx.Client, route: str, field: str, value: Any
) -> None:
    assert_refused(http.post(route, data=_original(route, **{field: value})), field)


@pytest.mark.parametrize("route", ORIGINAL_ROUTES)
def test_14_the_original_api_honours_sampler_and_clip_skip(http: httpx.Client, route: str) -> None:
    response = http.post(route, data=_original(route, sampler="euler a", clip_skip=2))
    assert response.status_code == 200, response.text[:300]
    png_bytes = base64.b64decode(response.json()["images"][0]["base64"])
    infotext = Image.open(io.BytesIO(png_bytes)).info["parameters"]
    assert "Sampler: Euler a" in infotext and "Clip skip: 2" in infotext


def _access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [json.loads(record.getMessage()) for record in caplog.records if record.name == "sdserver.access"]


def test_14_fields_not_taken_are_said_to_be_ignored(http: httpx.Client, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="sdserver.access"):
        http.post(
            "/txt2img", data={"prompt": "x", "num_inference_steps": 2, "width": 64, "height": 64, "colour": "red"}
        )
        http.post("/v1/images/generations", json={"prompt": "x", "size": "64x64", "steps": 2, "quality": "hd"})
        edit = {**OPENAI, "quality": "hd", "colour": "red"}
        http.post("/v1/images/edits", data=edit, files=_multipart_image(png((64, 64))))
        # each access line is written once its response has gone out: wait for the last one
        wait_until(lambda: len(_access_lines(caplog)) >= 3)
    lines = _access_lines(caplog)
    assert lines[0]["ignored_fields"] == ["colour"] and lines[1]["ignored_openai"] == ["quality"]
    assert (lines[2]["ignored_fields"], lines[2]["ignored_openai"]) == (["colour"], ["quality"])
    sent = {"tiling": True, "hr_scale": 2, "restore_faces": False, "override_settings": {"samples_format": "jpg"}}
    a1111 = http.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "width": 64, "height": 64, **sent})
    assert a1111.status_code == 200, a1111.text
    notes = json.loads(a1111.json()["info"])["notes"]
    assert "tiling is not supported and was ignored" in notes  # (enable_hr is honoured now: issue 17)
    assert not any("hr_scale" in note or "restore_faces" in note for note in notes)  # off, or tuning what is off
    assert any("override_settings.samples_format" in note for note in notes)


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/txt2img", {"seed": 0}),
        ("/txt2img", {"seed": -1}),
        ("/sdapi/v1/txt2img", {"seed": -1}),
        ("/sdapi/v1/txt2img", {"seed": 0}),
        ("/v1/images/generations", {"seed": 0, "size": "64x64"}),
    ],
)
def test_seed_0_and_minus_1_mean_random_on_every_protocol_but_jobs(
    http: httpx.Client, route: str, body: dict[str, Any]
) -> None:
    fields = {"prompt": "x", "width": 64, "height": 64, "num_inference_steps": 2, "steps": 2, **body}
    if route.startswith("/v1/"):
        fields = {"prompt": "x", "steps": 2, **body}
    response = http.post(route, json=fields)
    assert response.status_code == 200, response.text[:300]
    data = response.json()
    seed = data["images"][0]["seed"] if "images" in data and route == "/txt2img" else None
    seed = (
        seed if seed is not None else (json.loads(data["info"])["seed"] if "info" in data else data["data"][0]["seed"])
    )
    assert seed > 0


# --- 15. links come from --public-url or the bound address, never from Host; Host is checked ------------


def test_15_links_use_the_bound_address_whatever_the_host_header(http: httpx.Client, live: LiveServer) -> None:
    body = {"prompt": "x", "size": "64x64", "steps": 2, "response_format": "url"}
    response = http.post("/v1/images/generations", json=body, headers={"Host": "evil.example:666"})
    url = response.json()["data"][0]["url"]
    assert url.startswith(f"{live.url}/v1/images/files/"), url
    assert http.get(url).status_code == 200


def test_15_links_use_public_url_when_set(make_client: ClientFactory, tiny_model: Path) -> None:
    client = make_client(model=str(tiny_model), public_url="https://sd.example.com/base/")
    body = {"prompt": "x", "size": "64x64", "steps": 2, "response_format": "url"}
    url = client.post("/v1/images/generations", json=body, headers={"Host": "evil.example"}).json()["data"][0]["url"]
    assert url.startswith("https://sd.example.com/base/v1/images/files/"), url


@pytest.fixture(scope="module")
def lan_client(tiny_model: Path) -> Iterator[TestClient]:
    """A server listening beyond localhost (the socket is never bound: TestClient calls the app)."""
    from sdserver.api.app import create_app
    from sdserver.settings import Settings

    settings = Settings(model=str(tiny_model), host="0.0.0.0", allowed_hosts=["gpu.lan", "*.example.org"])
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("evil.example", False),  # a page rebinding its own name to this server
        ("evil.example:1337", False),
        ("gpu.lan.evil.example", False),
        ("sd.example.org.evil", False),
        ("192.168.1.20:1337", True),  # any address: rebinding pages cannot send one as Host
        ("[fd00::1]:1337", True),
        ("localhost:1337", True),
        ("gpu.lan", True),  # --allowed-host
        ("GPU.LAN:1337", True),
        ("box.example.org", True),  # *.example.org
    ],
)
def test_15_beyond_localhost_only_known_host_names_are_served(lan_client: TestClient, host: str, allowed: bool) -> None:
    response = lan_client.get("/v1/models", headers={"Host": host})
    if allowed:
        assert response.status_code == 200, response.text
    else:
        assert response.status_code == 400 and "allowed-host" in response.json()["error"]["message"]


# --- 16. keys are tenants; 17. paths only for the admin -------------------------------------------------

KEYS = {"alice": "alice-secret", "bob": "bob-secret", "plain": "plain-secret", "admin": "root-secret"}


def auth(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[who]}"}


@pytest.fixture(scope="module")
def tenants(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    from sdserver.api.app import create_app
    from sdserver.settings import Settings

    loras = tmp_path_factory.mktemp("loras")
    (loras / "ink.safetensors").write_bytes(b"{}")
    settings = Settings(
        model=str(tiny_model),
        api_keys=["alice:alice-secret", "bob:bob-secret", "plain-secret"],
        admin_keys=["root-secret"],
        loras_dir=str(loras),
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


def _job_of(client: TestClient, who: str) -> str:
    response = client.post("/v1/jobs", json={"prompt": "x", "width": 64, "height": 64, "steps": 2}, headers=auth(who))
    assert response.status_code == 202, response.text
    job_id = str(response.json()["id"])
    wait_until(lambda: client.get(f"/v1/jobs/{job_id}", headers=auth(who)).json()["status"] == "succeeded")
    return job_id


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/jobs/{id}"),
        ("DELETE", "/v1/jobs/{id}"),
        ("GET", "/v1/jobs/{id}/events"),
        ("GET", "/v1/jobs/{id}/images/0"),
    ],
)
def test_16_another_keys_job_is_not_found(tenants: TestClient, method: str, path: str) -> None:
    job_id = _job_of(tenants, "alice")
    url = path.format(id=job_id)
    for who in ("bob", "plain"):
        response = tenants.request(method, url, headers=auth(who))
        assert response.status_code == 404, (who, response.text)
    for who in ("alice", "admin"):
        assert tenants.request(method, url, headers=auth(who)).status_code == 200


def test_16_the_queue_lists_ones_own_jobs_and_the_admin_every_job(tenants: TestClient) -> None:
    mine, theirs = _job_of(tenants, "alice"), _job_of(tenants, "plain")
    listed = {who: {job["id"] for job in tenants.get("/v1/queue", headers=auth(who)).json()["jobs"]} for who in KEYS}
    assert mine in listed["alice"] and theirs not in listed["alice"]
    assert theirs in listed["plain"] and mine not in listed["plain"]
    assert {mine, theirs} <= listed["admin"] and not listed["bob"] & {mine, theirs}


def test_16_a_jobs_history_belongs_to_its_key(tenants: TestClient) -> None:
    job_id = _job_of(tenants, "alice")
    history = tenants.app.state.history  # type: ignore[attr-defined]
    wait_until(lambda: bool(tenants.get(f"/v1/jobs/{job_id}", headers=auth("alice")).json()["images"][0]["history_id"]))
    item = tenants.get(f"/v1/jobs/{job_id}", headers=auth("alice")).json()["images"][0]["history_id"]
    assert history.get(item).owner == "alice"
    for who, visible in (("alice", True), ("admin", True), ("bob", False), ("plain", False)):
        listed = {entry["id"] for entry in tenants.get("/v1/history", headers=auth(who)).json()["items"]}
        assert (item in listed) is visible, who
        for path in (f"/v1/history/{item}", f"/v1/history/{item}/image"):
            assert tenants.get(path, headers=auth(who)).status_code == (200 if visible else 404), (who, path)
    assert tenants.delete(f"/v1/history/{item}", headers=auth("bob")).status_code == 404


def test_16_a_plain_key_is_named_after_its_hash(tenants: TestClient) -> None:
    import hashlib

    job = tenants.app.state.scheduler.get(_job_of(tenants, "plain"))  # type: ignore[attr-defined]
    assert job.owner == "key-" + hashlib.sha256(b"plain-secret").hexdigest()[:8]


def test_16_the_same_idempotency_key_of_two_tenants_makes_two_jobs(tenants: TestClient) -> None:
    body = {"prompt": "x", "width": 64, "height": 64, "steps": 2}
    ids = [
        tenants.post("/v1/jobs", json=body, headers={**auth(who), "Idempotency-Key": "shared"}).json()["id"]
        for who in ("alice", "bob")
    ]
    assert ids[0] != ids[1]


def test_16_a1111_progress_and_interrupt_see_only_ones_own_run(tenants: TestClient) -> None:
    scheduler = tenants.app.state.scheduler  # type: ignore[attr-defined]
    wait_until(lambda: all(job.done for job in scheduler.jobs.all()))  # only alice's job will run
    with spying(tenants.app) as gated:
        gated.gate.clear()
        job_id = tenants.post(
            "/v1/jobs", json={"prompt": "x", "width": 64, "height": 64, "steps": 2}, headers=auth("alice")
        ).json()["id"]
        assert gated.entered.wait(60)
        assert tenants.get("/sdapi/v1/progress", headers=auth("bob")).json()["state"]["job"] == ""
        assert tenants.get("/sdapi/v1/progress", headers=auth("alice")).json()["state"]["job"] == f"job {job_id}"
        assert tenants.post("/sdapi/v1/interrupt", headers=auth("bob")).status_code == 200
        assert tenants.app.state.scheduler.get(job_id).cancel_requested is False  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/models/tiny/load", None),
        ("POST", "/models/tiny/unload", None),
        ("POST", "/models/refresh", None),
        ("POST", "/sdapi/v1/refresh-checkpoints", None),
        ("POST", "/sdapi/v1/options", {"CLIP_stop_at_last_layers": 2}),
    ],
)
def test_16_only_the_admin_manages_models_and_options(
    tenants: TestClient, method: str, path: str, body: dict[str, Any] | None
) -> None:
    for who in ("alice", "plain"):
        response = tenants.request(method, path, json=body, headers=auth(who))
        assert response.status_code == 403, (who, response.text)
        assert "admin" in response.text
    admin = tenants.request(method, path, json=body, headers=auth("admin"))
    assert admin.status_code in (200, 400), admin.text  # 400: the base model cannot be unloaded
    if body:
        tenants.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 1}, headers=auth("admin"))


@pytest.mark.parametrize(("route", "field"), [("/sdapi/v1/sd-models", "filename"), ("/sdapi/v1/loras", "path")])
def test_17_listings_show_file_names_and_paths_only_to_the_admin(tenants: TestClient, route: str, field: str) -> None:
    for who in ("alice", "plain"):
        for entry in tenants.get(route, headers=auth(who)).json():
            assert "/" not in entry[field] and "\\" not in entry[field], entry
    for entry in tenants.get(route, headers=auth("admin")).json():
        assert Path(entry[field]).is_absolute(), entry


def test_17_without_keys_nobody_sees_paths(http: httpx.Client) -> None:
    for entry in http.get("/sdapi/v1/sd-models").json():
        assert "/" not in entry["filename"], entry


# --- 19. webhooks: signed, and only to public addresses ---------------------------------------------------

SECRET = "whsec-test"


class Receiver:
    """A local HTTP server recording what it is sent."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        received = self.received

        class Hook(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                received.append((dict(self.headers), body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Hook)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.server.shutdown()


def test_19_deliveries_are_signed_and_verifiable(
    make_client: ClientFactory, tiny_model: Path, receiver: Receiver
) -> None:
    client = make_client(
        model=str(tiny_model), allow_webhooks=True, webhook_secret=SECRET, webhook_allowed_hosts=["127.0.0.1"]
    )
    body = {"prompt": "x", "width": 64, "height": 64, "steps": 2, "seed": 9, "webhook_url": receiver.url}
    created = client.post("/v1/jobs", json=body).json()
    wait_until(lambda: bool(receiver.received))
    headers, payload = receiver.received[0]
    signature = headers[webhooks.SIGNATURE_HEADER]
    assert webhooks.verify(SECRET, signature, payload)
    assert json.loads(payload)["id"] == created["id"]
    assert not webhooks.verify("another secret", signature, payload)
    assert not webhooks.verify(SECRET, signature, payload + b" ")
    timestamp = int(signature.split(",")[0].removeprefix("t="))
    assert not webhooks.verify(SECRET, signature, payload, now=timestamp + 301)  # a replay, later


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/hook",  # loopback, not in webhook_allowed_hosts here
        "http://localhost:9/hook",
        "http://[::1]:9/hook",
        "http://[::ffff:127.0.0.1]:9/hook",
        "http://0.0.0.0:9/hook",
        "http://169.254.169.254/latest/meta-data/",  # the cloud metadata endpoint
        "http://10.1.2.3/hook",
        "http://192.168.0.10/hook",
        "http://100.100.100.200/hook",  # shared address space (another cloud's metadata)
        "http://[fd00:ec2::254]/hook",
        "http://224.0.0.1/hook",
    ],
)
def test_19_private_targets_are_refused(make_client: ClientFactory, tiny_model: Path, url: str) -> None:
    client = make_client(model=str(tiny_model), allow_webhooks=True, webhook_secret=SECRET)
    response = client.post("/v1/jobs", json={"prompt": "x", "steps": 2, "webhook_url": url})
    assert response.status_code == 400, response.text
    assert "webhook_url" in response.json()["error"]["message"]
    assert client.app.state.scheduler.jobs.all() == []  # type: ignore[attr-defined]


def test_19_the_address_is_checked_again_at_delivery(monkeypatch: pytest.MonkeyPatch, receiver: Receiver) -> None:
    """DNS rebinding: the name is public when the job is submitted, loopback when it is delivered."""
    port = receiver.server.server_port
    answers = iter(["93.184.216.34", "127.0.0.1", "127.0.0.1", "127.0.0.1"])

    def rebinding(host: str, *args: Any, **kwargs: Any) -> list[Any]:
        import socket

        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port))]

    monkeypatch.setattr(webhooks.socket, "getaddrinfo", rebinding)
    sender = webhooks.WebhookSender(SECRET, frozenset(), attempts=2, timeout_s=5)
    url = f"http://rebind.test:{port}/hook"
    sender.check_target(url)  # public at submission
    assert sender.deliver(url, "{}") is False
    assert receiver.received == []


def test_19_the_readme_verifier_accepts_a_real_signature_and_nothing_else() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    block = next(code for code in readme.split("```python")[1:] if "def verified(" in code).split("```")[0]
    namespace: dict[str, Any] = {}
    exec(block, namespace)
    verified = namespace["verified"]
    body = b'{"id": "abc", "status": "succeeded"}'
    header = webhooks.sign(SECRET, body, int(time.time()))
    assert verified(SECRET, header, body)
    assert not verified("another secret", header, body)
    assert not verified(SECRET, header, body + b" ")
    assert not verified(SECRET, webhooks.sign(SECRET, body, int(time.time()) - 600), body)  # a replay
    assert not verified(SECRET, "garbage", body)
