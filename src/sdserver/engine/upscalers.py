"""Upscalers by AUTOMATIC1111's names: the built-in resamplers ("None", "Lanczos", "Nearest") and the
model files in `upscalers_dir` (ESRGAN, Real-ESRGAN, SwinIR, ...: whatever spandrel reads), by file
name without suffix.

Listing reads file names only; a model loads on first use (one is kept loaded), and a file spandrel
cannot read is refused by name then, not at startup. A model runs at its own scale, again if the
target is still larger (at most three passes, as A1111), tiled so large images fit, and the result is
resampled (Lanczos) to exactly the size asked for. Only the worker thread runs `upscale`.
"""

from __future__ import annotations

import enum
import importlib
import importlib.util
import logging
import re
import sys
import threading
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from sdserver.core.errors import InvalidRequest, UnsupportedModel

log = logging.getLogger(__name__)

BUILTINS: dict[str, Image.Resampling] = {
    # A1111's "None" upscaler leaves the pixels alone; asked for another size it resizes with Lanczos.
    "None": Image.Resampling.LANCZOS,
    "Lanczos": Image.Resampling.LANCZOS,
    "Nearest": Image.Resampling.NEAREST,
}
SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt")  # the first wins when two files share a name
MAX_PASSES = 3  # as A1111: a 2x model reaches 8x at most
TILE = 256  # input pixels per tile side
OVERLAP = 16  # input pixels of context around each tile, cut off its output
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
# 4x-UltraSharp, 4xNomos8k, ESRGAN_4x, RealESRGAN_x4plus, SwinIR-L_x4_GAN
_SCALE_IN_NAME = re.compile(r"(?:^|[^a-z0-9])(?:(\d)x|x(\d))(?![0-9])", re.IGNORECASE)
_import_lock = threading.Lock()


def import_spandrel() -> types.ModuleType:
    """spandrel, imported on first use.

    spandrel's registry imports `torchvision.transforms.functional` eagerly, for two architectures
    only (LaMa inpainting, RestoreFormer face restoration), never for upscaling. Without torchvision
    (our CPU installs have none: it would pull a CUDA torch), placeholders stand in while spandrel
    imports, and are removed again: transformers asks `find_spec("torchvision")` to decide whether to
    use it, and a leftover placeholder would make it try. The two architectures raise if ever run.
    """
    with _import_lock:
        if "spandrel" in sys.modules:
            return sys.modules["spandrel"]
        if importlib.util.find_spec("torchvision") is not None:
            return importlib.import_module("spandrel")
        placeholders = _torchvision_placeholders()
        sys.modules.update(placeholders)
        try:
            return importlib.import_module("spandrel")
        finally:
            for name, module in placeholders.items():
                if sys.modules.get(name) is module:
                    del sys.modules[name]


def _torchvision_placeholders() -> dict[str, types.ModuleType]:
    def unavailable(name: str) -> Callable[..., Any]:
        def call(*_: Any, **__: Any) -> Any:
            raise RuntimeError(f"torchvision.transforms.functional.{name} is needed here; install torchvision")

        return call

    root, transforms, functional = (
        types.ModuleType(name)
        for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")
    )
    InterpolationMode = enum.Enum(
        "InterpolationMode", {"NEAREST": "nearest", "BILINEAR": "bilinear", "BICUBIC": "bicubic"}
    )
    for module, name, value in (
        (functional, "InterpolationMode", InterpolationMode),
        (functional, "rotate", unavailable("rotate")),
        (functional, "normalize", unavailable("normalize")),
        (root, "transforms", transforms),
        (transforms, "functional", functional),
    ):
        setattr(module, name, value)
    return {module.__name__: module for module in (root, transforms, functional)}


@dataclass
class _Loaded:
    name: str
    path: Path
    model: Any  # spandrel's ImageModelDescriptor


class Upscalers:
    """The upscalers this server offers (the library; the engine holds one)."""

    def __init__(
        self, folder: str | None, device: torch.device | None = None, dtype: torch.dtype = torch.float32
    ) -> None:
        self.folder = Path(folder).expanduser() if folder is not None else None
        self.device = device or torch.device("cpu")
        self.dtype = dtype if self.device.type != "cpu" else torch.float32
        self.tile, self.overlap = TILE, OVERLAP
        self._loaded: _Loaded | None = None
        self._scales: dict[str, int] = {}  # learnt when a model loads

    def files(self) -> dict[str, Path]:
        """The model files by name (file names only: no weights are read). Rescanned on every call."""
        found: dict[str, Path] = {}
        if self.folder is None or not self.folder.is_dir():
            return found
        paths = (path for path in self.folder.iterdir() if path.suffix.lower() in SUFFIXES and path.is_file())
        for path in sorted(paths, key=lambda p: (p.stem, SUFFIXES.index(p.suffix.lower()))):
            if path.stem not in found and path.stem.lower() not in _BUILTIN_KEYS:
                found[path.stem] = path
        return found

    def names(self) -> list[str]:
        """The built-ins first, then the model files."""
        return [*BUILTINS, *self.files()]

    def scale(self, name: str) -> int:
        """A model's scale: known once it has loaded; until then guessed from its name (4x-..., ..._x2),
        else 4 (most upscalers' scale)."""
        if name in self._scales:
            return self._scales[name]
        match = _SCALE_IN_NAME.search(name)
        return int(match.group(1) or match.group(2)) if match else 4

    def describe(self) -> list[dict[str, Any]]:
        """AUTOMATIC1111's `/sdapi/v1/upscalers` items."""
        builtins = [
            {"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4} for name in BUILTINS
        ]
        models = [
            {"name": name, "model_name": name, "model_path": str(path), "model_url": None, "scale": self.scale(name)}
            for name, path in self.files().items()
        ]
        return builtins + models

    def resolve(self, name: str, field: str = "upscaler") -> str:
        """The upscaler's name as listed (matched case-insensitively, as A1111 does); an unknown name
        is an InvalidRequest naming `field` and listing the valid names."""
        names = self.names()
        by_key = {known.lower(): known for known in reversed(names)}  # an exact match, else the first
        found = name if name in names else by_key.get(name.strip().lower())
        if found is None:
            where = "" if self.folder is not None else " (no upscalers_dir is configured)"
            raise InvalidRequest(f"{field}: unknown upscaler {name!r}{where}; valid: {', '.join(names)}", field=field)
        return found

    def check(self, name: str, field: str = "upscaler") -> None:
        self.resolve(name, field)

    def upscale(self, image: Image.Image, name: str, width: int, height: int) -> Image.Image:
        """`image` upscaled by upscaler `name` to exactly `width` x `height` (RGB)."""
        name = self.resolve(name)
        image = image if image.mode == "RGB" else image.convert("RGB")
        if name not in BUILTINS:
            image = self._run_model(name, image, width, height)
        if image.size == (width, height):
            return image
        return image.resize((width, height), BUILTINS.get(name, Image.Resampling.LANCZOS))

    def _run_model(self, name: str, image: Image.Image, width: int, height: int) -> Image.Image:
        """Model passes until the image is at least `width` x `height` (or stops growing); the model
        loads only if a pass is needed."""
        for _ in range(MAX_PASSES):
            if image.width >= width and image.height >= height:
                break
            before = image.size
            image = self._pass(self._load(name).model, image)
            if image.size == before:  # a 1x (restoration) model: once is enough
                break
        return image

    def _pass(self, model: Any, image: Image.Image) -> Image.Image:
        mode = _MODES.get(model.input_channels)
        if mode is None:
            raise UnsupportedModel(f"upscaler with {model.input_channels} input channels is not supported")
        pixels = np.asarray(image.convert(mode), dtype=np.float32) / 255.0
        pixels = pixels[:, :, None] if pixels.ndim == 2 else pixels
        tensor = torch.from_numpy(pixels).permute(2, 0, 1)[None].to(self.device, model.dtype)
        with torch.inference_mode():
            array = tiled(model, tensor, self.tile, self.overlap)
        result = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array, _MODES[array.shape[2]])
        return result.convert("RGB")

    def _load(self, name: str) -> _Loaded:
        """The model `name`, loaded onto the device (it replaces the one loaded before)."""
        path = self.files()[name]
        if self._loaded is not None and self._loaded.name == name and self._loaded.path == path:
            return self._loaded
        self._loaded = None  # free the previous one first
        self._loaded = _Loaded(name, path, self._read(name, path))
        self._scales[name] = int(self._loaded.model.scale)
        return self._loaded

    def _read(self, name: str, path: Path) -> Any:
        try:
            spandrel = import_spandrel()
        except ImportError as exc:
            raise UnsupportedModel(
                f"upscaler {name!r}: model upscalers need the spandrel package "
                f"(pip install --no-deps spandrel einops): {exc}"
            ) from None
        log.info("loading upscaler %r from %s onto %s", name, path, self.device)
        try:
            descriptor = spandrel.ModelLoader(torch.device("cpu")).load_from_file(path)
        except Exception as exc:  # unpickling, safetensors, an architecture spandrel does not know...
            reason = f"{type(exc).__name__}: {exc}"
            raise UnsupportedModel(
                f"upscaler {name!r}: {path.name} is not a model spandrel can read ({reason[:300]})"
            ) from None
        if not isinstance(descriptor, spandrel.ImageModelDescriptor):
            raise UnsupportedModel(f"upscaler {name!r}: {path.name} is a {descriptor.purpose} model, not an upscaler")
        dtype = self.dtype
        if (dtype == torch.float16 and not descriptor.supports_half) or (
            dtype == torch.bfloat16 and not descriptor.supports_bfloat16
        ):
            dtype = torch.float32
        return descriptor.to(self.device, dtype).eval()


_BUILTIN_KEYS = {name.lower() for name in BUILTINS}


def tiled(model: Any, image: torch.Tensor, tile: int, overlap: int) -> np.ndarray:
    """`model` (a spandrel descriptor: it pads to its size requirements) over `image` (1, C, H, W)
    in tiles of `tile` px, each run with `overlap` px of context that is cut off its output, so tiles
    meet without seams. The output is assembled on the CPU as 8-bit (H, W, C): only a tile is on the
    device, and a large output costs a byte per value."""
    _, _, height, width = image.shape
    if model.tiling.name == "INTERNAL" or (height <= tile and width <= tile):  # INTERNAL: it tiles itself
        return _to_bytes(model(image))
    scale = int(model.scale)
    output = np.zeros((height * scale, width * scale, model.output_channels), dtype=np.uint8)
    for top in range(0, height, tile):
        for left in range(0, width, tile):
            bottom, right = min(top + tile, height), min(left + tile, width)
            y0, x0 = max(0, top - overlap), max(0, left - overlap)
            y1, x1 = min(height, bottom + overlap), min(width, right + overlap)
            piece = _to_bytes(model(image[..., y0:y1, x0:x1]))
            output[top * scale : bottom * scale, left * scale : right * scale] = piece[
                (top - y0) * scale : (bottom - y0) * scale, (left - x0) * scale : (right - x0) * scale
            ]
    return output


def _to_bytes(output: torch.Tensor) -> np.ndarray:
    """A model's (1, C, H, W) output in [0, 1] as 8-bit (H, W, C) on the CPU."""
    scaled = (output[0].float() * 255.0).round_().clamp_(0, 255)
    return scaled.to(torch.uint8).permute(1, 2, 0).cpu().numpy()
