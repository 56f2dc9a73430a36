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
from sdserver.engine import control
from sdserver.engine.controlnets import ControlNetLibrary
from sdserver.engine.device import free_device_memory, is_out_of_memory
from sdserver.engine.families import Family, State, denoise
from sdserver.engine.loaders import LoadedPipelines
from sdserver.engine.speed import before_encode

log = logging.getLogger(__name__)

ModelHash = Callable[[str], str | None]


class Session:
    def __init__(
        self, model: LoadedPipelines, name: str, model_hash: ModelHash, controlnets: ControlNetLibrary | None = None
    ) -> None:
        self.model, self.name, self._model_hash = model, name, model_hash
        self.controlnets = controlnets or ControlNetLibrary(None)

    @property
    def family(self) -> Family:
        return self.model.family  # looked up per call: a session may outlive a swap (tests' spies)

    def admit(self, request: PreparedRequest) -> State:
        """Encode the prompts and start the request's state (its scheduler, timesteps, initial latents)."""
        with failures(self.model.device), torch.no_grad():
            before_encode(self.model)
            state = self.family.start(self.model, request, self.family.encode(self.model, request))
            dtype = state.latents.dtype
            control.attach(state, self.controlnets, self.model, dtype)
            return state

    def fits(self, states: Sequence[State], requests: Sequence[PreparedRequest]) -> bool:
        """Whether `requests` can join `states` (one size) and a step over all of them still be one denoiser
        forward within the device memory free now; always where there is no budget to keep."""
        memory = self.model.memory
        if memory is None or not requests:
            return True
        cfg = self.family.options.guidance == "cfg"
        rows = sum(state.denoiser_rows for state in states if not state.done)
        rows += sum(r.num_images * (2 if cfg and r.guidance_scale > 1 else 1) for r in requests)
        return rows <= memory.denoiser_rows(requests[0].width * requests[0].height)

    def step(self, states: Sequence[State]) -> None:
        """One denoising step for every state, in one denoiser forward (several, where memory is short)."""
        with failures(self.model.device), torch.no_grad():
            denoise(self.family, self.model, states)
            if self.model.device.type == "cuda":
                for state in states:
                    if "preview_buffer" in state.extra:
                        _snapshot(state)

    def previews(self, state: State) -> list[Image.Image]:
        """Cheap previews of a state's latents, one per image. On CUDA they come from a copy taken after
        the previous step without waiting for the GPU, so asking never stalls the queued work (a preview
        is then one step behind the progress it is reported with)."""
        if self.model.device.type != "cuda":
            return self.family.previews(state.latents, state)
        if "preview_buffer" not in state.extra:  # the first one: wait, and snapshot every step from now on
            state.extra["preview_buffer"] = torch.empty(state.latents.shape, dtype=state.latents.dtype, pin_memory=True)
            return self.family.previews(state.latents, state)
        if "preview_event" not in state.extra:  # asked again before the next step
            return self.family.previews(state.latents, state)
        state.extra["preview_event"].synchronize()
        return self.family.previews(state.extra["preview_buffer"], state)

    def finish(self, states: Sequence[State]) -> list[list[GeneratedImage]]:
        """Decode finished states (one VAE call), run the safety checker, put back the pixels outside
        the mask, and attach each image's parameters."""
        with failures(self.model.device), torch.no_grad():
            images = self.family.decode(self.model, states)
            flags = self._check(images, [state.request for state in states for _ in range(state.rows)])
            results, offset = [], 0
            for state in states:
                own = [
                    GeneratedImage(image=_restored(image, state.request, flagged), seed=seed, nsfw=flagged)
                    for image, flagged, seed in zip(images[offset:], flags[offset:], state.request.seeds, strict=False)
                ]
                offset += state.rows
                if state.request.needs_second_pass:  # a hires first pass: its latents go on, unchecked
                    latents = self.family.image_latents(self.model, state)
                    for row, out in enumerate(own):
                        out.latents = latents[row : row + 1]
                else:
                    self._describe(state.request, own)
                results.append(own)
            return results

    def _check(self, images: list[Image.Image], row_requests: list[PreparedRequest]) -> list[bool]:
        """The safety checker's flags (flagged images blacked out in `images`, one request per image), over
        the final images only: a hires fix's first pass is checked as its second pass's result."""
        flags = [False] * len(images)
        final = [row for row, request in enumerate(row_requests) if not request.needs_second_pass]
        if self.model.checker is None or not final:
            return flags
        checked, found = self.model.checker.check([images[row] for row in final])
        for row, image, flagged in zip(final, checked, found, strict=True):
            images[row], flags[row] = image, flagged
        return flags

    def final_images(self, request: PreparedRequest, pictures: list[Image.Image]) -> list[GeneratedImage]:
        """Images made with no denoising step (a hires fix at strength 0: the upscale is the result),
        checked and described as any other."""
        with failures(self.model.device), torch.no_grad():
            pictures = list(pictures)
            flags = self._check(pictures, [request] * len(pictures))
            images = [GeneratedImage(p, seed, f) for p, seed, f in zip(pictures, request.seeds, flags, strict=True)]
            self._describe(request, images)
            return images

    def _describe(self, request: PreparedRequest, images: list[GeneratedImage]) -> None:
        first = request.first_pass or request  # a hires fix is described by its first pass
        sampler = first.sampler or self.family.default_sampler(self.model.txt2img.scheduler)
        for out in images:
            params = metadata.parameters_for(
                request,
                seed=out.seed,
                width=out.image.width,
                height=out.image.height,
                model=self.name,
                model_hash=self._model_hash(self.name),
                sampler=sampler,
                embeddings=self.model.embeddings.used(request.prompt, request.negative_prompt),
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


def _snapshot(state: State) -> None:
    """Queue a copy of the latents to pinned CPU memory behind the step that made them."""
    buffer: torch.Tensor = state.extra["preview_buffer"]
    event = state.extra.get("preview_event")
    if event is not None:
        event.synchronize()  # the last copy is done before its buffer is overwritten (one step ago: no stall)
    buffer.copy_(state.latents, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    state.extra["preview_event"] = event


def _restored(image: Image.Image, request: GenerationRequest, flagged: bool = False) -> Image.Image:
    """Inpainting: the result laid back onto the picture sent through the blurred mask (the crop of
    inpaint_full_res scaled back to its box): outside the mask, the pixels come back exactly as sent.
    A flagged image stays blacked out, at the size of the picture it would have been."""
    paste = request.paste if isinstance(request, PreparedRequest) else None  # PreparedRequest.framed()
    if flagged:
        return image if paste is None else Image.new(image.mode, paste.canvas.size)
    if paste is not None:
        return paste.apply(image)
    if request.task is not Task.INPAINT or request.init_image is None or request.mask_image is None:
        return image
    binary = request.mask_image.convert("L").point(lambda value: 255 if value >= 128 else 0)
    return Image.composite(image, request.init_image, binary)
