"""The engine: owns the device and the loaded models; the service's only way to torch."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from PIL import Image

from sdserver.core.errors import Cancelled, InvalidRequest
from sdserver.core.limits import Limits
from sdserver.core.types import (
    SAMPLER_NAMES,
    GeneratedImage,
    GenerationRequest,
    LoraRef,
    PreparedRequest,
    Task,
    strength_problem,
)
from sdserver.engine import families
from sdserver.engine.device import device_memory, pick_device, pick_dtype
from sdserver.engine.families.base import LATENT_FILLS
from sdserver.engine.loaders import LoadedPipelines
from sdserver.engine.loras import LoraLibrary, applied
from sdserver.engine.registry import ModelSpec, Registry, specs_from_settings
from sdserver.engine.session import Session, failures
from sdserver.engine.speed import Tuning, lora_ready
from sdserver.settings import Settings

log = logging.getLogger(__name__)

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
    ) -> None:
        self.registry = registry
        self.loras = loras or LoraLibrary(None)
        self.limits = limits or Limits()
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
        )
        return cls(
            registry,
            fall_back_to_demo=not settings.model_explicit,
            preload=settings.preload,
            loras=LoraLibrary(settings.loras_dir),
            limits=settings.limits,
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
        return PreparedRequest.model_construct(**dict(filled.sized(self.limits, native))).framed()

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
                yield Session(model, name, self.model_hash)

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
