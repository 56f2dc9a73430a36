"""ControlNet preprocessors ("modules", in the sd-webui-controlnet extension's words) that need no weights.

Each turns a picture into the control image a ControlNet was trained on (edges, a threshold, a colour
grid...). Names, labels (the extension's alias names), sliders and defaults follow the extension, so
clients' requests mean the same here. Modules that need a model file (openpose, depth, HED...) are
refused by name. Pure image code: numpy and OpenCV, no torch.

The extension's conventions kept here: a negative `processor_res`/`threshold_a`/`threshold_b` means the
module's default, and a value outside a slider's range falls back to the default too (clients such as
webuiapi send 64 for every threshold, whatever the module); sliders a module does not have are ignored.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import cv2
import numpy as np
from PIL import Image

from sdserver.core.errors import FieldError
from sdserver.imaging import to_rgb

log = logging.getLogger(__name__)

Array = np.ndarray[Any, Any]  # HxWx3 (or HxW) uint8
ResizeMode = Literal["Just Resize", "Crop and Resize", "Resize and Fill"]
RESOLUTION = "Preprocessor Resolution"


@dataclass(frozen=True)
class Slider:
    name: str
    value: float
    min: float
    max: float
    step: float | None = None

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "value": self.value, "min": self.min, "max": self.max}
        return out if self.step is None else {**out, "step": self.step}

    def pick(self, given: float | None) -> float:
        """The extension's rule: nothing, a negative value or one out of range means the default."""
        if given is None or given < 0:
            return self.value
        if not self.min <= given <= self.max:
            log.info("%s %s is outside %s..%s: using the default %s", self.name, given, self.min, self.max, self.value)
            return self.value
        return given


_RES = Slider(RESOLUTION, 512, 64, 2048)
Run = Callable[[Array, float, float], Array]  # (RGB image at processor_res, threshold_a, threshold_b)


@dataclass(frozen=True)
class Module:
    name: str
    label: str  # the extension's alias name (module_list?alias_names=true)
    run: Run
    resolution: bool  # resized so its short side is processor_res before running
    a: Slider | None = None
    b: Slider | None = None

    def sliders(self) -> list[dict[str, Any] | None]:
        """The extension's slider list: [resolution, a, b], trailing Nones dropped."""
        out = [_RES.as_json() if self.resolution else None, *(s.as_json() if s else None for s in (self.a, self.b))]
        while out and out[-1] is None:
            out.pop()
        return out


@dataclass(frozen=True)
class Params:
    """A module with its settings resolved (defaults filled in)."""

    module: Module
    res: int
    threshold_a: float
    threshold_b: float


# -- the modules ---------------------------------------------------------------------------------


def _grey_min(image: Array) -> Array:
    result: Array = np.min(image, axis=2)
    return result


def _white_where(mask: np.ndarray[Any, Any]) -> Array:
    return np.where(mask, 255, 0).astype(np.uint8)


def _identity(image: Array, a: float, b: float) -> Array:
    return image


def _canny(image: Array, a: float, b: float) -> Array:
    edges: Array = cv2.Canny(image, a, b)
    return edges


def _threshold(image: Array, a: float, b: float) -> Array:
    return _white_where(_grey_min(image) > a)  # white where every channel is brighter than a


def _invert(image: Array, a: float, b: float) -> Array:
    return 255 - image  # black lines on white (a drawing) -> white on black, as ControlNets expect


def _scribble_xdog(image: Array, a: float, b: float) -> Array:
    """Difference of Gaussians: strokes where a fine blur is darker than a coarse one in every channel."""
    pixels = image.astype(np.float32)
    fine, coarse = cv2.GaussianBlur(pixels, (0, 0), 0.5), cv2.GaussianBlur(pixels, (0, 0), 5.0)
    darker = np.min(coarse - fine, axis=2).clip(0, 255)
    return _white_where(2 * darker > a)


def _lineart_standard(image: Array, a: float, b: float) -> Array:
    """Lines of a drawing (dark on light), white on black, normalised by the typical line strength."""
    pixels = image.astype(np.float32)
    darker = np.min(cv2.GaussianBlur(pixels, (0, 0), 6.0) - pixels, axis=2).clip(0, 255)
    strong = darker[darker > 8]
    scale = max(16.0, float(np.median(strong))) if strong.size else 16.0
    return (darker / scale * 127).clip(0, 255).astype(np.uint8)


def _tile_resample(image: Array, a: float, b: float) -> Array:
    if a < 1.1:  # the extension's: a rate this close to 1 leaves the picture as it is
        return image
    height, width = image.shape[:2]
    size = (max(1, int(width / a)), max(1, int(height / a)))
    resized: Array = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    return resized


def _blur_gaussian(image: Array, a: float, b: float) -> Array:
    blurred: Array = cv2.GaussianBlur(image, (0, 0), float(a))
    return blurred


def _color(image: Array, a: float, b: float) -> Array:
    """The colour grid of T2I-Adapter's colour model: 64x64-pixel cells of the picture's average colour."""
    height, width = image.shape[:2]
    small = cv2.resize(image, (max(1, width // 64), max(1, height // 64)), interpolation=cv2.INTER_CUBIC)
    grid: Array = cv2.resize(small, (width, height), interpolation=cv2.INTER_NEAREST)
    return grid


def _noise(rng: np.random.Generator, height: int, width: int, cell: int) -> np.ndarray[Any, Any]:
    """Smooth noise in 0..1: random values on a coarse grid, interpolated."""
    coarse = rng.uniform(0, 1, (height // cell + 2, width // cell + 2)).astype(np.float32)
    smooth = cv2.resize(coarse, (width + 2 * cell, height + 2 * cell), interpolation=cv2.INTER_CUBIC)
    smooth = smooth[cell : cell + height, cell : cell + width]
    smooth -= smooth.min()
    return smooth / max(float(smooth.max()), 1e-6)


def _shuffle(image: Array, a: float, b: float) -> Array:
    """The content shuffle: every pixel fetched from a smoothly random place (a fixed seed, so one picture
    always shuffles the same way and a generation's seed reproduces it)."""
    height, width = image.shape[:2]
    rng = np.random.default_rng(0)
    map_x = _noise(rng, height, width, 256) * float(width - 1)
    map_y = _noise(rng, height, width, 256) * float(height - 1)
    shuffled: Array = cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR)
    return shuffled


def _recolor(channel: Callable[[Array], Array]) -> Run:
    def run(image: Array, a: float, b: float) -> Array:
        grey = (channel(image).astype(np.float32) / 255.0) ** a
        return (grey * 255.0).clip(0, 255).astype(np.uint8)

    return run


def _luminance(image: Array) -> Array:
    lab: Array = cv2.cvtColor(image, cv2.COLOR_RGB2LAB)
    return lab[:, :, 0]


def _intensity(image: Array) -> Array:
    hsv: Array = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    return hsv[:, :, 2]


_GAMMA = Slider("Gamma Correction", 1.0, 0.1, 2.0, 0.001)
MODULES: dict[str, Module] = {
    module.name: module
    for module in (
        Module("none", "none", _identity, resolution=False),
        Module(
            "canny", "canny", _canny, True,
            Slider("Canny Low Threshold", 100, 1, 255), Slider("Canny High Threshold", 200, 1, 255),
        ),
        Module("threshold", "threshold", _threshold, True, Slider("Binarization Threshold", 127, 0, 255)),
        Module("invert", "invert (from white bg & black line)", _invert, resolution=False),
        Module("scribble_xdog", "scribble_xdog", _scribble_xdog, True, Slider("XDoG Threshold", 32, 1, 64)),
        Module("lineart_standard", "lineart_standard (from white bg & black line)", _lineart_standard, True),
        Module(
            "tile_resample", "tile_resample", _tile_resample, False, Slider("Down Sampling Rate", 1.0, 1.0, 8.0, 0.01)
        ),
        Module("blur_gaussian", "blur_gaussian", _blur_gaussian, True, Slider("Sigma", 9.0, 0.01, 64.0)),
        Module("color", "t2ia_color_grid", _color, resolution=True),
        Module("shuffle", "shuffle", _shuffle, resolution=True),
        Module("recolor_luminance", "recolor_luminance", _recolor(_luminance), False, _GAMMA),
        Module("recolor_intensity", "recolor_intensity", _recolor(_intensity), False, _GAMMA),
    )
}  # fmt: skip

# The extension's modules that run a model of their own (name and label), refused by name.
NEEDS_WEIGHTS = frozenset(
    {
        "openpose", "openpose_face", "openpose_faceonly", "openpose_full", "openpose_hand", "dw_openpose_full",
        "animal_openpose", "densepose", "densepose_parula", "depth", "depth_midas", "depth_leres", "depth_leres++",
        "depth_zoe", "depth_anything", "depth_anything_v2", "depth_hand_refiner", "depth_marigold", "normal_map",
        "normal_midas", "normal_bae", "normal_dsine", "mlsd", "lineart", "lineart_realistic", "lineart_coarse",
        "lineart_anime", "lineart_anime_denoise", "hed", "softedge_hed", "hed_safe", "softedge_hedsafe", "pidinet",
        "softedge_pidinet", "pidinet_safe", "softedge_pidisafe", "pidinet_sketch", "te_hed", "softedge_teed",
        "softedge_anyline", "scribble_hed", "pidinet_scribble", "scribble_pidinet", "segmentation",
        "seg_ufade20k", "oneformer_ade20k", "seg_ofade20k", "oneformer_coco", "seg_ofcoco", "anime_face_segment",
        "seg_anime_face", "mobile_sam", "mediapipe_face", "inpaint_only+lama", "clip_vision", "ip-adapter-auto",
        "ip-adapter_clip_sd15", "ip-adapter_clip_h", "ip-adapter_clip_sdxl", "ip-adapter_clip_g",
        "ip-adapter_clip_sdxl_plus_vith", "ip-adapter_face_id", "ip-adapter_face_id_plus", "ip-adapter_pulid",
        "instant_id_face_embedding", "instant_id_face_keypoints", "revision_clipvision", "revision_ignore_prompt",
        "t2ia_style_clipvision", "t2ia_sketch_pidi", "recolor", "tile_colorfix", "tile_colorfix+sharp",
    }
)  # fmt: skip
# Modules that change how the UNet runs rather than making a control image (not supported here).
UNSUPPORTED = frozenset(
    {
        "reference_only", "reference_adain", "reference_adain+attn",
        "inpaint", "inpaint_global_harmonious", "inpaint_only",
    }
)  # fmt: skip
_BY_KEY = {key.lower(): module for module in MODULES.values() for key in (module.name, module.label)}


def modules(alias_names: bool = False) -> list[str]:
    """The modules sdserver runs, by the extension's names (or its alias names, its labels)."""
    return [module.label if alias_names else module.name for module in MODULES.values()]


def module_details(alias_names: bool = False) -> dict[str, dict[str, Any]]:
    """The extension's `module_detail`. `model_free` is the extension's flag for modules that run without
    a ControlNet model (reference_only...): none of sdserver's, every module here feeds a ControlNet."""
    return {
        (module.label if alias_names else module.name): {"model_free": False, "sliders": module.sliders()}
        for module in MODULES.values()
    }


def find(name: str) -> Module:
    """The module named `name` (its name or label, any case); FieldError("module") says why not."""
    found = _BY_KEY.get(name.strip().lower())
    if found is not None:
        return found
    key = name.strip().lower()
    ours = ", ".join(MODULES)
    if key in NEEDS_WEIGHTS:
        raise FieldError("module", name, f"needs a model file sdserver does not have; use one of: {ours}")
    if key in UNSUPPORTED:
        raise FieldError("module", name, f"is not supported by sdserver; use one of: {ours}")
    raise FieldError("module", name, f"unknown module; use one of: {ours}")


def resolve(
    name: str, res: float | None = None, threshold_a: float | None = None, threshold_b: float | None = None
) -> Params:
    """The module and its settings as they will run (the extension's defaults for missing ones)."""
    module = find(name)
    return Params(
        module,
        int(_RES.pick(res)) if module.resolution else 0,
        module.a.pick(threshold_a) if module.a else 0.0,
        module.b.pick(threshold_b) if module.b else 0.0,
    )


def run(
    module: str,
    image: Image.Image,
    res: float | None = None,
    threshold_a: float | None = None,
    threshold_b: float | None = None,
    *,
    names: Mapping[str, str] | None = None,
) -> Image.Image:
    """The control image of `image` (RGB). InvalidRequest names the module (`names`: ours -> the client's)."""
    try:
        params = resolve(module, res, threshold_a, threshold_b)
    except FieldError as exc:
        raise exc.invalid(names) from None
    return apply(params, image)


def apply(params: Params, image: Image.Image) -> Image.Image:
    pixels = np.asarray(to_rgb(image), dtype=np.uint8)
    if params.module.resolution:
        pixels = resize_short_side(pixels, params.res)
    out = params.module.run(np.ascontiguousarray(pixels), params.threshold_a, params.threshold_b)
    return Image.fromarray(out).convert("RGB")


def resize_short_side(pixels: Array, side: int) -> Array:
    """`pixels` scaled (aspect kept) so that the shorter side is `side` px: the extension's processor_res."""
    height, width = pixels.shape[:2]
    scale = side / min(height, width)
    if scale == 1:
        return pixels
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized: Array = cv2.resize(pixels, size, interpolation=cv2.INTER_CUBIC if scale > 1 else cv2.INTER_AREA)
    return resized


def pixel_perfect_resolution(image: tuple[int, int], target: tuple[int, int], resize_mode: ResizeMode) -> int:
    """The extension's "pixel perfect" processor_res: the short side the image will have once fitted to
    `target` (width, height) by `resize_mode`, so the control image needs no second resampling."""
    scale_w, scale_h = target[0] / image[0], target[1] / image[1]
    scale = min(scale_w, scale_h) if resize_mode == "Resize and Fill" else max(scale_w, scale_h)
    return round(scale * min(image))
