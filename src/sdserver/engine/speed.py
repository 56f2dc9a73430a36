"""Speed switches and memory modes: resolved once from the settings for the device (a switch the device
cannot honour stops start-up with one line), applied in one place to each model as it loads.

Order at load: weights on the CPU are quantised, QKV-fused and put in channels-last layout
(`prepare`); the offload mode is chosen; the family builds its pipelines on the device (or on the CPU
when offloading); then `finish` attaches the offload hooks, wraps the denoiser and VAE so each call
stays within memory (memory.py), measures the model's memory needs, and compiles and warms up the
configured sizes, all before the model serves.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import time
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import torch

from sdserver.core.errors import ConfigError
from sdserver.core.types import PreparedRequest, Task
from sdserver.engine.device import free_device_memory
from sdserver.engine.families import denoise
from sdserver.engine.memory import Decoder, Fit, MemoryModel, RowSplitter, available_bytes, peak_bytes
from sdserver.settings import Settings, parse_size

if TYPE_CHECKING:
    from sdserver.engine.loaders import LoadedPipelines

log = logging.getLogger(__name__)

Offload = Literal["auto", "none", "model", "sequential"]
# Blocks compiled per denoiser class where diffusers names none (`_repeated_blocks`).
REGIONS = {"SD3Transformer2DModel": ("JointTransformerBlock",)}
GB = 1e9


@dataclass(frozen=True)
class Tuning:
    channels_last: bool = False
    fuse_qkv: bool = False
    compile: bool = False
    compile_sizes: tuple[tuple[int, int], ...] = ()  # (): each model's native size
    max_rows: int = 16  # denoiser rows of a full batch (max_batch_size x 2 for CFG): the largest compiled bucket
    offload: Offload = "none"
    vae_tiling: Literal["auto", "on", "off"] = "auto"
    tile_above: int = 4_200_000  # pixels
    attention_slicing: bool = False
    quantize: Literal["none", "int8", "fp8"] = "none"
    memory_limit: int | None = None  # bytes
    tf32: bool = False

    @classmethod
    def from_settings(cls, settings: Settings, device: torch.device) -> Tuning:
        """The switches for `device`; ConfigError (one line) for one it cannot honour."""
        cuda = device.type == "cuda"
        capability = torch.cuda.get_device_capability(device) if cuda else (0, 0)
        _check(settings, device, capability)
        slicing = _auto(settings.attention_slicing, device.type == "mps")
        return cls(
            channels_last=_auto(settings.channels_last, cuda),
            fuse_qkv=_auto(settings.fuse_qkv, cuda) and not slicing,  # slicing replaces the fused processors
            tf32=_auto(settings.tf32, cuda and capability >= (8, 0)),
            compile=settings.compile,
            compile_sizes=tuple(parse_size(size) for size in settings.compile_sizes),
            max_rows=2 * settings.max_batch_size,
            offload=settings.offload if cuda else "none",
            vae_tiling=settings.vae_tiling,
            tile_above=int(settings.vae_tile_megapixels * 1e6),
            attention_slicing=slicing,
            quantize=settings.quantize,
            memory_limit=int(settings.memory_limit_gb * GB) if settings.memory_limit_gb is not None else None,
        )

    def apply_globally(self, device: torch.device) -> None:
        """Process-wide switches: TF32, and the CUDA allocator's cap for memory_limit_gb."""
        if device.type != "cuda":
            return
        torch.backends.cuda.matmul.allow_tf32 = self.tf32
        torch.backends.cudnn.allow_tf32 = self.tf32
        if self.memory_limit is not None:
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, self.memory_limit / total), device)


def _auto(value: str, default: bool) -> bool:
    return default if value == "auto" else value == "on"


def _check(settings: Settings, device: torch.device, capability: tuple[int, int]) -> None:
    kind = device.type
    if settings.tf32 == "on" and capability < (8, 0):
        where = f"this GPU is {capability[0]}.{capability[1]}" if kind == "cuda" else f"the device is {kind}"
        raise ConfigError(f"tf32: on needs an NVIDIA Ampere or newer GPU (compute capability 8.0+), and {where}")
    if settings.offload in ("model", "sequential") and kind != "cuda":
        why = "the GPU shares the CPU's memory" if kind == "mps" else "there is no GPU"
        raise ConfigError(
            f"offload: {settings.offload} moves weights between CPU memory and a GPU, but on {kind} {why}; "
            "use auto or none"
        )
    if settings.compile:
        problem = _compile_problem(kind)
        if problem:
            raise ConfigError(f"compile: {problem}; leave compile off")
    if settings.quantize != "none":
        if settings.quantize == "fp8" and kind == "mps":
            raise ConfigError("quantize: fp8 does not run on mps; use int8")
        if settings.quantize == "fp8" and kind == "cuda" and capability < (8, 9):
            raise ConfigError(
                f"quantize: fp8 needs an NVIDIA Ada or Hopper GPU (compute capability 8.9+), this one is "
                f"{capability[0]}.{capability[1]}; use int8"
            )
        if importlib.util.find_spec("torchao") is None:  # after what no install could fix
            raise ConfigError(f"quantize: {settings.quantize} needs torchao (pip install torchao), not installed")
    if settings.memory_limit_gb is not None and kind == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory / GB
        if settings.memory_limit_gb > total:
            raise ConfigError(f"memory_limit_gb: {settings.memory_limit_gb:g} is more than the GPU's {total:.1f} GB")


def _compile_problem(kind: str) -> str | None:
    if kind == "mps":
        return "torch.compile's Metal backend is experimental and not supported here"
    if kind == "cuda" and importlib.util.find_spec("triton") is None:
        return "compiling for CUDA needs triton (pip install triton)"
    if kind == "cpu":
        compiler = os.environ.get("CXX", "g++")
        if shutil.which(compiler) is None:
            return (
                f"compiling for the CPU needs a C++ compiler, and {compiler!r} was not found (install g++ or set CXX)"
            )
    return None


# -- at load: before the weights are placed on the device --------------------------------------------


def prepare(pipe: Any, family: Any, device: torch.device, tuning: Tuning, name: str) -> Offload:
    """Quantise, fuse and lay out the weights (still on the CPU), and choose the offload mode."""
    denoiser = family.denoiser(pipe)
    if tuning.quantize != "none":
        _quantize(denoiser, tuning.quantize, name)
    if tuning.fuse_qkv and _plain_weights(denoiser) and hasattr(denoiser, "fuse_qkv_projections"):
        try:
            denoiser.fuse_qkv_projections()
            denoiser._sdserver_fused_qkv = True
        except ValueError as exc:  # e.g. added KV projections
            log.info("%s: QKV projections not fused (%s)", name, exc)
    if tuning.channels_last:
        denoiser.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if tuning.attention_slicing:
        pipe.enable_attention_slicing()
    return choose_offload(pipe, device, tuning, name)


def _plain_weights(module: torch.nn.Module) -> bool:
    """Floating-point weights only (not GGUF or otherwise quantised: those cannot be concatenated)."""
    return all(type(p) is torch.nn.Parameter and p.dtype.is_floating_point for p in module.parameters())


def _quantize(denoiser: torch.nn.Module, kind: str, name: str) -> None:
    if not _plain_weights(denoiser):
        log.info("%s: the denoiser's weights are already quantised; quantize=%s left out", name, kind)
        return
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    before = _bytes(denoiser)
    quantize_(denoiser, Int8WeightOnlyConfig() if kind == "int8" else Float8WeightOnlyConfig())
    log.info("%s: denoiser weights quantised to %s (%.2f -> %.2f GB)", name, kind, before / GB, _bytes(denoiser) / GB)


def _bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def choose_offload(pipe: Any, device: torch.device, tuning: Tuning, name: str) -> Offload:
    """auto: none if the whole model and room to work fit in free GPU memory, else model (its largest
    part and room to work fit), else sequential. Says what it chose and why."""
    if tuning.offload != "auto" or device.type != "cuda":
        return tuning.offload if tuning.offload != "auto" else "none"
    parts = {key: _bytes(module) for key, module in pipe.components.items() if isinstance(module, torch.nn.Module)}
    total, (largest, largest_bytes) = sum(parts.values()), max(parts.items(), key=lambda item: item[1])
    free = available_bytes(device, tuning.memory_limit) or 0
    work = max(int(1.5 * 2**30), total // 5)  # a step and a decode at the native size, roughly
    mode: Offload = "none" if total + work <= free else "model" if largest_bytes + work <= free else "sequential"
    log.info(
        "offload auto for %s: the model is %.1f GB (largest part: %s, %.1f GB), %.1f GB of %s memory is free, "
        "%.1f GB kept for work: %s",
        name, total / GB, largest, largest_bytes / GB, free / GB, device, work / GB, mode,
    )  # fmt: skip
    return mode


# -- at load: once the pipelines exist -------------------------------------------------------------


def finish(model: LoadedPipelines, device: torch.device, tuning: Tuning, offload: Offload, name: str) -> None:
    """Offload hooks, memory wrappers and calibration, then compilation and warm-up."""
    pipe = model.txt2img
    if offload != "none":
        _attach_offload(model, device, offload)
    model.offload = offload
    budget = device.type != "cpu" or tuning.memory_limit is not None
    memory = MemoryModel(device, model.memory_bytes, limit=tuning.memory_limit) if budget else None
    model.memory = memory
    model.splitter = RowSplitter(model.family.denoiser(pipe), memory)
    model.decoder = Decoder(pipe.vae, memory, tuning.vae_tiling, tuning.tile_above, int(pipe.vae_scale_factor))
    if memory is not None:
        try:
            calibrate(model, memory, name)
        except Exception as exc:  # e.g. out of memory on a small card: serve, without the estimate
            free_device_memory(device)
            log.warning("%s: memory needs not measured (%s: %s); batches are not split to fit", name,
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")  # fmt: skip
    if tuning.compile:
        try:
            compile_and_warm_up(model, tuning, name)
        except Exception as exc:  # a compiler failure must not keep the model from serving
            _uncompile(model)
            log.error("%s: compiling failed (%s: %s); serving it uncompiled", name, type(exc).__name__,
                      str(exc).splitlines()[0] if str(exc) else "")  # fmt: skip


def _attach_offload(model: LoadedPipelines, device: torch.device, mode: Offload) -> None:
    from accelerate import cpu_offload_with_hook

    pipe = model.txt2img
    if mode == "model":
        pipe.enable_model_cpu_offload(device=device)
        if model.checker is not None and model.owns_checker:
            _, hook = cpu_offload_with_hook(model.checker.model, device)
            pipe._all_hooks.append(hook)
    else:
        pipe.enable_sequential_cpu_offload(device=device)
        if model.checker is not None and model.owns_checker:
            model.checker.model.to(device)  # small; leaf-by-leaf moves would cost more than it saves


def before_encode(model: LoadedPipelines) -> None:
    """Model offload: every part back to the CPU, so the text encoders never share the GPU with the
    denoiser (FLUX's T5 and transformer together are larger than most cards)."""
    if model.offload == "model":
        for hook in getattr(model.txt2img, "_all_hooks", []):
            hook.offload()


# -- probes: calibration and warm-up run the family's own calls ------------------------------------


def probe(model: LoadedPipelines, side: int | tuple[int, int], images: int, *, cfg: bool = True) -> PreparedRequest:
    width, height = (side, side) if isinstance(side, int) else side
    guidance = model.default_guidance if cfg else 1.0
    return PreparedRequest.model_construct(
        task=Task.TXT2IMG, model="probe", prompt="a probe", negative_prompt=None, num_images=images, seed=0,
        steps=3, guidance_scale=guidance, eta=0.0, width=width, height=height, strength=0.7, init_image=None,
        mask_image=None, sampler=None, clip_skip=None, loras=(),
    )  # fmt: skip


def _probe_sides(model: LoadedPipelines) -> tuple[int, int]:
    small = max(64, (model.native_size // 4) // 64 * 64)
    return small, 2 * small


def calibrate(model: LoadedPipelines, memory: MemoryModel, name: str) -> None:
    """Fit the step's and the decode's peak memory from probes: 1 and 2 images at a small side, 1 at twice it."""
    started = time.perf_counter()
    family, small, big = model.family, *_probe_sides(model)
    steps, decodes, rows = [], [], []
    with torch.no_grad():
        for side, images in ((small, 1), (small, 2), (big, 1)):
            before_encode(model)
            state = family.start(model, (request := probe(model, side, images)), family.encode(model, request))
            if memory.device.type != "cpu":  # unmeasured first: weights moved in, caches allocated
                denoise(family, model, [state])
            steps.append(peak_bytes(memory.device, partial(denoise, family, model, [state])))
            if memory.device.type != "cpu":
                family.decode(model, [state])
            decodes.append(peak_bytes(memory.device, partial(family.decode, model, [state])))
            rows.append(state.denoiser_rows)
            if side == small and images == 1:
                memory.pixels_per_element = side * side / family.model_input(model, state)[0].numel()
    pixels = (small * small, big * big)
    memory.denoiser = Fit.from_probes(steps[0], steps[1], (rows[0], rows[1]), steps[2], pixels)
    memory.decoder = Fit.from_probes(decodes[0], decodes[1], (1, 2), decodes[2], pixels)
    free_device_memory(memory.device)
    native = model.native_size
    log.info(
        "%s: memory measured in %.1fs: a step over 2 rows at %dx%d needs %.2f GB, a decode %.2f GB per image",
        name, time.perf_counter() - started, native, native, memory.estimate(2, native, native) / GB,
        memory.decoder.bytes(1, native * native) / GB,
    )  # fmt: skip


def compile_and_warm_up(model: LoadedPipelines, tuning: Tuning, name: str) -> None:
    """Regional compilation of the denoiser's repeated blocks and of the VAE decoder, then one step per
    configured size and row bucket (powers of two), so those shapes are compiled before serving. Other
    shapes later run uncompiled instead of recompiling (torch.compiler's eager_on_recompile stance)."""
    import torch._dynamo

    started = time.perf_counter()
    pipe, family = model.txt2img, model.family
    denoiser = family.denoiser(pipe)
    regions = REGIONS.get(type(denoiser).__name__) or tuple(getattr(denoiser, "_repeated_blocks", ()) or ())
    compiled = [module for module in denoiser.modules() if type(module).__name__ in regions]
    for module in compiled:
        module.compile()
    pipe.vae.decoder.compile()
    assert model.splitter is not None and model.decoder is not None
    model.decoder.max_rows = 1  # one compiled decoder shape per size
    buckets = tuple(1 << i for i in range(tuning.max_rows.bit_length()) if 1 << i <= tuning.max_rows)
    sizes = tuning.compile_sizes or ((model.native_size, model.native_size),)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 8 * len(buckets) * len(sizes))
    model.splitter.buckets = buckets
    with torch.no_grad(), torch.compiler.set_stance("default"):
        for size in sizes:
            _warm_up(model, size, buckets)
    torch.compiler.set_stance("eager_on_recompile")
    log.info(
        "%s: compiled %d %s blocks and the VAE decoder for %s at %s rows in %.1fs",
        name, len(compiled), "/".join(regions) or "no", ", ".join(f"{w}x{h}" for w, h in sizes),
        ",".join(map(str, buckets)), time.perf_counter() - started,
    )  # fmt: skip


def _uncompile(model: LoadedPipelines) -> None:
    import torch._dynamo

    for module in [*model.family.denoiser(model.txt2img).modules(), *model.txt2img.vae.decoder.modules()]:
        module._compiled_call_impl = None  # what nn.Module.compile() set
    if model.splitter is not None:
        model.splitter.buckets, model.splitter.bucketed_shapes = (), set()
    if model.decoder is not None:
        model.decoder.max_rows = None
    torch._dynamo.reset()


def _warm_up(model: LoadedPipelines, size: tuple[int, int], buckets: tuple[int, ...]) -> None:
    family, splitter = model.family, model.splitter
    assert splitter is not None
    uses_cfg = family.options.guidance == "cfg"
    state = family.start(model, (request := probe(model, size, 1, cfg=False)), family.encode(model, request))
    splitter.bucketed_shapes.add(tuple(family.model_input(model, state).shape[1:]))
    for rows in buckets:
        images, cfg = (rows // 2, True) if uses_cfg and rows > 1 else (rows, False)
        before_encode(model)
        state = family.start(model, (request := probe(model, size, images, cfg=cfg)), family.encode(model, request))
        denoise(family, model, [state])
    family.decode(model, [state])


def lora_ready(model: LoadedPipelines, name: str) -> None:
    """LoRA adapters attach to the separate query/key/value projections: unfuse them, for good (undoing
    it per request would recompile compiled blocks each time)."""
    denoiser: Any = model.family.denoiser(model.txt2img)
    if getattr(denoiser, "_sdserver_fused_qkv", False):
        denoiser.unfuse_qkv_projections()
        denoiser._sdserver_fused_qkv = False
        log.info("%s: QKV projections unfused (a LoRA is in use on it)", name)
