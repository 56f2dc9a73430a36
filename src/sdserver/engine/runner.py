"""Run one batch of compatible requests in a single pipeline call."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image

from sdserver.core.types import GeneratedImage, GenerationRequest, Task
from sdserver.engine.loaders import LoadedPipelines
from sdserver.engine.preview import latents_to_previews
from sdserver.engine.samplers import using_sampler

# (steps done, total steps, previews): may raise to stop the run; previews() decodes the current
# latents cheaply into one small image per output, only if called.
StepCallback = Callable[[int, int, Callable[[], list[Image.Image]]], None]


def run_batch(
    model: LoadedPipelines, requests: Sequence[GenerationRequest], on_step: StepCallback
) -> list[list[GeneratedImage]]:
    """Generate every image of every request at once; returns one list of images per request.

    The requests must agree on task, size, steps, guidance, eta and strength (the batcher's key);
    prompts, seeds and input images may differ. Image i of a request is seeded with seed + i by its
    own generator, so it comes out the same whatever else shares the batch.
    """
    # 1. Per-image inputs, flattened across requests.
    first = requests[0]
    prompts = [r.prompt for r in requests for _ in range(r.num_images)]
    negatives = [r.negative_prompt or "" for r in requests for _ in range(r.num_images)]
    seeds = [seed for r in requests for seed in r.seeds]
    generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]

    def step_end(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        on_step(step + 1, int(pipe.num_timesteps), lambda: latents_to_previews(tensors["latents"]))
        return {}

    common: dict[str, Any] = {
        "prompt": prompts,
        "negative_prompt": negatives if any(negatives) else None,
        "num_inference_steps": first.steps,
        "guidance_scale": first.guidance_scale,
        "eta": first.eta,
        "generator": generators,
        "callback_on_step_end": step_end,
        "output_type": "pil",
    }
    if first.clip_skip is not None and first.clip_skip > 1:
        # A1111 counts the last layer as 1, diffusers as 0. SD 1.x/2.x encoded here: diffusers' own
        # clip_skip path there needs `text_encoder.text_model`, which transformers 5 no longer has.
        skip = first.clip_skip - 1
        if model.description.kind == "sdxl":
            common["clip_skip"] = skip
        else:
            common["prompt_embeds"] = _clip_skip_embeds(model.txt2img, common.pop("prompt"), skip)
            common["negative_prompt_embeds"] = _clip_skip_embeds(model.txt2img, negatives, skip)
            del common["negative_prompt"]

    # 2. The task's pipeline and inputs. A 9-channel inpainting model serves every task as inpainting.
    inits, masks = _task_images(model, requests)
    inputs: dict[str, Any]
    if masks is None and first.task is Task.TXT2IMG:
        pipe, inputs = model.txt2img, {"width": first.width, "height": first.height}
    elif masks is None:
        pipe, inputs = model.img2img, {"image": inits, "strength": first.strength}
    else:
        strength = 1.0 if first.task is Task.TXT2IMG else first.strength
        pipe = model.inpaint
        inputs = {
            "image": inits,
            "mask_image": masks,
            "strength": strength,
            "width": first.width,
            "height": first.height,
        }
    with using_sampler(pipe, first.sampler):
        output = pipe(**inputs, **common)

    # 3. Safety flags (all False when the model has no checker) and, for inpainting, the untouched pixels.
    images: list[Image.Image] = list(output.images)
    flags = [False] * len(images)
    if model.checker is not None:
        images, flags = model.checker.check(images)
    if first.task is Task.INPAINT and masks is not None and inits is not None:
        images = [
            image if flagged else _keep_unmasked(image, init, mask)
            for image, init, mask, flagged in zip(images, inits, masks, flags, strict=True)
        ]

    # 4. Back to one list per request.
    results, index = [], 0
    for request in requests:
        count = request.num_images
        results.append(
            [GeneratedImage(image=images[i], seed=seeds[i], nsfw=bool(flags[i])) for i in range(index, index + count)]
        )
        index += count
    return results


def _clip_skip_embeds(pipe: Any, texts: list[str], skip: int) -> Any:
    """Prompt embeddings from the CLIP layer `skip` layers before the last (normalised, as diffusers does)."""
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    tokens = tokenizer(
        texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        hidden = encoder(tokens.input_ids.to(encoder.device), output_hidden_states=True).hidden_states[-(skip + 1)]
        norm = getattr(encoder, "text_model", encoder).final_layer_norm
        return norm(hidden).to(dtype=encoder.dtype)


def _task_images(
    model: LoadedPipelines, requests: Sequence[GenerationRequest]
) -> tuple[list[Image.Image] | None, list[Image.Image] | None]:
    """Init images and masks, one per output image (None where the task needs none)."""
    first = requests[0]
    if first.task is Task.TXT2IMG and not model.inpainting_unet:
        return None, None
    inits: list[Image.Image] = []
    masks: list[Image.Image] = []
    for request in requests:
        size = (int(request.width or 0), int(request.height or 0))
        init = request.init_image if request.init_image is not None else Image.new("RGB", size, (127, 127, 127))
        mask = request.mask_image if request.mask_image is not None else Image.new("L", size, 255)
        inits += [init] * request.num_images
        masks += [mask] * request.num_images
    if first.task is Task.IMG2IMG and not model.inpainting_unet:
        return inits, None
    return inits, masks


def _keep_unmasked(generated: Image.Image, original: Image.Image, mask: Image.Image) -> Image.Image:
    """Pixels outside the (binarised) mask come back exactly as sent."""
    binary = mask.convert("L").point(lambda value: 255 if value >= 128 else 0)
    return Image.composite(generated, original, binary)
