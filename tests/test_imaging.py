"""Images in and out (`sdserver.imaging`): base64 decoding, format and size checks, RGB conversion."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from typing import Any

import pytest
from PIL import Image, ImageFile

from sdserver.imaging import (
    MAX_DECODE_PIXELS,
    b64decode,
    decode_image,
    encode_png,
    png_base64,
    strip_data_url,
    to_rgb,
)


def encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def pattern(size: int = 8) -> Image.Image:
    """A deterministic RGB picture whose PNG base64 holds '+', '/' and '=' padding."""
    return Image.frombytes("RGB", (size, size), bytes((i * 37) % 256 for i in range(size * size * 3)))


PATTERN_PNG = encode(pattern(), "PNG")
PATTERN_B64 = base64.b64encode(PATTERN_PNG).decode("ascii")


def same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and a.convert("RGB").tobytes() == b.convert("RGB").tobytes()


def close_to(actual: Any, expected: tuple[int, ...], tolerance: int) -> bool:
    return all(abs(x - y) <= tolerance for x, y in zip(actual, expected, strict=True))


# --- base64 and data URLs --------------------------------------------------------------------------


def test_the_sample_base64_exercises_plus_slash_and_padding() -> None:
    assert "+" in PATTERN_B64 and "/" in PATTERN_B64 and PATTERN_B64.endswith("=")


def test_plain_base64_decodes_to_the_original_bytes() -> None:
    assert b64decode(PATTERN_B64) == PATTERN_PNG


@pytest.mark.parametrize(
    "prefix",
    [
        "data:image/png;base64,",
        "data:image/jpeg;base64,",
        "data:image/jpg;base64,",
        "data:image/webp;base64,",
        "data:image/gif;base64,",
        "data:image/svg+xml;base64,",
        "data:image/x-icon;base64,",
        "data:application/octet-stream;base64,",
        "data:;base64,",
        "data:image/png;name=photo.png;base64,",
        "DATA:IMAGE/PNG;BASE64,",
    ],
)
def test_data_url_prefixes_of_any_type_are_stripped(prefix: str) -> None:
    assert strip_data_url(prefix + PATTERN_B64) == PATTERN_B64
    assert b64decode(prefix + PATTERN_B64) == PATTERN_PNG
    assert same_pixels(decode_image(prefix + PATTERN_B64), pattern())


def test_only_a_leading_data_url_prefix_is_stripped() -> None:
    with pytest.raises(ValueError, match="not valid base64"):
        b64decode(PATTERN_B64 + "data:image/png;base64,")


def test_surrounding_whitespace_and_line_breaks_are_ignored() -> None:
    wrapped = base64.encodebytes(encode(pattern(32), "PNG")).decode("ascii")  # MIME style: a newline every 76
    assert "\n" in wrapped.strip()

    assert same_pixels(decode_image(f"  \r\n{wrapped}\t\n"), pattern(32))


def test_spaces_from_form_encoding_are_read_as_plus_signs() -> None:
    damaged = PATTERN_B64.replace("+", " ")

    assert b64decode(damaged) == PATTERN_PNG
    assert b64decode("data:image/png;base64," + damaged) == PATTERN_PNG


def test_missing_padding_is_tolerated() -> None:
    unpadded = PATTERN_B64.rstrip("=")
    assert unpadded != PATTERN_B64

    assert b64decode(unpadded) == PATTERN_PNG


def test_url_safe_base64_is_accepted_with_or_without_padding() -> None:
    url_safe = base64.urlsafe_b64encode(PATTERN_PNG).decode("ascii")
    assert "-" in url_safe and "_" in url_safe

    assert b64decode(url_safe) == PATTERN_PNG
    assert b64decode(url_safe.rstrip("=")) == PATTERN_PNG
    assert same_pixels(decode_image(url_safe), pattern())


@pytest.mark.parametrize("text", ["not base64!", "a", "abcde", "####", "a=bc", "ab%2Bcd==", "Zm9v\x00YmFy"])
def test_invalid_base64_is_rejected_with_value_error(text: str) -> None:
    with pytest.raises(ValueError, match="not valid base64"):
        b64decode(text)
    with pytest.raises(ValueError, match="not valid base64"):
        decode_image(text)


def test_invalid_characters_in_url_safe_base64_are_rejected_too() -> None:
    with pytest.raises(ValueError, match="not valid base64"):
        b64decode("-_-_!!!!")


@pytest.mark.parametrize("value", [b"", "data:image/png;base64,", "   "])
def test_empty_image_data_is_rejected(value: str | bytes) -> None:
    with pytest.raises(ValueError, match="empty image"):
        decode_image(value)


# --- formats ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "params", "tolerance"),
    [("PNG", {}, 0), ("JPEG", {"quality": 95}, 8), ("WEBP", {"lossless": True}, 0), ("WEBP", {}, 12)],
)
@pytest.mark.parametrize("as_text", [False, True], ids=["bytes", "base64"])
def test_png_jpeg_and_webp_decode_to_rgb(fmt: str, params: dict[str, Any], tolerance: int, as_text: bool) -> None:
    source = Image.new("RGB", (24, 16), (200, 40, 90))
    data = encode(source, fmt, **params)

    image = decode_image(base64.b64encode(data).decode() if as_text else data)

    assert image.mode == "RGB"
    assert image.size == (24, 16)
    assert close_to(image.getpixel((12, 8)), (200, 40, 90), tolerance)


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF", "ICO", "PPM"])
def test_other_formats_are_rejected(fmt: str) -> None:
    data = encode(Image.new("RGB", (16, 16), (1, 2, 3)), fmt)

    with pytest.raises(ValueError, match=r"^not a PNG, JPEG or WebP image$"):
        decode_image(data)


def test_bytes_that_are_no_image_at_all_are_rejected() -> None:
    with pytest.raises(ValueError, match="not a PNG, JPEG or WebP image"):
        decode_image(b"GIF89a? no, just some text that is not an image")


def test_a_png_cut_off_in_its_pixel_data_is_rejected() -> None:
    with pytest.raises(ValueError, match="could not decode image"):
        decode_image(PATTERN_PNG[: len(PATTERN_PNG) // 2])


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_every_truncation_fails_with_value_error_or_still_holds_every_pixel(fmt: str) -> None:
    """Only the trailer (a PNG's checksums and IEND chunk) may go missing without an error."""
    data = encode(pattern(12), fmt)
    complete = decode_image(data)

    for length in range(len(data)):
        try:
            image = decode_image(data[:length])
        except ValueError:
            continue
        assert same_pixels(image, complete), f"{fmt} cut to {length} of {len(data)} bytes decoded wrongly"


# --- decompression bombs ---------------------------------------------------------------------------


def png_claiming_size(width: int, height: int) -> bytes:
    """A small real PNG whose IHDR is patched (CRC included) to claim `width` x `height`."""
    data = bytearray(encode(Image.new("RGB", (8, 8), (0, 0, 0)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.fixture
def no_pixel_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any attempt to decode pixel data fail the test loudly."""

    def load(self: ImageFile.ImageFile) -> Any:
        raise AssertionError("the image was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


def test_the_patched_header_really_claims_the_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)

    assert Image.open(io.BytesIO(png_claiming_size(20000, 20000))).size == (20000, 20000)


@pytest.mark.parametrize(("width", "height"), [(20000, 20000), (10000, 10000), (9000, 9000), (60000, 2000)])
@pytest.mark.usefixtures("no_pixel_decoding")
def test_a_decompression_bomb_is_rejected_from_its_header_without_decoding(width: int, height: int) -> None:
    assert width * height > MAX_DECODE_PIXELS

    with pytest.raises(ValueError, match=r"too large|over the limit") as info:
        decode_image(png_claiming_size(width, height))

    message = str(info.value)
    assert "pixels" in message
    assert "\n" not in message


@pytest.mark.usefixtures("no_pixel_decoding")
def test_the_pixel_cap_holds_even_with_pillows_own_check_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)

    with pytest.raises(ValueError, match=rf"image is 20000x20000, over the limit of {MAX_DECODE_PIXELS} pixels"):
        decode_image(png_claiming_size(20000, 20000))


def test_a_bomb_sent_as_base64_is_rejected_too() -> None:
    text = "data:image/png;base64," + base64.b64encode(png_claiming_size(20000, 20000)).decode()

    with pytest.raises(ValueError, match=r"too large|over the limit"):
        decode_image(text)


# --- conversion to RGB -----------------------------------------------------------------------------


def transparent_sample(mode: str = "RGBA") -> Image.Image:
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    image.putpixel((1, 1), (0, 0, 255, 255))  # opaque blue
    image.putpixel((2, 2), (0, 0, 0, 128))  # half-transparent black
    return image


@pytest.mark.parametrize(
    ("fmt", "params"), [("PNG", {}), ("WEBP", {"lossless": True, "exact": True})], ids=["png", "webp"]
)
def test_rgba_transparency_becomes_white(fmt: str, params: dict[str, Any]) -> None:
    image = decode_image(encode(transparent_sample(), fmt, **params))

    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((1, 1)) == (0, 0, 255)
    assert close_to(image.getpixel((2, 2)), (127, 127, 127), 1)


def test_la_transparency_becomes_white_and_gray_stays_gray() -> None:
    la = Image.new("LA", (4, 4), (100, 0))
    la.putpixel((1, 1), (100, 255))

    image = decode_image(encode(la, "PNG"))

    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((1, 1)) == (100, 100, 100)


def palette_sample() -> Image.Image:
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0])
    image.putpixel((1, 1), 1)
    image.putpixel((2, 2), 2)
    return image


def test_a_palette_image_converts_to_its_colours() -> None:
    image = decode_image(encode(palette_sample(), "PNG"))

    assert image.mode == "RGB"
    assert [image.getpixel(xy) for xy in [(0, 0), (1, 1), (2, 2)]] == [(0, 0, 0), (255, 0, 0), (0, 255, 0)]


def test_a_transparent_palette_entry_becomes_white() -> None:
    data = encode(palette_sample(), "PNG", transparency=0)
    assert "transparency" in Image.open(io.BytesIO(data)).info

    image = decode_image(data)

    assert [image.getpixel(xy) for xy in [(0, 0), (1, 1), (2, 2)]] == [(255, 255, 255), (255, 0, 0), (0, 255, 0)]


def test_a_cmyk_jpeg_converts_to_rgb() -> None:
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    data = encode(cmyk, "JPEG", quality=100)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"

    image = decode_image(data)

    assert image.mode == "RGB"
    assert close_to(image.getpixel((8, 8)), (255, 0, 0), 8)


def sixteen_bit_gray(values: list[int]) -> Image.Image:
    return Image.frombytes("I;16", (len(values), 1), struct.pack(f"<{len(values)}H", *values))


def test_a_16_bit_grayscale_png_converts_to_8_bit_rgb() -> None:
    data = encode(sixteen_bit_gray([0, 256, 32768, 65535]), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")

    image = decode_image(data)

    assert image.mode == "RGB"
    assert [image.getpixel((x, 0)) for x in range(4)] == [(0, 0, 0), (1, 1, 1), (128, 128, 128), (255, 255, 255)]


def test_to_rgb_scales_16_bit_values_down_to_8_bits() -> None:
    image = to_rgb(sixteen_bit_gray([0, 255, 4096, 65280, 65535]))

    assert image.mode == "RGB"
    assert list(image.convert("L").tobytes()) == [0, 0, 16, 255, 255]


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (Image.new("L", (2, 2), 77), (77, 77, 77)),
        (Image.new("1", (2, 2), 1), (255, 255, 255)),
        (Image.new("RGB", (2, 2), (1, 2, 3)), (1, 2, 3)),
        (Image.new("CMYK", (2, 2), (0, 0, 0, 0)), (255, 255, 255)),
    ],
    ids=["L", "1", "RGB", "CMYK"],
)
def test_to_rgb_converts_other_modes(image: Image.Image, expected: tuple[int, int, int]) -> None:
    converted = to_rgb(image)

    assert converted.mode == "RGB"
    assert converted.getpixel((0, 0)) == expected


# --- encoding --------------------------------------------------------------------------------------


def test_encode_png_writes_a_png_with_the_same_pixels() -> None:
    data = encode_png(pattern())

    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    decoded = Image.open(io.BytesIO(data))
    assert decoded.format == "PNG"
    assert same_pixels(decoded, pattern())


def test_png_base64_is_plain_base64_of_encode_png() -> None:
    text = png_base64(pattern())

    assert not text.startswith("data:")
    assert base64.b64decode(text, validate=True) == encode_png(pattern())


@pytest.mark.parametrize("size", [1, 8, 33])
def test_png_base64_round_trips_through_decode_image(size: int) -> None:
    original = pattern(size)

    assert same_pixels(decode_image(png_base64(original)), original)


def test_encode_png_keeps_an_alpha_channel() -> None:
    decoded = Image.open(io.BytesIO(encode_png(transparent_sample())))

    assert decoded.mode == "RGBA"
    assert decoded.getpixel((0, 0)) == (255, 0, 0, 0)
