"""The engine: owns the device and the loaded models; the service's only way to torch."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from PIL import Image

from sdserver import metadata
from sdserver.core.errors import Cancelled, GenerationError, InvalidRequest, OutOfMemory, SDServerError
from sdserver.core.types import SAMPLER_NAMES, GeneratedImage, GenerationRequest
from sdserver.engine.device import device_memory, free_device_memory, is_out_of_memory, pick_device, pick_dtype
from sdserver.engine.loaders import LoadedPipelines
from sdserver.engine.loras import LoraLibrary, applied
from sdserver.engine.registry import ModelSpec, Registry, specs_from_settings
from sdserver.engine.runner import StepCallback, run_batch
from sdserver.engine.samplers import sampler_label
from sdserver.settings import Settings

log = logging.getLogger(__name__)


class Engine:
    def __init__(
        self,
        registry: Registry,
        *,
        fall_back_to_demo: bool = False,
        preload: list[str] | None = None,
        loras: LoraLibrary | None = None,
    ) -> None:
        self.registry = registry
        self.loras = loras or LoraLibrary(None)
        self._fall_back_to_demo = fall_back_to_demo
        self._preload = preload or []

    @classmethod
    def from_settings(cls, settings: Settings) -> Engine:
        device = pick_device(settings.device)
        registry = Registry(
            specs_from_settings(settings),
            device=device,
            dtype=pick_dtype(settings.dtype, device),
            token=settings.hf_token,
            max_loaded=settings.max_loaded_models,
            max_memory_bytes=int(settings.max_memory_gb * 1e9) if settings.max_memory_gb is not None else None,
            models_dir=settings.models_dir,
        )
        return cls(
            registry,
            fall_back_to_demo=not settings.model_explicit,
            preload=settings.preload,
            loras=LoraLibrary(settings.loras_dir),
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

    def prepare(self, request: GenerationRequest) -> GenerationRequest:
        """Check the request against its model and fill what the model decides (name, size, steps)."""
        spec = self.registry.spec(request.model)
        self.loras.check(request.loras)
        if request.steps is None:
            request = request.with_steps(self.registry.get(spec.name).default_steps)
        update: dict[str, object] = {"model": spec.name}
        if request.clip_skip is not None:
            layers = int(self.registry.get(spec.name).txt2img.text_encoder.config.num_hidden_layers)
            if request.clip_skip > layers:
                reason = f"must be at most {layers} (the CLIP layers of model {spec.name!r})"
                raise InvalidRequest(f"clip_skip: {reason}, got {request.clip_skip}", field="clip_skip")
        if request.init_image is not None:
            init = _fit_to_multiple(request.init_image, 8)
            update.update(init_image=init, width=init.width, height=init.height)
            if request.mask_image is not None:
                update["mask_image"] = request.mask_image.convert("L").resize(init.size, Image.Resampling.LANCZOS)
        else:
            native = self.registry.get(spec.name).native_size
            update.update(width=request.width or native, height=request.height or native)
        return request.model_copy(update=update)

    def run(self, requests: Sequence[GenerationRequest], on_step: StepCallback) -> list[list[GeneratedImage]]:
        """Run prepared, compatible requests as one pipeline call."""
        try:
            with self.registry.use(requests[0].model) as model:  # not unloaded while the batch runs
                with applied(self.loras, model, requests[0].loras):  # the batch key includes the LoRAs
                    outputs = run_batch(model, requests, on_step)
                self._describe(model, requests, outputs)
                return outputs
        except SDServerError:
            raise  # e.g. Cancelled raised by on_step
        except Exception as exc:
            if is_out_of_memory(exc):
                free_device_memory(self.registry.device)
                raise OutOfMemory(
                    f"the {self.registry.device.type} device ran out of memory; try fewer or smaller images"
                ) from exc
            log.exception("generation failed")
            raise GenerationError(f"generation failed: {type(exc).__name__}: {exc}") from exc

    def native_size(self, name: str | None) -> int | None:
        """The model's native image side (px), known once it is loaded; asking never loads a model."""
        loaded = self.registry.loaded(name)
        return None if loaded is None else loaded.native_size

    def samplers(self, name: str | None) -> list[str]:
        """The sampler names valid for the model: every A1111 sampler, for the SD families."""
        self.registry.spec(name)  # NotFound for an unknown name
        return list(SAMPLER_NAMES)

    def model_hash(self, name: str | None) -> str | None:
        """sha256 (hex) of the model's UNet weights, computed when it was first loaded (not per request);
        None for a model never loaded: asking never loads one."""
        return self.registry.weights_hash(name)

    def _describe(
        self, model: LoadedPipelines, requests: Sequence[GenerationRequest], outputs: list[list[GeneratedImage]]
    ) -> None:
        """Attach each image's generation parameters (the PNG metadata) to it."""
        for request, images in zip(requests, outputs, strict=True):
            name = request.model or self.registry.base_name
            sampler = sampler_label(request.sampler, model.txt2img.scheduler)
            for out in images:
                params = metadata.parameters_for(
                    request,
                    seed=out.seed,
                    width=out.image.width,
                    height=out.image.height,
                    model=name,
                    model_hash=self.model_hash(name),
                    sampler=sampler,
                )
                metadata.attach(out.image, params)


def _fit_to_multiple(image: Image.Image, multiple: int) -> Image.Image:
    """Crop-free resize down to the nearest multiple, as the pipelines would do anyway."""
    width = max(multiple, image.width - image.width % multiple)
    height = max(multiple, image.height - image.height % multiple)
    if (width, height) == image.size:
        return image
    return image.resize((width, height), Image.Resampling.LANCZOS)


__all__ = ["Cancelled", "Engine"]
