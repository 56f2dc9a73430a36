"""The size a request will actually generate, worked out in one place and checked against the limits
before anything is decoded, resized or allocated.

The size comes from, in this order: `width` and `height` as sent (both, or one with the other from the
init image's aspect); else the init image's own size rounded down to a multiple of 8; else the
model's native size (known once the engine prepares the request). Every protocol goes through here.
"""

from __future__ import annotations

from sdserver.core.errors import FieldError
from sdserver.core.limits import Limits

MULTIPLE = 8  # latents are 1/8 of the image: the VAE needs sides that are multiples of 8


def output_size(
    width: int | None,
    height: int | None,
    source: tuple[int, int] | None,
    limits: Limits,
    *,
    native: int | None = None,
) -> tuple[int, int] | None:
    """(width, height) to generate, or None while it depends on a model not known yet.

    `source` is the init image's size (from its header). Raises FieldError naming the field to blame.
    """
    for name, side in (("width", width), ("height", height)):
        if side is not None:
            _check_requested_side(name, side, limits)
    if width is not None and height is not None:
        if width * height > limits.max_pixels:
            pixels = f"{width} x height {height} = {width * height} pixels"
            raise FieldError("width", None, f"{pixels} is over the limit of {limits.max_pixels}")
        return width, height
    if source is not None:
        return _from_image(width, height, source, limits)
    if native is None:
        return None
    width, height = width or native, height or native
    _check_derived("width", f"the model's native size is {width}x{height}", (width, height), limits)
    return width, height


def _check_requested_side(name: str, side: int, limits: Limits) -> None:
    if side < MULTIPLE:
        raise FieldError(name, side, f"must be at least {MULTIPLE}")
    if side % MULTIPLE:
        raise FieldError(name, side, f"must be a multiple of {MULTIPLE}")
    if side > limits.max_side:
        raise FieldError(name, side, f"is over the limit of {limits.max_side}")


def _check_derived(name: str, what: str, size: tuple[int, int], limits: Limits) -> None:
    """A size the client did not send as such: say where it came from."""
    if max(size) > limits.max_side:
        raise FieldError(name, None, f"{what}, over the limit of {limits.max_side} per side")
    if size[0] * size[1] > limits.max_pixels:
        raise FieldError(name, None, f"{what}, {size[0] * size[1]} pixels, over the limit of {limits.max_pixels}")


def _from_image(width: int | None, height: int | None, source: tuple[int, int], limits: Limits) -> tuple[int, int]:
    source_width, source_height = source
    if width is not None:  # the other side keeps the image's aspect
        derived, name = _round(source_height * width / source_width), "height"
        size = (width, derived)
    elif height is not None:
        derived, name = _round(source_width * height / source_height), "width"
        size = (derived, height)
    else:
        size = (_floor(source_width), _floor(source_height))
        name = "init_image"
    what = f"a {source_width}x{source_height} init image gives a {size[0]}x{size[1]} output"
    _check_derived(name, what, size, limits)
    return size


def _floor(side: int) -> int:
    return max(MULTIPLE, side - side % MULTIPLE)


def _round(side: float) -> int:
    return max(MULTIPLE, round(side / MULTIPLE) * MULTIPLE)


def hires_size(
    first: tuple[int, int], scale: float, width: int | None, height: int | None, limits: Limits, field: str = "hires"
) -> tuple[int, int]:
    """A hires fix's second-pass size: `width` x `height` as sent (A1111's hr_resize_x/y; one of them:
    the other keeps the first pass's aspect), else `scale` x the first pass's size; in multiples of 8.
    FieldError (named `hires`) where it is over the limits."""
    first_width, first_height = first
    if width and height:
        size = (_round(width), _round(height))
    elif width:
        size = (_round(width), _round(first_height * width / first_width))
    elif height:
        size = (_round(first_width * height / first_height), _round(height))
    else:
        size = (_round(first_width * scale), _round(first_height * scale))
    _check_derived(field, f"the result would be {size[0]}x{size[1]}", size, limits)
    return size
