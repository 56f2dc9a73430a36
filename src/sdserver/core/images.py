"""Image fields, read the same way on every protocol: the header first (format, size and pixel limits,
nothing decoded), the pixels only once the request has passed every check, and one rule for resizing
an init image and its mask to the size generated."""

from __future__ import annotations

from typing import Literal

from PIL import Image

from sdserver.core.errors import FieldError
from sdserver.imaging import b64decode, has_alpha, load_image, open_image_header, to_rgb

# Masks are resized with the same filter as images: white/black edges come out soft, and the
# pipelines binarise them at 50% (so do the pixels kept as sent), which LANCZOS does best.
RESAMPLING = Image.Resampling.LANCZOS
ImageMode = Literal["RGB", "RGBA", "L"]


def open_field(value: str | bytes | Image.Image, field: str, max_pixels: int) -> Image.Image:
    """An image field's header: PNG, JPEG or WebP, at most `max_pixels`; no pixel is decoded yet.

    Accepts base64 text (a data URL too), raw bytes, or an image already in memory. Raises FieldError.
    """
    if isinstance(value, Image.Image):
        image = value
    else:
        try:
            raw = b64decode(value) if isinstance(value, str) else value
            image = open_image_header(raw)
        except ValueError as exc:
            shown = value if isinstance(value, str) else None
            raise FieldError(field, shown, str(exc)) from None
    if image.width * image.height > max_pixels:
        reason = f"is {image.width}x{image.height}, over the limit of {max_pixels} pixels for an input image"
        raise FieldError(field, None, reason)
    return image


def decode_field(image: Image.Image, field: str, mode: ImageMode = "RGB") -> Image.Image:
    """The pixels of an opened image field, as `mode` (RGB flattens transparency onto white)."""
    try:
        loaded = load_image(image)
    except ValueError as exc:
        raise FieldError(field, None, str(exc)) from None
    if mode == "RGB" or (mode == "RGBA" and not has_alpha(loaded)):  # to_rgb knows 16-bit, CMYK...
        loaded = to_rgb(loaded)
    return loaded if loaded.mode == mode else loaded.convert(mode)


def fit(image: Image.Image, size: tuple[int, int], *, mask: bool = False) -> Image.Image:
    """`image` at `size` (a mask as 8-bit grey): the one resizing rule for init images and masks."""
    if mask and image.mode != "L":
        image = image.convert("L")
    return image if image.size == size else image.resize(size, RESAMPLING)
