"""Image work around inpainting and img2img, the same for every protocol and model family (PIL only):
the resize modes, the blurred mask, "only masked" (full-res) cropping and pasting back, and the fill
of the masked area before it is encoded. The ideas are AUTOMATIC1111's; the code is our own.

Masks are 8-bit grey, white = repaint. A box is (left, top, right, bottom) in pixels, right and
bottom exclusive (PIL's convention).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from PIL import Image, ImageFilter, ImageOps

from sdserver.core.images import RESAMPLING, fit

ResizeMode = Literal["just_resize", "crop_and_resize", "resize_and_fill", "latent_upscale"]
InpaintFill = Literal["original", "fill", "latent_noise", "latent_nothing"]
Box = tuple[int, int, int, int]

# A1111's fill: the known colours blurred at falling radii, coarse first, each layer laid over the last
# (radius, times laid); the final radius-0 layer is the known pixels themselves.
_FILL_LAYERS = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))


def resized(image: Image.Image, mode: ResizeMode, size: tuple[int, int]) -> Image.Image:
    """`image` at `size` by A1111's resize modes:

    - just_resize: stretched to the size (the aspect may change);
    - crop_and_resize: scaled to cover the size, keeping its aspect, then centre-cropped;
    - resize_and_fill: scaled to fit inside, keeping its aspect, centred; the bars are filled by
      stretching the picture's edge rows (or columns) across them, as A1111 does;
    - latent_upscale: A1111 scales the encoded latents instead; here it is just_resize.
    """
    if mode in ("just_resize", "latent_upscale") or image.size == size:
        return fit(image, size)
    width, height = size
    if mode == "crop_and_resize":
        scale = max(width / image.width, height / image.height)
        inner = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
        scaled = image.resize(inner, RESAMPLING)
        left, top = (inner[0] - width) // 2, (inner[1] - height) // 2
        return scaled.crop((left, top, left + width, top + height))
    scale = min(width / image.width, height / image.height)
    inner = (min(width, max(1, round(image.width * scale))), min(height, max(1, round(image.height * scale))))
    return _with_edge_bars(image.resize(inner, RESAMPLING), size)


def _with_edge_bars(picture: Image.Image, size: tuple[int, int]) -> Image.Image:
    """`picture` centred on a `size` canvas, the bars either side its edge pixels repeated."""
    canvas = Image.new(picture.mode, size)
    (width, height), (inner_w, inner_h) = size, picture.size
    left, top = (width - inner_w) // 2, (height - inner_h) // 2
    canvas.paste(picture, (left, top))
    right, bottom = width - left - inner_w, height - top - inner_h
    strips = (
        ((0, 0, inner_w, 1), (inner_w, top), (left, 0)),
        ((0, inner_h - 1, inner_w, inner_h), (inner_w, bottom), (left, top + inner_h)),
        ((0, 0, 1, inner_h), (left, inner_h), (0, top)),
        ((inner_w - 1, 0, inner_w, inner_h), (right, inner_h), (left + inner_w, top)),
    )
    for edge, bar, where in strips:
        if bar[0] > 0 and bar[1] > 0:
            canvas.paste(picture.crop(edge).resize(bar, Image.Resampling.NEAREST), where)
    return canvas


def blurred_mask(mask: Image.Image, blur: int) -> Image.Image:
    """The mask binarised at 50% (as A1111 does first), then softened by a Gaussian of `blur` px."""
    binary = mask.convert("L").point(lambda value: 255 if value >= 128 else 0)
    return binary.filter(ImageFilter.GaussianBlur(blur)) if blur > 0 else binary


def doubled(mask: Image.Image) -> Image.Image:
    """A1111's overlay for whole-picture inpainting: twice the blurred mask, clipped, so everything the
    model repainted (the mask's upper half) comes back whole and the blend lies outside it."""
    return mask.point(lambda value: min(255, 2 * value))


def crop_region(mask: Image.Image, padding: int, aspect: tuple[int, int]) -> Box | None:
    """The box "only masked" inpainting works on: the bounding box of the mask's non-zero pixels plus
    `padding` px, grown to the `aspect` (width, height) of the size generated, inside the image. None
    for a blank mask."""
    found = mask.convert("L").getbbox()
    if found is None:
        return None
    left, top, right, bottom = found
    left, top = max(0, left - padding), max(0, top - padding)
    right, bottom = min(mask.width, right + padding), min(mask.height, bottom + padding)
    ratio = aspect[0] / aspect[1]
    if (right - left) / (bottom - top) > ratio:  # too wide for the aspect: taller
        top, bottom = _grown(top, bottom, round((right - left) / ratio), mask.height)
    else:
        left, right = _grown(left, right, round((bottom - top) * ratio), mask.width)
    return left, top, right, bottom


def _grown(start: int, end: int, length: int, limit: int) -> tuple[int, int]:
    """[start, end) grown about its centre to `length`, moved back inside [0, limit), cut to fit."""
    length = max(end - start, min(length, limit))
    start -= (length - (end - start)) // 2
    start = min(max(start, 0), limit - length)
    return start, start + length


def crop_for_full_res(
    init: Image.Image, mask: Image.Image, box: Box, size: tuple[int, int]
) -> tuple[Image.Image, Image.Image]:
    """The init image and mask cut to `box` and scaled to `size`, the size the model works at."""
    return fit(init.crop(box), size), fit(mask.convert("L").crop(box), size, mask=True)


def paste_back(generated: Image.Image, init: Image.Image, mask: Image.Image, box: Box | None = None) -> Image.Image:
    """`generated` (scaled to `box`, or covering all of `init`) laid over `init` through `mask`: where
    the mask is 0 the pixels are exactly `init`'s, where it is 255 the generated ones, a blend between."""
    box = box or (0, 0, init.width, init.height)
    size = (box[2] - box[0], box[3] - box[1])
    layer = init.copy()
    layer.paste(fit(generated.convert(init.mode), size), box[:2])
    return Image.composite(layer, init, mask.convert("L"))


def fill_masked(init: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's "fill": the masked area painted with the colours around it, blurred (coarse to fine),
    so the model starts from the surroundings' colours instead of what was there. Outside the mask,
    `init` unchanged; at a soft edge, a blend."""
    known = Image.new("RGBa", init.size)
    known.paste(init.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    painted = Image.new("RGBA", init.size)
    for radius, times in _FILL_LAYERS:
        layer = known.filter(ImageFilter.GaussianBlur(radius)) if radius else known
        layer = layer.convert("RGBA")  # un-premultiplied: each pixel the mean of the known ones near it
        for _ in range(times):
            painted.alpha_composite(layer)
    return Image.composite(painted.convert(init.mode), init, mask.convert("L"))


@dataclass(frozen=True)
class PasteBack:
    """How a finished inpainting image goes back onto the picture sent: `canvas` (the init image as
    sent, at its working size), the `mask` it is composited through, and the `box` it was cut from
    ("only masked"; None: the whole canvas)."""

    canvas: Image.Image
    mask: Image.Image
    box: Box | None = None

    def apply(self, generated: Image.Image) -> Image.Image:
        return paste_back(generated, self.canvas, self.mask, self.box)
