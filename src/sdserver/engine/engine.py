"""The engine: owns the device and the loaded models; the service's only way to torch."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from PIL import Image

from sdserver.core.errors import Cancelled, FieldError, InvalidRequest
from sdserver.core.limits import Limits
from sdserver.core.sizing import hires_size
from sdserver.core.types import (
    SAMPLER_NAMES,
    GeneratedImage,
    GenerationRequest,
    HiresFix,
    LoraRef,
    PreparedRequest,
    Task,
    strength_problem,
    upscale_size,
)
from sdserver.engine import families
from sdserver.engine.control import control_images
from sdserver.engine.controlnets import ControlNetLibrary
from sdserver.engine.device import device_memory, pick_device, pick_dtype
from sdserver.engine.embeddings import listing, load_embeddings
from sdserver.engine.families.base import LATENT_FILLS, upscaled_latents
from sdserver.engine.loaders import LoadedPipelines
from sdserver.engine.loras import LoraLibrary, applied
from sdserver.engine.registry import ModelSpec, Registry, specs_from_settings
from sdserver.engine.session import Session, failures
from sdserver.engine.speed import Tuning, lora_ready
from sdserver.engine.upscalers import Upscalers
from sdserver.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_UPSCALER = "Lanczos"  # an upscale task's when it names none

LATENT_RESAMPLING = {"bicubic": Image.Resampling.BICUBIC, "nearest": Image.Resampling.NEAREST,
                     "nearest-exact": Image.Resampling.NEAREST}  # fmt: skip

NOT_LOADED = "the model is not loaded; embeddings are matched to it as it loads"  # /sdapi/v1/embeddings
# (steps done, total steps, previews): may raise to stop the run; previews() gives one small image per
# output image of the batch, computed only if called.
StepCallback = Callable[[int, int, Callable[[], list[Image.Image]]], None]


class Engine:
    def __init__(
        self,
        registry: Registry,
        *,
        fall_back_to_demo: bool = False,
        preload: list[str] | None = None,
        loras: LoraLibrary | None = None,
        limits: Limits | None = None,
        controlnets: ControlNetLibrary | None = None,
        upscalers: Upscalers | None = None,
    ) -> None:
        self.registry = registry
        self.loras = loras or LoraLibrary(None)
        self.controlnets = controlnets or ControlNetLibrary(None)
        self.limits = limits or Limits()
        self.upscalers = upscalers or Upscalers(None)  # the built-in resamplers only
        self._fall_back_to_demo = fall_back_to_demo
        self._preload = preload or []

    @classmethod
    def from_settings(cls, settings: Settings) -> Engine:
        device = pick_device(settings.device)
        tuning = Tuning.from_settings(settings, device)
        tuning.apply_globally(device)
        registry = Registry(
            specs_from_settings(settings),
            device=device,
            dtype=pick_dtype(settings.dtype, device),
            token=settings.hf_token,
            encoders=settings.encoders,
            max_loaded=settings.max_loaded_models,
            max_memory_bytes=int(settings.max_memory_gb * 1e9) if settings.max_memory_gb is not None else None,
            models_dir=settings.models_dir,
            tuning=tuning,
            embeddings_dir=settings.embeddings_dir,
        )
        return cls(
            registry,
            fall_back_to_demo=not settings.model_explicit,
            preload=settings.preload,
            loras=LoraLibrary(settings.loras_dir),
            limits=settings.limits,
            controlnets=ControlNetLibrary(settings.controlnet_dir),
            upscalers=Upscalers(settings.upscalers_dir, device, registry.dtype),
        )

    def load(self) -> None:
        """Load the base model and the --preload ones (slow: call before serving); the others load on first use."""
        self.registry.preload(self._preload, fall_back_to_demo=self._fall_back_to_demo)

    def stats(self) -> dict[str, dict[str, float]]:
        """Numbers for the metrics endpoint."""
        registry = self.registry
        return {
            "models": {
                "loaded": len(registry.loaded_names()),
                "loads": registry.load_count,
                "unloads": registry.unload_count,
                "loaded_bytes": registry.loaded_bytes(),
            },
            "device_memory_bytes": device_memory(registry.device),
        }

    def models(self) -> list[ModelSpec]:
        return [self.registry.spec(name) for name in self.registry.names()]

    def prepare(self, request: GenerationRequest) -> PreparedRequest:
        """Check the request against its model and fill what the model decides: its name, the size,
        the steps and the guidance scale when the client gave none."""
        spec = self.registry.spec(request.model)
        if request.task is Task.UPSCALE:
            return self._prepare_upscale(request, spec.name)
        self.loras.check(request.loras)
        model = self.registry.get(spec.name)
        check_options(model, request)
        steps = request.steps or model.default_steps
        problem = strength_problem(request.task, steps, request.strength)
        if problem is not None:
            raise InvalidRequest(f"strength: {problem}, got {request.strength}", field="strength")
        guidance = model.default_guidance if request.guidance_scale is None else request.guidance_scale
        native = None if request.init_image is not None else model.native_size
        filled = request.model_copy(update={"model": spec.name, "steps": steps, "guidance_scale": guidance})
        prepared = PreparedRequest.model_construct(**dict(filled.sized(self.limits, native))).framed()
        if prepared.controlnets:
            maps = control_images(self.controlnets, prepared, model.family.name, model.description.kind)
            prepared = prepared.model_copy(update={"control_images": maps})
        return prepared if prepared.hires is None else self._prepare_hires(prepared, model)

    def _prepare_upscale(self, request: GenerationRequest, model: str) -> PreparedRequest:
        """An upscale: the upscaler known, the size within the limits; no model is loaded for it."""
        self.upscalers.check(request.upscaler or DEFAULT_UPSCALER, field="upscaler")
        size = upscale_size(request, self.limits)
        fields = {"model": model, "steps": 1, "guidance_scale": 0.0, "width": size[0], "height": size[1]}
        return PreparedRequest.model_construct(**{**dict(request), **fields})

    def run_upscale(self, request: PreparedRequest) -> list[GeneratedImage]:
        """An upscale task (on the worker thread): the init image through its upscaler, at its size."""
        assert request.init_image is not None and request.seed is not None
        upscaler = request.upscaler or DEFAULT_UPSCALER
        (picture,) = self.upscale([request.init_image], upscaler, request.width, request.height)
        return [GeneratedImage(image=picture, seed=request.seed, nsfw=False)]

    def _prepare_hires(self, request: PreparedRequest, model: LoadedPipelines) -> PreparedRequest:
        """Check a hires fix against the limits and the model, and fill in its size and steps."""
        hires = request.hires
        assert hires is not None
        self._hires_size(request)  # within the limits
        steps = hires.steps or request.steps
        if steps > self.limits.max_steps:
            raise InvalidRequest(f"hires: steps {steps} is over the limit of {self.limits.max_steps}", field="hires")
        if hires.latent is None:
            self.upscalers.check(hires.upscaler, field="hires")
        sampler = hires.sampler or request.sampler
        check_options(model, request.model_copy(update={"sampler": sampler, "negative_prompt": hires.negative_prompt}))
        return request.model_copy(update={"hires": hires.model_copy(update={"steps": steps})})

    def _hires_size(self, request: PreparedRequest) -> tuple[int, int]:
        hires = request.hires
        assert hires is not None
        try:
            return hires_size((request.width, request.height), hires.scale, hires.width, hires.height, self.limits)
        except FieldError as exc:
            raise exc.invalid() from None

    def upscaled(self, request: PreparedRequest, images: Sequence[GeneratedImage]) -> list[GeneratedImage]:
        """A hires fix whose second pass has no denoising step (strength x steps < 1, as A1111's API tests
        send): the first pass's images upscaled are the result (latent upscalers: resampled alike)."""
        hires = request.hires
        assert hires is not None
        size = self._hires_size(request)
        final = PreparedRequest.model_construct(
            **{**dict(request), "width": size[0], "height": size[1], "strength": hires.strength, "first_pass": request}
        )
        with self.registry.use(request.model) as model:
            session = Session(model, request.model, self.model_hash, self.controlnets)
            pictures = self._upscaled_pictures([image.image for image in images], hires, size)
            return session.final_images(final, pictures)

    def _upscaled_pictures(
        self, pictures: list[Image.Image], hires: HiresFix, size: tuple[int, int]
    ) -> list[Image.Image]:
        """The first pass's pictures at the hires size: a latent upscaler's interpolation done on the
        pixels (where no latents go on), else the upscaler."""
        if hires.latent is not None:
            resample = LATENT_RESAMPLING.get(hires.latent[0], Image.Resampling.BILINEAR)
            return [picture.resize(size, resample) for picture in pictures]
        return self.upscale(pictures, hires.upscaler, *size)

    def second_pass(self, request: PreparedRequest, images: Sequence[GeneratedImage]) -> PreparedRequest:
        """A hires fix's second pass: the first pass's latents or images upscaled to the hires size, as
        the start of an img2img pass there. Runs on the worker thread (an upscaler model may run)."""
        hires = request.hires
        assert hires is not None and hires.steps
        size = self._hires_size(request)
        with self.registry.use(request.model) as model, failures(self.registry.device):
            factor = int(model.txt2img.vae_scale_factor)
            if hires.latent is not None and not model.inpainting_unet:  # an inpainting UNet starts from pixels
                mode, antialias = hires.latent
                start = upscaled_latents([image.latents for image in images], size, factor, mode, antialias)
                pictures = [image.image.resize(size, Image.Resampling.LANCZOS) for image in images[:1]]
            else:
                pictures = self._upscaled_pictures([image.image for image in images], hires, size)
                start = model.img2img.image_processor.preprocess(pictures, height=size[1], width=size[0])
        update = {
            "task": Task.IMG2IMG,
            "width": size[0],
            "height": size[1],
            "steps": hires.steps,
            "strength": hires.strength,
            "sampler": hires.sampler or request.sampler,
            "prompt": hires.prompt or request.prompt,
            "negative_prompt": hires.negative_prompt or request.negative_prompt,
            "init_image": pictures[0],
            "first_pass": request,
            "init_tensor": start,
        }
        return PreparedRequest.model_construct(**{**dict(request), **update})

    @contextmanager
    def session(self, name: str, loras: Sequence[LoraRef] = ()) -> Iterator[Session]:
        """Generations on model `name` with `loras` active: the model is not unloaded meanwhile, and
        afterwards every LoRA is off again."""
        with (
            self.registry.use(name) as model,
            failures(self.registry.device),
        ):
            if loras:
                lora_ready(model, name)
            with applied(self.loras, model, loras):
                yield Session(model, name, self.model_hash, self.controlnets)

    def run(self, requests: Sequence[GenerationRequest], on_step: StepCallback) -> list[list[GeneratedImage]]:
        """Run prepared requests (one model, one LoRA set) together, a denoising step at a time;
        `on_step` may raise (Cancelled) to stop."""
        prepared = [r if isinstance(r, PreparedRequest) else self.prepare(r) for r in requests]
        first = prepared[0]
        with self.session(first.model, first.loras) as session:
            states = [session.admit(request) for request in prepared]
            total = max(state.total for state in states)
            for done in range(1, total + 1):
                session.step([state for state in states if not state.done])
                on_step(done, total, lambda: [image for state in states for image in session.previews(state)])
            return session.finish(states)

    def upscale(self, images: list[Image.Image], name: str, width: int, height: int) -> list[Image.Image]:
        """Each image upscaled by upscaler `name` to exactly `width` x `height` (on the worker thread:
        Scheduler.call). A model upscaler loads on first use."""
        with failures(self.upscalers.device):
            return [self.upscalers.upscale(image, name, width, height) for image in images]

    def native_size(self, name: str | None) -> int | None:
        """The model's native image side (px), known once it is loaded; asking never loads a model."""
        loaded = self.registry.loaded(name)
        return None if loaded is None else loaded.native_size

    def samplers(self, name: str | None) -> list[str]:
        """The sampler names valid for the model's family (from its files when it is not loaded; every
        name while its kind is unknown, e.g. a hub model not yet loaded); asking never loads a model."""
        family = families.for_kind(self.registry.info(name).kind)
        return list(family.samplers) if family is not None else list(SAMPLER_NAMES)

    def model_hash(self, name: str | None) -> str | None:
        """sha256 (hex) of the model's denoiser weights, computed when it was first loaded (not per
        request); None for a model never loaded: asking never loads one."""
        return self.registry.weights_hash(name)

    def embeddings(self, name: str | None) -> dict[str, dict[str, dict[str, Any]]]:
        """A1111's /sdapi/v1/embeddings for model `name`: the embeddings registered with it and those skipped
        (with a `reason`). Asking never loads a model: one not loaded lists every file as skipped."""
        model = self.registry.loaded(name)
        if model is not None:
            return model.embeddings.a1111()
        return listing(self.registry.embeddings_dir, NOT_LOADED).a1111()

    def embedding_notes(self, request: GenerationRequest) -> list[str]:
        """One line per skipped embedding the request's prompts name, saying why it was not used (other
        words are just words); nothing for a model not loaded."""
        model = self.registry.loaded(request.model)
        return [] if model is None else model.embeddings.notes(request.prompt, request.negative_prompt)

    def refresh_embeddings(self) -> None:
        """Register the embeddings added to embeddings_dir since each loaded model loaded. Call it on the
        worker thread (Scheduler.call): it grows the text encoders' token tables. Files removed or changed
        meanwhile stay as they were registered until the model loads again."""
        for name in self.registry.loaded_names():
            model = self.registry.loaded(name) if name in self.registry.names() else None
            if model is not None:
                folder, offloaded = self.registry.embeddings_dir, model.offload != "none"
                model.embeddings = load_embeddings(
                    model.family, model.txt2img, folder, model.embeddings, offloaded=offloaded
                )


def check_options(model: LoadedPipelines, request: GenerationRequest) -> None:
    """Refuse, by field, what the model's family cannot honour."""
    family, kind = model.family, model.description.kind
    if request.sampler is not None and request.sampler not in family.samplers:
        valid = ", ".join(family.samplers)
        raise InvalidRequest(
            f"sampler: {request.sampler!r} does not apply to {kind} models; valid: {valid}", field="sampler"
        )
    if request.negative_prompt and not family.options.negative_prompt:
        reason = f"{kind} models are guidance-distilled and take no negative prompt"
        raise InvalidRequest(f"negative_prompt: {reason}; leave it empty", field="negative_prompt")
    if request.eta and not family.options.eta:
        raise InvalidRequest(f"eta: {kind} models' samplers take no eta, got {request.eta}", field="eta")
    if request.clip_skip is not None:
        if not family.options.clip_skip:
            raise InvalidRequest(f"clip_skip: does not apply to {kind} models", field="clip_skip")
        layers = int(model.txt2img.text_encoder.config.num_hidden_layers)
        if request.clip_skip > layers:
            reason = f"must be at most {layers} (the CLIP layers of model {request.model or 'the base model'!r})"
            raise InvalidRequest(f"clip_skip: {reason}, got {request.clip_skip}", field="clip_skip")
    fill = request.inpaint_fill
    if request.task is Task.INPAINT and fill in LATENT_FILLS and not family.latent_fills(model.inpainting_unet):
        reason = f"{fill!r} does not apply to {kind} inpainting models; use 'original' or 'fill'"
        raise InvalidRequest(f"inpaint_fill: {reason}", field="inpaint_fill")


__all__ = ["Cancelled", "Engine"]
