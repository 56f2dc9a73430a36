"""The family plug-ins drive their own denoising loop, and it draws what diffusers' own pipelines draw.

For every family and task, an image made through encode -> start -> step... -> finish matches the same
request run through the diffusers pipeline's `__call__` with the same seeds, within 2/255.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from sdserver.core.errors import InvalidRequest
from sdserver.core.types import PreparedRequest, Task, validate_request
from sdserver.engine import Engine
from sdserver.engine.loaders import LoadedPipelines
from sdserver.engine.session import _restored
from sdserver.settings import Settings
from tests.conftest import SIZE, half_mask, max_pixel_diff, pixels, scene

ARCHS = ("sd1", "sd1-inpainting", "sdxl", "sd3", "flux", "flux-schnell", "flux-fill")
TASKS = ("txt2img", "img2img", "inpaint")
EngineFor = Callable[[str], Engine]


@pytest.fixture(scope="module")
def engine_for(family_model: Callable[[str], Any]) -> EngineFor:
    """A loaded engine per architecture, built on first use and kept for the module."""
    engines: dict[str, Engine] = {}

    def get(arch: str) -> Engine:
        if arch not in engines:
            engine = Engine.from_settings(Settings(model=str(family_model(arch)), device="cpu"))
            engine.load()
            engines[arch] = engine
        return engines[arch]

    return get


def request_for(engine: Engine, task: str, **fields: Any) -> PreparedRequest:
    model = engine.registry.get(None)
    values: dict[str, Any] = {
        "task": task, "prompt": "a red circle", "seed": 7, "num_images": 2, "steps": 4, "width": SIZE,
        "height": SIZE, **fields,
    }  # fmt: skip
    if model.family.options.negative_prompt:
        values.setdefault("negative_prompt", "blue")
    if task != "txt2img":
        values.update(init_image=scene(), strength=0.75)
    if task == "inpaint":
        values["mask_image"] = half_mask()
    return engine.prepare(validate_request(values))


def pipeline_images(model: LoadedPipelines, request: PreparedRequest) -> list[Image.Image]:
    """The same request through the diffusers pipeline's own __call__ (checked and restored as we do)."""
    family = model.family.name
    size = {"width": request.width, "height": request.height}
    grey, full = Image.new("RGB", (request.width, request.height), (127, 127, 127)), Image.new("L", (SIZE, SIZE), 255)
    kwargs: dict[str, Any] = {
        "prompt": request.prompt,
        "num_images_per_prompt": request.num_images,
        "num_inference_steps": request.steps,
        "guidance_scale": request.guidance_scale,
        "generator": [torch.Generator().manual_seed(seed) for seed in request.seeds],
    }
    if request.negative_prompt:
        kwargs["negative_prompt"] = request.negative_prompt
    if family == "flux":
        kwargs["max_sequence_length"] = model.family.max_sequence_length(model.txt2img)  # type: ignore[attr-defined]
    if model.inpainting_unet:  # every task is inpainting on an inpainting model
        image = grey if request.task is Task.TXT2IMG else request.init_image
        mask = request.mask_image if request.task is Task.INPAINT else full
        strength = 1.0 if request.task is Task.TXT2IMG else request.strength
        pipe, kwargs = model.inpaint, {**kwargs, **size, "image": image, "mask_image": mask, "strength": strength}
    elif request.task is Task.TXT2IMG:
        pipe, kwargs = model.txt2img, {**kwargs, **size}
    elif request.task is Task.IMG2IMG:
        # diffusers' SD3 img2img encodes image i with generator i without repeating a single image first
        image = [request.init_image] * request.num_images if family == "sd3" else request.init_image
        sized = size if family in ("sd3", "flux") else {}
        pipe, kwargs = model.img2img, {**kwargs, **sized, "image": image, "strength": request.strength}
    else:
        pipe = model.inpaint
        kwargs = {**kwargs, **size, "image": request.init_image, "mask_image": request.mask_image}
        kwargs["strength"] = request.strength
    images = list(pipe(**kwargs).images)
    if model.checker is not None:
        images, _ = model.checker.check(images)
    return [_restored(image, request) for image in images]


@contextmanager
def sd3_inpaint_decoding_quirk(model: LoadedPipelines, request: PreparedRequest) -> Iterator[None]:
    """diffusers' SD3 inpaint pipeline decodes without the VAE's shift factor (its txt2img and img2img
    add it, as does sdserver): compare with a shift of 0, where both decodings agree."""
    vae = model.txt2img.vae
    shift = vae.config.shift_factor
    if model.family.name == "sd3" and request.task is Task.INPAINT:
        vae.register_to_config(shift_factor=0.0)
    try:
        yield
    finally:
        vae.register_to_config(shift_factor=shift)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("arch", ARCHS)
def test_the_engine_loop_matches_the_diffusers_pipeline(engine_for: EngineFor, arch: str, task: str) -> None:
    engine = engine_for(arch)
    model = engine.registry.get(None)
    request = request_for(engine, task)
    with sd3_inpaint_decoding_quirk(model, request):
        ours = engine.run([request], lambda *_: None)[0]
        theirs = pipeline_images(model, request)
    assert [out.seed for out in ours] == request.seeds
    for mine, reference in zip(ours, theirs, strict=True):
        assert max_pixel_diff(mine.image, reference) <= 2


@pytest.mark.parametrize(
    ("arch", "kind", "steps", "guidance", "native"),
    [
        ("sd1", "sd1", 50, 7.5, SIZE),
        ("sdxl", "sdxl", 50, 7.5, SIZE),
        ("sd3", "sd3", 28, 7.0, None),
        ("flux", "flux", 28, 3.5, None),
        ("flux-schnell", "flux", 4, 0.0, None),
    ],
)
def test_each_family_says_what_a_request_gets_by_default(
    engine_for: EngineFor, arch: str, kind: str, steps: int, guidance: float, native: int | None
) -> None:
    engine = engine_for(arch)
    model = engine.registry.get(None)
    assert model.description.kind == kind
    prepared = engine.prepare(validate_request({"prompt": "a red circle"}))
    assert (prepared.steps, prepared.guidance_scale) == (steps, guidance)
    assert prepared.width == prepared.height == model.native_size == (native or model.native_size)


@pytest.mark.parametrize(
    ("arch", "fields", "field", "says"),
    [
        ("sd1", {"sampler": "DDIM", "clip_skip": 3}, "clip_skip", "at most 2"),
        ("sd3", {"sampler": "DDIM"}, "sampler", "valid: Euler, Euler a, DPM++ 2M, UniPC"),
        ("sd3", {"eta": 0.5}, "eta", "take no eta"),
        ("flux", {"sampler": "LMS Karras"}, "sampler", "does not apply to flux models"),
        ("flux", {"negative_prompt": "blue"}, "negative_prompt", "no negative prompt"),
        ("flux", {"clip_skip": 2}, "clip_skip", "does not apply"),
    ],
)
def test_options_a_family_cannot_honour_are_refused_by_name(
    engine_for: EngineFor, arch: str, fields: dict[str, Any], field: str, says: str
) -> None:
    engine = engine_for(arch)
    with pytest.raises(InvalidRequest) as refused:
        engine.prepare(validate_request({"prompt": "a red circle", **fields}))
    assert refused.value.field == field and says in refused.value.message


@pytest.mark.parametrize("task", ["txt2img", "img2img"])
@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_the_flow_solvers_follow_the_same_schedule_as_euler(engine_for: EngineFor, arch: str, task: str) -> None:
    """DPM++ 2M and UniPC run on the flow model's own (shifted) sigmas: they land nearer Euler's picture
    than Euler lands from another seed; Euler a (stochastic) is reproducible from its seed."""
    engine = engine_for(arch)

    def draw(sampler: str, seed: int = 7) -> Image.Image:
        request = request_for(engine, task, sampler=sampler, steps=8, num_images=1, seed=seed)
        return engine.run([request], lambda *_: None)[0][0].image

    euler = draw("Euler")
    other_seed = mean_pixel_diff(draw("Euler", seed=8), euler)
    for solver in ("DPM++ 2M", "UniPC"):
        assert mean_pixel_diff(draw(solver), euler) < other_seed / 2, solver
    assert max_pixel_diff(draw("Euler a"), draw("Euler a")) == 0


def mean_pixel_diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(pixels(a) - pixels(b)).mean())


@pytest.mark.parametrize("arch", ["sd1", "sdxl", "sd3", "flux"])
def test_previews_have_one_small_image_per_row(engine_for: EngineFor, arch: str) -> None:
    engine = engine_for(arch)
    previews: list[list[Image.Image]] = []

    def on_step(step: int, total: int, make: Callable[[], list[Image.Image]]) -> None:
        previews.append(make())

    engine.run([request_for(engine, "txt2img", num_images=3)], on_step)
    assert len(previews) >= 4
    assert all(len(step) == 3 and step[0].size == (SIZE // 8, SIZE // 8) for step in previews)
