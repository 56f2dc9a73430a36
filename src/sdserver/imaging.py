"""Images in and out: base64 / data-URL decoding with limits, RGB conversion, PNG (with metadata), JPEG and
WebP encoding."""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from collections.abc import Mapping

from PIL import Image, PngImagePlugin, UnidentifiedImageError

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")
OUTPUT_FORMATS = ("png", "jpeg", "webp")
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# PNG text chunks carrying the generation parameters (written by sdserver.metadata)
METADATA_KEYS = ("parameters", "parameters_json")
# Decoding happens before any size check of ours, so cap the pixels PIL will decode at all.
MAX_DECODE_PIXELS = 64 * 1024 * 1024
_DATA_URL = re.compile(r"^data:[\w/+.-]*(;[\w=.-]+)*;base64,", re.IGNORECASE)


def strip_data_url(text: str) -> str:
    """Drop a `data:image/...;base64,` prefix and whitespace, and undo form-encoding damage."""
    text = _DATA_URL.sub("", text.strip(), count=1)
    # A '+' sent unescaped in a form body arrives as ' '; base64 never contains spaces.
    return re.sub(r"[\r\n\t]", "", text).replace(" ", "+")


def b64decode(text: str) -> bytes:
    """Decode standard or URL-safe base64, tolerating missing padding."""
    body = strip_data_url(text)
    body += "=" * (-len(body) % 4)
    try:
        # URL-safe input: map its alphabet onto the standard one, then decode strictly either way.
        return base64.b64decode(body.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"not valid base64 ({exc})") from exc


def decode_image(value: str | bytes) -> Image.Image:
    """Turn base64 text (optionally a data URL) or raw bytes into an RGB image.

    Raises ValueError with a client-facing reason; callers attach the field name.
    """
    raw = b64decode(value) if isinstance(value, str) else value
    return to_rgb(open_image(raw))


def open_image(raw: bytes) -> Image.Image:
    """Decode PNG/JPEG/WebP bytes, keeping the image's mode (alpha included).

    The pixel count is checked from the header before any pixel is decoded, so a small file that
    claims a huge size (a decompression bomb) costs nothing. Raises ValueError with a reason.
    """
    return load_image(open_image_header(raw))


def open_image_header(raw: bytes, max_pixels: int = MAX_DECODE_PIXELS) -> Image.Image:
    """Read only the header of PNG/JPEG/WebP bytes: the format and size are checked, no pixel is
    decoded (`load_image` does that). Raises ValueError with a client-facing reason."""
    if not raw:
        raise ValueError("empty image")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(raw), formats=ALLOWED_FORMATS)
        except UnidentifiedImageError as exc:
            raise ValueError("not a PNG, JPEG or WebP image") from exc
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ValueError(f"image too large to decode ({exc})") from exc
        except (OSError, SyntaxError, ValueError) as exc:  # a broken header, oversized metadata chunks...
            raise ValueError(f"could not decode image ({exc})") from exc
    if image.width * image.height > max_pixels:
        raise ValueError(f"image is {image.width}x{image.height}, over the limit of {max_pixels} pixels")
    return image


def load_image(image: Image.Image) -> Image.Image:
    """Decode the pixels of an image opened by `open_image_header` (no-op if already loaded)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ValueError(f"image too large to decode ({exc})") from exc
        except (OSError, SyntaxError, ValueError, EOFError) as exc:  # truncated data, bad chunks...
            raise ValueError(f"could not decode image ({exc})") from exc
    return image


def has_alpha(image: Image.Image) -> bool:
    """An alpha channel, or a palette with a transparent entry."""
    return image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)


def to_rgb(image: Image.Image) -> Image.Image:
    """Flatten any mode (palette, RGBA, CMYK, 16-bit) to 8-bit RGB; transparency becomes white."""
    if has_alpha(image):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = image.point(lambda v: v / 256).convert("L")
    return image.convert("RGB")


def encode_png(image: Image.Image, metadata: Mapping[str, str] | None = None) -> bytes:
    """PNG bytes with `metadata` as text chunks; by default the generation parameters the engine
    attached to `image.info` (see sdserver.metadata)."""
    if metadata is None:
        metadata = {key: value for key in METADATA_KEYS if isinstance(value := image.info.get(key), str)}
    info = PngImagePlugin.PngInfo()
    for key, text in metadata.items():
        info.add_itxt(key, text) if not text.isascii() else info.add_text(key, text)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def encode_image(
    image: Image.Image,
    output_format: str = "png",
    quality: int | None = None,
    metadata: Mapping[str, str] | None = None,
) -> bytes:
    """`png` (with metadata), `jpeg` or `webp` (with `quality` 0-100, default 90)."""
    if output_format == "png":
        return encode_png(image, metadata)
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"unknown output format {output_format!r}; valid: {', '.join(OUTPUT_FORMATS)}")
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=output_format.upper(), quality=90 if quality is None else quality)
    return buffer.getvalue()


def png_base64(image: Image.Image, metadata: Mapping[str, str] | None = None) -> str:
    return base64.b64encode(encode_png(image, metadata)).decode("ascii")
