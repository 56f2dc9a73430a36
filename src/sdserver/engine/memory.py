"""Memory: what a denoising step and a VAE decode need, measured at load, and the calls kept within it.

At load (when there is a budget to keep: an accelerator, or `memory_limit_gb`) the model runs a few
probes through its family's own calls, 1 and 2 images at a small size and 1 image at twice the side,
and the peak memory of each step and decode is fitted as `fixed + rows * (a * pixels + b * pixels²)`
(linear: convolutions and memory-efficient attention; quadratic: attention that materialises its
scores). Peaks are read from the CUDA allocator; elsewhere from a tracker of live tensors.

Two wrappers then keep every call within what is free at that moment:
- the denoiser runs at most the rows that fit per forward: a larger batch is split into several
  forwards (each image still sees exactly its own inputs, so the images are the same as unsplit);
- the VAE decodes as many images per call as fit, and tiles (bounded memory) when one image would not
  fit, when the image is over `vae_tile_megapixels`, or after running out of memory untiled.

The scheduler asks `MemoryModel.denoiser_rows` (through the session) before letting a request join a
running batch, so a running set grows only while one forward still fits.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

from sdserver.engine.device import free_device_memory, is_out_of_memory

log = logging.getLogger(__name__)

SAFETY = 1.15  # estimates are scaled up by this much: fragmentation, workspaces the probes missed
SHARED_INPUTS = frozenset({"txt_ids", "img_ids"})  # denoiser inputs that are per position, not per row


@dataclass(frozen=True)
class Fit:
    """Peak bytes of one call over `rows` rows of `pixels` image pixels each."""

    fixed: float = 0.0
    linear: float = 0.0  # bytes per row per pixel
    quadratic: float = 0.0  # bytes per row per pixel²

    def per_row(self, pixels: int) -> float:
        return self.linear * pixels + self.quadratic * pixels * pixels

    def bytes(self, rows: int, pixels: int) -> int:
        return int(SAFETY * (self.fixed + rows * self.per_row(pixels)))

    def rows_within(self, budget: int, pixels: int) -> int:
        """How many rows fit in `budget` bytes (0: not even one)."""
        per_row = SAFETY * self.per_row(pixels)
        room = budget - SAFETY * self.fixed
        if per_row <= 0:
            return 1 << 20 if room >= 0 else 0
        return max(0, int(room // per_row))

    @classmethod
    def from_probes(
        cls, small_1: float, small_2: float, rows: tuple[int, int], big_1: float, pixels: tuple[int, int]
    ) -> Fit:
        """From peaks at (rows[0] rows, pixels[0]), (rows[1] rows, pixels[0]) and (rows[0] rows, pixels[1]).
        Coefficients are kept non-negative, so the estimate never shrinks as rows or pixels grow."""
        (r1, r2), (p1, p2) = rows, pixels
        row_small = max(0.0, (small_2 - small_1) / (r2 - r1))
        fixed = max(0.0, small_1 - r1 * row_small)
        row_big = max(row_small, (big_1 - fixed) / r1)
        # row(p) = a p + b p²: two equations, two unknowns
        quadratic = (row_big / p2 - row_small / p1) / (p2 - p1)
        if quadratic < 0:
            return cls(fixed, max(row_small / p1, row_big / p2), 0.0)
        linear = row_small / p1 - quadratic * p1
        if linear < 0:
            return cls(fixed, 0.0, row_big / (p2 * p2))
        return cls(fixed, linear, quadratic)


@dataclass
class MemoryModel:
    """A model's memory needs and the device's room for them; `limit` caps the device memory in all."""

    device: torch.device
    weights_bytes: int  # this model's weights (counted against `limit` on the CPU)
    denoiser: Fit = field(default_factory=Fit)
    decoder: Fit = field(default_factory=Fit)
    limit: int | None = None
    pixels_per_element: float = 0.0  # image pixels per element of one denoiser input row
    decoder_pixels_per_element: float = 0.0  # image pixels per element of one latent decoded

    def available(self) -> int | None:
        """Bytes free for work right now; None: no budget to keep (a CPU with no memory_limit_gb)."""
        return available_bytes(self.device, self.limit, self.weights_bytes)

    def estimate(self, rows: int, width: int, height: int) -> int:
        """Peak bytes of one denoising step over `rows` denoiser rows at width x height."""
        return self.denoiser.bytes(rows, width * height)

    def denoiser_rows(self, pixels: int) -> int:
        """Denoiser rows of `pixels` image pixels that fit in one forward now (at least 1)."""
        free = self.available()
        return (1 << 20) if free is None else max(1, self.denoiser.rows_within(free, pixels))

    def decode_rows(self, pixels: int) -> int:
        """Images of `pixels` pixels one VAE call can decode now; 0: not even one, so decode tiled."""
        free = self.available()
        return (1 << 20) if free is None else self.decoder.rows_within(free, pixels)


def available_bytes(device: torch.device, limit: int | None, weights: int = 0) -> int | None:
    """Free device memory for work; CUDA counts torch's cached blocks as free (they are reusable)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        allocated = torch.cuda.memory_allocated(device)
        free += torch.cuda.memory_reserved(device) - allocated
        if limit is not None:
            free = min(free, limit - allocated)
        return int(free - margin(limit or total))
    if device.type == "mps":
        allocated = torch.mps.driver_allocated_memory()
        total = torch.mps.recommended_max_memory()
        cap = total if limit is None else min(total, limit)
        return int(cap - allocated - margin(cap))
    if limit is None:
        return None
    return int(limit - weights - margin(limit))


def margin(capacity: int) -> int:
    """Memory left alone: the CUDA context, other processes' growth, fragmentation."""
    return max(256 << 20, capacity // 25)


# -- measuring ------------------------------------------------------------------------------------


class LiveTensors(TorchDispatchMode):
    """Peak bytes of the tensors alive while the block runs (any device): a stand-in for an allocator's
    peak where torch keeps none (CPU, MPS). Storages shared by views count once."""

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, list[int]] = {}  # storage -> [bytes, tensors using it]
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self._track, out)
        return out

    def _track(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage._cdata
        entry = self._live.get(key)
        if entry is None:
            entry = self._live[key] = [storage.nbytes(), 0]
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        weakref.finalize(tensor, self._release, key)
        return tensor

    def _release(self, key: int) -> None:
        entry = self._live.get(key)
        if entry is not None:
            entry[1] -= 1
            if not entry[1]:
                self.current -= entry[0]
                del self._live[key]


def peak_bytes(device: torch.device, run: Callable[[], Any]) -> int:
    """Peak memory `run` adds on `device`, beyond what was allocated before."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - before)
    with LiveTensors() as tracker:
        run()
    return tracker.peak


# -- keeping calls within the budget ----------------------------------------------------------------


class RowSplitter:
    """Wraps the denoiser's forward: at most `limit(rows, pixels)` rows per call; with `buckets`, each call's
    rows are padded up to a bucket (compiled graphs exist for those shapes only)."""

    def __init__(self, module: torch.nn.Module, memory: MemoryModel | None) -> None:
        self.module, self.memory = module, memory
        self.original = module.forward
        self.buckets: tuple[int, ...] = ()
        self.bucketed_shapes: set[tuple[int, ...]] = set()  # input shapes (without rows) compiled
        self.calls = 0  # forwards run (a split batch counts each part)
        module.forward = self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        sample: torch.Tensor = args[0] if args else kwargs.get("sample", kwargs["hidden_states"])
        rows = int(sample.shape[0])
        per_call = rows
        if self.memory is not None and self.memory.pixels_per_element:
            pixels = int(sample[0].numel() * self.memory.pixels_per_element)
            per_call = min(rows, self.memory.denoiser_rows(pixels))
        padded = tuple(sample.shape[1:]) in self.bucketed_shapes
        if padded:
            per_call = max([b for b in self.buckets if b <= per_call] or [1])
        if per_call >= rows and not padded:
            self.calls += 1
            return self.original(*args, **kwargs)
        parts = []
        for start in range(0, rows, per_call):
            stop = min(rows, start + per_call)
            pad = (_bucket(stop - start, self.buckets) - (stop - start)) if padded else 0
            part_args, part_kwargs = _rows(args, kwargs, rows, start, stop, pad)
            self.calls += 1
            out = self.original(*part_args, **part_kwargs)
            parts.append(_unpad(out, stop - start))
        return _concat(parts)


def _bucket(rows: int, buckets: tuple[int, ...]) -> int:
    return next((b for b in buckets if b >= rows), rows)


def _rows(args: tuple[Any, ...], kwargs: dict[str, Any], rows: int, start: int, stop: int, pad: int) -> tuple[Any, Any]:
    """Rows start:stop of every per-row tensor argument (dim 0 == rows), padded with copies of the last."""

    def cut(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows:
            part = value[start:stop]
            return torch.cat([part, part[-1:].expand(pad, *part.shape[1:])]) if pad else part
        if isinstance(value, dict):
            return {key: cut(item) for key, item in value.items()}
        return value

    return tuple(cut(arg) for arg in args), {
        key: (value if key in SHARED_INPUTS else cut(value)) for key, value in kwargs.items()
    }


def _unpad(out: Any, rows: int) -> Any:
    if isinstance(out, tuple):
        return tuple(item[:rows] if isinstance(item, torch.Tensor) else item for item in out)
    return type(out)(**{key: value[:rows] for key, value in out.items()})


def _concat(parts: list[Any]) -> Any:
    first = parts[0]
    if isinstance(first, tuple):
        return tuple(
            torch.cat([part[i] for part in parts]) if isinstance(item, torch.Tensor) else item
            for i, item in enumerate(first)
        )
    return type(first)(**{key: torch.cat([part[key] for part in parts]) for key in first})


class Decoder:
    """Wraps the VAE's decode: as many images per call as fit, tiled when one would not (or is over
    `tile_above` pixels, or ran out of memory untiled). `tiling`: auto, on or off."""

    def __init__(self, vae: Any, memory: MemoryModel | None, tiling: str, tile_above: int, scale: int) -> None:
        self.vae, self.memory, self.tiling, self.tile_above, self.scale = vae, memory, tiling, tile_above, scale
        self.original = vae.decode
        self.max_rows: int | None = None  # e.g. 1 when the decoder is compiled for one image per call
        self.tiled_calls = 0
        vae.decode = self

    def __call__(self, z: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        rows = int(z.shape[0])
        pixels = int(z.shape[-2] * z.shape[-1]) * self.scale * self.scale
        per_call = rows if self.memory is None else min(rows, self.memory.decode_rows(pixels))
        tiled = self.tiling == "on" or (self.tiling == "auto" and (per_call == 0 or pixels > self.tile_above))
        per_call = max(1, min(per_call, self.max_rows or rows))
        try:
            return self._decode(z, per_call, tiled, args, kwargs)
        except Exception as exc:
            if tiled or self.tiling == "off" or not is_out_of_memory(exc):
                raise
            free_device_memory(z.device)
            log.warning("VAE decode of %d image(s) at %d pixels ran out of memory: decoding tiled", rows, pixels)
            return self._decode(z, 1, True, args, kwargs)

    def _decode(self, z: torch.Tensor, per_call: int, tiled: bool, args: Any, kwargs: Any) -> Any:
        with _tiling(self.vae, tiled):
            if tiled:
                self.tiled_calls += 1
            if per_call >= z.shape[0]:
                return self.original(z, *args, **kwargs)
            parts = [self.original(z[i : i + per_call], *args, **kwargs) for i in range(0, int(z.shape[0]), per_call)]
        return _concat(parts)


@contextmanager
def _tiling(vae: Any, on: bool) -> Iterator[None]:
    before = getattr(vae, "use_tiling", False)
    vae.use_tiling = on
    try:
        yield
    finally:
        vae.use_tiling = before


def ceil_to(value: int, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)
