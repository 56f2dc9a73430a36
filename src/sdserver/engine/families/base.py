"""The family contract: what a model family says about itself, and the generation calls the engine drives.

A generation is split into calls so that the engine, not diffusers' pipeline `__call__`, owns the loop:

1. `encode(model, request)` -> `Conditioning`: prompt embeddings for the request's images (and the
   negative ones when it uses classifier-free guidance);
2. `start(model, request, conditioning)` -> `State`: its own scheduler instance and timesteps, and
   initial latents from its seeds (img2img and inpainting: the encoded image, the mask, the strength);
3. `denoise(model, states)`: ONE denoiser forward over the stacked rows of many states, each row with its
   own timestep and guidance scale, then each state's own scheduler step;
4. `finish(model, states)` -> images: decode (the engine then runs the safety checker and restores the
   pixels outside the mask).

Families reuse diffusers' helpers (`encode_prompt`, `prepare_latents`, `retrieve_timesteps`,
`get_timesteps`, the image processors) through the model's own pipelines, with the request's scheduler
bound in for the call; they do not copy pipeline code. One module per family in this package.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from sdserver.core.types import PreparedRequest, Task

if TYPE_CHECKING:
    from sdserver.engine.loaders import LoadedPipelines

Shapes = Mapping[str, tuple[int, ...]]

Guidance = Literal["cfg", "distilled"]
LATENT_FILLS = ("latent_noise", "latent_nothing")  # inpaint_fill values acting on the init image's latents
NO_CHECKER = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


@dataclass(frozen=True)
class FileOptions:
    """How to load a single file: what the weights cannot tell, and where missing parts come from."""

    prediction_type: Literal["epsilon", "v_prediction"] | None = None  # SD 1.x/2.x/XL
    encoders: str | None = None  # SD3/FLUX: a folder or hub id lending the parts the file lacks
    family_encoders: dict[str, str] = field(default_factory=dict)  # the same per family, as the fallback
    token: str | None = None

    def encoders_for(self, family: str) -> str | None:
        return self.encoders or self.family_encoders.get(family)


@dataclass(frozen=True)
class Description:
    """What a model is, as far as can be told without loading its weights."""

    kind: str  # sd1, sd2, sdxl, sd3, flux; "unknown" for a hub model not yet loaded
    inpainting: bool | None


@dataclass(frozen=True)
class Options:
    """Which request fields a family honours (the engine refuses the others by name)."""

    negative_prompt: bool = True
    guidance: Guidance = "cfg"  # cfg: classifier-free guidance; distilled: a guidance embedding (FLUX)
    eta: bool = True
    clip_skip: bool = True


@dataclass
class Conditioning:
    """A request's encoded prompts: each tensor has one row per image, the negative rows first when
    `cfg` (the denoiser's batch then holds [uncond rows; cond rows] for this request)."""

    tensors: dict[str, torch.Tensor]
    cfg: bool
    shared: dict[str, torch.Tensor] = field(default_factory=dict)  # not per row (FLUX's text position ids)


@dataclass(eq=False)
class State:
    """One request in flight: its latents (a row per image), its own scheduler and timesteps."""

    request: PreparedRequest
    scheduler: Any
    timesteps: torch.Tensor
    latents: torch.Tensor
    generators: list[torch.Generator]
    conditioning: Conditioning
    step_kwargs: dict[str, Any] = field(default_factory=dict)  # eta / generator for scheduler.step
    extra: dict[str, Any] = field(default_factory=dict)  # the family's own: masks, image latents, noise, ids
    index: int = 0  # timesteps done so far

    @property
    def rows(self) -> int:
        return int(self.latents.shape[0])

    @property
    def total(self) -> int:
        return len(self.timesteps)

    @property
    def done(self) -> bool:
        return self.index >= self.total

    @property
    def timestep(self) -> torch.Tensor:
        return self.timesteps[self.index]

    @property
    def guidance(self) -> float:
        return self.request.guidance_scale

    @property
    def denoiser_rows(self) -> int:
        return self.rows * (2 if self.conditioning.cfg else 1)


class Family:
    """Base class of the family plug-ins; subclasses fill the class attributes and the calls."""

    name: ClassVar[str]  # the module's family: sd, sdxl, sd3, flux
    kinds: ClassVar[tuple[str, ...]]  # what /models reports: sd1, sd2, sdxl, sd3, flux
    pipeline_classes: ClassVar[tuple[str, ...]]  # diffusers class names in model_index.json
    options: ClassVar[Options] = Options()
    default_steps: ClassVar[int] = 50
    default_guidance: ClassVar[float] = 7.5
    latent_channels: ClassVar[int] = 4
    samplers: ClassVar[dict[str, Any]]  # A1111 name -> SamplerSpec (engine/samplers.py)
    preview_factors: ClassVar[Sequence[Sequence[float]]]  # latent channel -> RGB, for cheap previews
    # The text encoders (pipeline attributes) that take textual-inversion embeddings, in the order of an
    # embedding file's parts (engine/embeddings.py); () for none.
    embedding_encoders: ClassVar[tuple[str, ...]] = ()

    # -- what the model is ---------------------------------------------------------------------
    def kind_of(self, pipe: Any) -> str:
        """The kind of a loaded pipeline of this family (e.g. sd1 or sd2)."""
        return self.kinds[0]

    def describe_index(self, index: dict[str, Any], folder: Path, source: str) -> Description:
        """What a model folder holds, from model_index.json and the component configs (no weights);
        UnsupportedModel if it is a variant this family cannot serve."""
        return Description(self.kinds[0], None)

    def check(self, pipe: Any, source: str) -> None:
        """Refuse (UnsupportedModel) a loaded pipeline of this family that cannot serve txt2img."""

    def pretrained_kwargs(self, index: dict[str, Any]) -> dict[str, Any]:
        """Extra arguments `DiffusionPipeline.from_pretrained` needs for a folder of this family."""
        return {}

    def detect_file(self, path: Path, shapes: Shapes | None, options: FileOptions) -> Description | None:
        """What a single file is, if it is one of this family's (from its tensor names and shapes, read
        from the header; None for a `.ckpt`, which is only read when loaded); UnsupportedModel names a
        related file this family cannot serve."""
        return None

    def load_file(self, path: Path, dtype: torch.dtype, options: FileOptions) -> Any:
        """A diffusers pipeline from a single file of this family (on the CPU), offline."""
        raise NotImplementedError

    def pipelines(self, pipe: Any, device: torch.device) -> tuple[Any, Any, Any]:
        """txt2img, img2img and inpaint pipelines sharing `pipe`'s weights, on `device`. Their safety
        checker slot stays empty: the engine runs the checker itself (engine/safety.py)."""
        from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting, AutoPipelineForText2Image

        txt2img = AutoPipelineForText2Image.from_pipe(
            pipe, **(NO_CHECKER if "safety_checker" in pipe.components else {})
        )
        if txt2img.device != device:  # (diffusers warns on every .to(), needed or not)
            txt2img = txt2img.to(device)
        img2img = AutoPipelineForImage2Image.from_pipe(txt2img)
        inpaint = AutoPipelineForInpainting.from_pipe(txt2img)
        for pipeline in (txt2img, img2img, inpaint):
            pipeline.set_progress_bar_config(disable=True)
        return txt2img, img2img, inpaint

    def denoiser(self, pipe: Any) -> torch.nn.Module:
        raise NotImplementedError

    def is_inpainting(self, pipe: Any) -> bool:
        """A dedicated inpainting model (its denoiser takes the mask and masked image as input)."""
        return False

    def native_size(self, pipe: Any) -> int:
        raise NotImplementedError

    def defaults(self, pipe: Any) -> tuple[int, float]:
        """(steps, guidance scale) a request gets when it names none."""
        return self.default_steps, self.default_guidance

    def default_sampler(self, scheduler: Any) -> str:
        """The A1111 name of the model's own scheduler, for the metadata."""
        from sdserver.engine.samplers import sampler_label

        return sampler_label(None, scheduler, self.samplers)

    # -- the generation calls ------------------------------------------------------------------
    def encode(self, model: LoadedPipelines, request: PreparedRequest) -> Conditioning:
        raise NotImplementedError

    def start(self, model: LoadedPipelines, request: PreparedRequest, conditioning: Conditioning) -> State:
        raise NotImplementedError

    def model_input(self, model: LoadedPipelines, state: State) -> torch.Tensor:
        """The denoiser's input rows for `state` (without the CFG duplicate)."""
        return state.latents

    def forward(
        self, model: LoadedPipelines, states: Sequence[State], inputs: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """One denoiser call over the stacked rows of `states`; returns the prediction per row."""
        raise NotImplementedError

    def latent_fills(self, inpainting_model: bool) -> bool:
        """Whether inpaint_fill's latent_noise and latent_nothing apply (the engine refuses them if not)."""
        return True

    def after_step(self, model: LoadedPipelines, state: State) -> None:
        """After the scheduler step (e.g. blend the known latents back in for inpainting)."""

    def decode(self, model: LoadedPipelines, states: Sequence[State]) -> list[Image.Image]:
        """Images of finished states (all of one size), in order, one VAE call."""
        raise NotImplementedError

    def control_condition(self, model: LoadedPipelines, pixels: torch.Tensor, controlnet: Any) -> torch.Tensor:
        """A control image (1, 3, H, W, in 0..1) as this family's ControlNets take it: a UNet ControlNet
        takes the pixels; transformer ones take them encoded (flow.py)."""
        return pixels

    def image_latents(self, model: LoadedPipelines, state: State) -> torch.Tensor:
        """A finished state's latents as [rows, channels, h, w]: what img2img's `prepare_latents` takes as
        an already-encoded image (a hires fix's latent upscale starts its second pass from them)."""
        return state.latents

    def previews(self, latents: torch.Tensor, state: State) -> list[Image.Image]:
        """Small RGB images of the current latents, by a fixed linear map (no VAE)."""
        return latent_rgb(latents, self.preview_factors)


def denoise(family: Family, model: LoadedPipelines, states: Sequence[State]) -> None:
    """One step for every state: one denoiser forward over all rows (each state's CFG pair included),
    per-row guidance, then each state's own scheduler step."""
    inputs, timesteps = [], []
    for state in states:
        rows = family.model_input(model, state)
        inputs.append(torch.cat([rows, rows]) if state.conditioning.cfg else rows)
        timesteps.append(state.timestep.float().reshape(1).expand(state.denoiser_rows))
    prediction = family.forward(model, states, torch.cat(inputs), torch.cat(timesteps))
    offset = 0
    for state in states:
        own = prediction[offset : offset + state.denoiser_rows]
        offset += state.denoiser_rows
        if state.conditioning.cfg:
            uncond, cond = own.chunk(2)
            own = uncond + state.guidance * (cond - uncond)
        latents = state.scheduler.step(own, state.timestep, state.latents, **state.step_kwargs, return_dict=False)[0]
        state.latents = latents.to(state.latents.dtype)
        family.after_step(model, state)
        state.index += 1


def stacked(states: Sequence[State], key: str) -> torch.Tensor:
    """The conditioning tensor `key` of every state, in the denoiser's row order."""
    return torch.cat([state.conditioning.tensors[key] for state in states])


def generators(request: PreparedRequest) -> list[torch.Generator]:
    """One CPU generator per image, seeded seed + i, so an image is the same whatever shares its batch."""
    return [torch.Generator(device="cpu").manual_seed(seed) for seed in request.seeds]


def step_kwargs(scheduler: Any, gens: list[torch.Generator], eta: float) -> dict[str, Any]:
    """The extra arguments `scheduler.step` takes (as diffusers' prepare_extra_step_kwargs decides)."""
    accepted = set(inspect.signature(scheduler.step).parameters)
    kwargs: dict[str, Any] = {}
    if "eta" in accepted:
        kwargs["eta"] = eta
    if "generator" in accepted:
        kwargs["generator"] = gens
    return kwargs


@contextmanager
def bound(pipe: Any, scheduler: Any) -> Iterator[Any]:
    """`pipe` with the request's own scheduler in place, so its helpers (get_timesteps, prepare_latents)
    act on that instance. Only the worker thread calls pipelines, so swapping the attribute is safe."""
    original = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        yield pipe
    finally:
        pipe.scheduler = original


def init_pixels(pipe: Any, request: PreparedRequest, **size: int) -> Any:
    """Where img2img starts: a hires second pass's tensor (upscaled pixels or latents, a row per image;
    `prepare_latents` encodes pixels and takes latents as they are), else the init image preprocessed."""
    if request.init_tensor is not None:
        return request.init_tensor
    return pipe.image_processor.preprocess(request.init_image, **size)


def upscaled_latents(
    latents: Sequence[torch.Tensor], size: tuple[int, int], factor: int, mode: str, antialias: bool
) -> torch.Tensor:
    """A1111's latent upscalers: the first pass's latents resized to the second pass's size / `factor`."""
    stacked = torch.cat(list(latents))
    shape = (size[1] // factor, size[0] // factor)
    resized = torch.nn.functional.interpolate(stacked.float(), size=shape, mode=mode, antialias=antialias)
    return resized.to(stacked.dtype)


def task_images(request: PreparedRequest) -> tuple[Image.Image | None, Image.Image | None]:
    """The init image and mask the denoiser needs (None where the task has none)."""
    if request.task is Task.TXT2IMG:
        return None, None
    mask = request.mask_image if request.task is Task.INPAINT else None
    return request.init_image, mask


def latent_rgb(latents: torch.Tensor, factors: Sequence[Sequence[float]]) -> list[Image.Image]:
    """Latents [b, c, h, w] -> one RGB image per row by a linear map of the channels."""
    matrix = torch.tensor(factors, dtype=torch.float32)
    latents = latents.detach().float().cpu()[:, : matrix.shape[0]]
    rgb = torch.einsum("bchw,cr->bhwr", latents, matrix)
    pixels = ((rgb + 1) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
    return [Image.fromarray(array, mode="RGB") for array in pixels]


def keep_unmasked(state: State, *, flow: bool) -> None:
    """Inpainting with a regular model, after each step: outside the mask, the original's latents at
    the next step's noise level (flow models interpolate toward the noise, others add it)."""
    known = state.extra.get("image_latents")
    if known is None:
        return
    if state.index < state.total - 1:
        upcoming = torch.tensor([state.timesteps[state.index + 1]])
        noise = state.extra["noise"]
        scheduler = state.scheduler
        known = scheduler.scale_noise(known, upcoming, noise) if flow else scheduler.add_noise(known, noise, upcoming)
    mask = state.extra["mask"]
    state.latents = (1 - mask) * known + mask * state.latents


def latent_fill(request: PreparedRequest, strength: float) -> bool:
    """Does this start change the init image's latents inside the mask (A1111's latent fills)? Not at
    strength 1, where the start is pure noise anyway."""
    return request.task is Task.INPAINT and request.inpaint_fill in LATENT_FILLS and strength < 1.0


def filled_latents(
    request: PreparedRequest, known: torch.Tensor, mask: torch.Tensor, gens: list[torch.Generator]
) -> torch.Tensor:
    """The init image's latents with, inside the mask, random noise (latent_noise) or zeros
    (latent_nothing) in their place: the start's noise is then added to these, as A1111 does."""
    if request.inpaint_fill == "latent_noise":
        noise = randn_tensor(tuple(known.shape), generator=gens, device=known.device, dtype=known.dtype)
        return known * (1 - mask) + noise * mask
    if request.inpaint_fill == "latent_nothing":
        return known * (1 - mask)
    return known
