"""A session: generations on one loaded model with one LoRA set, driven a denoising step at a time.

The engine opens a session for a batch (request-level batching) or for a running set (step-level
batching): `admit` encodes a request's prompts and starts its state, `step` runs one denoiser forward
over any mix of admitted states, `finish` decodes and checks the states whose last step has run. Only
the worker thread uses a session.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from PIL import Image

from sdserver import metadata
from sdserver.core.errors import GenerationError, OutOfMemory, SDServerError
from sdserver.core.types import GeneratedImage, GenerationRequest, PreparedRequest, Task
from sdserver.engine.device import free_device_memory, is_out_of_memory
from sdserver.engine.families import State, denoise
from sdserver.engine.loaders import LoadedPipelines

log = logging.getLogger(__name__)

ModelHash = Callable[[str], str | None]


class Session:
    def __init__(self, model: LoadedPipelines, name: str, model_hash: ModelHash) -> None:
        self.model, self.name, self._model_hash = model, name, model_hash
        self.family = model.family

    def admit(self, request: PreparedRequest) -> State:
        """Encode the prompts and start the request's state (its scheduler, timesteps, initial latents)."""
        with failures(self.model.device), torch.no_grad():
            return self.family.start(self.model, request, self.family.encode(self.model, request))

    def step(self, states: Sequence[State]) -> None:
        """One denoising step for every state, in one denoiser forward."""
        with failures(self.model.device), torch.no_grad():
            denoise(self.family, self.model, states)

    def previews(self, state: State) -> list[Image.Image]:
        """Cheap previews of a state's current latents, one per image."""
        return self.family.previews(state.latents, state)

    def finish(self, states: Sequence[State]) -> list[list[GeneratedImage]]:
        """Decode finished states (one VAE call), run the safety checker, put back the pixels outside
        the mask, and attach each image's parameters."""
        with failures(self.model.device), torch.no_grad():
            images = self.family.decode(self.model, states)
            flags = [False] * len(images)
            if self.model.checker is not None:
                images, flags = self.model.checker.check(images)
            results, offset = [], 0
            for state in states:
                own = [
                    GeneratedImage(image=image if flagged else _restored(image, state.request), seed=seed, nsfw=flagged)
                    for image, flagged, seed in zip(images[offset:], flags[offset:], state.request.seeds, strict=False)
                ]
                offset += state.rows
                self._describe(state, own)
                results.append(own)
            return results

    def _describe(self, state: State, images: list[GeneratedImage]) -> None:
        sampler = state.request.sampler or self.family.default_sampler(self.model.txt2img.scheduler)
        for out in images:
            params = metadata.parameters_for(
                state.request,
                seed=out.seed,
                width=out.image.width,
                height=out.image.height,
                model=self.name,
                model_hash=self._model_hash(self.name),
                sampler=sampler,
            )
            metadata.attach(out.image, params)


@contextmanager
def failures(device: torch.device) -> Iterator[None]:
    """Our errors pass through; running out of memory frees the cache and is an OutOfMemory (503);
    anything else is a GenerationError naming what went wrong."""
    try:
        yield
    except SDServerError:
        raise
    except Exception as exc:
        if is_out_of_memory(exc):
            free_device_memory(device)
            raise OutOfMemory(f"the {device.type} device ran out of memory; try fewer or smaller images") from exc
        log.exception("generation failed")
        raise GenerationError(f"generation failed: {type(exc).__name__}: {exc}") from exc


def _restored(image: Image.Image, request: GenerationRequest) -> Image.Image:
    """Inpainting: pixels outside the (binarised) mask come back exactly as sent."""
    if request.task is not Task.INPAINT or request.init_image is None or request.mask_image is None:
        return image
    binary = request.mask_image.convert("L").point(lambda value: 255 if value >= 128 else 0)
    return Image.composite(image, request.init_image, binary)
