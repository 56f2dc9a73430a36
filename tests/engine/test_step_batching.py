"""Step-level batching at the engine: requests with different steps, samplers, guidance, tasks and start
times share each denoiser forward, and every image comes out as it would alone (within 2/255)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sdserver.core.types import GeneratedImage, PreparedRequest, validate_request
from sdserver.engine import Engine
from sdserver.settings import Settings
from tests.conftest import SIZE, half_mask, max_pixel_diff, scene


@pytest.fixture(scope="module")
def engines(family_model: Callable[[str], Path]) -> Callable[[str], Engine]:
    built: dict[str, Engine] = {}

    def get(arch: str) -> Engine:
        if arch not in built:
            built[arch] = Engine.from_settings(Settings(model=str(family_model(arch)), device="cpu"))
            built[arch].load()
        return built[arch]

    return get


def mixed_requests(engine: Engine) -> list[PreparedRequest]:
    """Different steps, samplers (with history: DPM++ 2M, UniPC), guidance and tasks, one size."""
    family = engine.registry.get(None).family
    flow = family.name in ("sd3", "flux")
    high, low = (4.0, 2.0) if family.options.guidance == "distilled" else (7.5, 1.0)  # 1.0: no CFG rows
    image = {"init_image": scene(), "strength": 0.6}
    specs: list[dict[str, Any]] = [
        {"prompt": "a red circle", "steps": 6, "guidance_scale": high, "seed": 1},
        {"prompt": "a blue square", "steps": 4, "guidance_scale": low, "sampler": "DPM++ 2M", "seed": 2},
        {"prompt": "a green circle", "task": "img2img", "steps": 5, "sampler": "UniPC", "seed": 3, **image},
        {"prompt": "a yellow triangle", "task": "inpaint", "steps": 4, "mask_image": half_mask(), "seed": 4, **image},
        {"prompt": "two of them", "steps": 3, "num_images": 2, "seed": 5, "guidance_scale": high},
    ]
    if not flow:
        specs[0]["sampler"] = "Euler a"  # an ancestral sampler draws noise every step, from its own generators
    return [engine.prepare(validate_request({"width": SIZE, "height": SIZE, **spec})) for spec in specs]


def run_mixed(engine: Engine, requests: list[PreparedRequest], join_at: dict[int, int]) -> list[list[GeneratedImage]]:
    """Drive one session as the step batcher does: request i joins once the set has run join_at[i] steps."""
    results: dict[int, list[GeneratedImage]] = {}
    with engine.session(requests[0].model) as session:
        states: dict[int, Any] = {}
        tick = 0
        while len(results) < len(requests):
            for index, request in enumerate(requests):
                if index not in states and join_at.get(index, 0) <= tick:
                    states[index] = session.admit(request)
            live = {index: state for index, state in states.items() if index not in results}
            session.step(list(live.values()))
            tick += 1
            finished = [index for index, state in live.items() if state.done]
            if finished:
                outputs = session.finish([states[index] for index in finished])
                results.update(zip(finished, outputs, strict=True))
    return [results[index] for index in range(len(requests))]


@pytest.mark.parametrize("arch", ["sd1", "sdxl", "sd3", "flux"])
def test_a_mixed_running_set_draws_each_image_as_alone(engines: Callable[[str], Engine], arch: str) -> None:
    engine = engines(arch)
    requests = mixed_requests(engine)
    together = run_mixed(engine, requests, join_at={3: 2, 4: 3})  # the inpainting and the 2-image ones join late
    for request, images in zip(requests, together, strict=True):
        (alone,) = engine.run([request], lambda *_: None)
        assert [out.seed for out in images] == request.seeds
        for mixed, single in zip(images, alone, strict=True):
            assert max_pixel_diff(mixed.image, single.image) <= 2, request.prompt


def test_an_inpainting_model_mixes_every_task(engines: Callable[[str], Engine]) -> None:
    engine = engines("sd1-inpainting")
    requests = mixed_requests(engine)
    together = run_mixed(engine, requests, join_at={1: 1, 2: 2})
    for request, images in zip(requests, together, strict=True):
        (alone,) = engine.run([request], lambda *_: None)
        for mixed, single in zip(images, alone, strict=True):
            assert max_pixel_diff(mixed.image, single.image) <= 2, request.prompt


@pytest.mark.parametrize("arch", ["sd1", "sdxl", "sd3", "flux"])
def test_controlnet_rows_are_weighted_each_as_alone(
    family_model: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory, arch: str
) -> None:
    """Units of one ControlNet with different images, weights, windows and modes, CFG and not, share one
    ControlNet forward per step; each request draws what it draws alone."""
    from tests.support.controlnets import make_tiny_controlnet, make_tiny_transformer_controlnet

    folder = tmp_path_factory.mktemp("controlnets")
    if arch in ("sd3", "flux"):
        make_tiny_transformer_controlnet(family_model(arch), folder / "tiny")
    else:
        make_tiny_controlnet(family_model(arch) / "unet", folder / "tiny")
    engine = Engine.from_settings(Settings(model=str(family_model(arch)), device="cpu", controlnet_dir=str(folder)))
    engine.load()
    unit = {"model": "tiny", "module": "canny", "image": scene()}
    specs: list[dict[str, Any]] = [
        {"prompt": "a red circle", "steps": 4, "seed": 1, "controlnets": [unit]},
        {"prompt": "a blue square", "steps": 3, "seed": 2, "guidance_scale": 1.0,
         "controlnets": [{**unit, "weight": 0.5, "module": "invert"}]},
        {"prompt": "a green circle", "steps": 4, "seed": 3, "controlnets": [{**unit, "control_mode": 2}]},
        {"prompt": "two", "steps": 4, "seed": 4, "num_images": 2,
         "controlnets": [{**unit, "guidance_start": 0.5, "control_mode": 1}]},
    ]  # fmt: skip
    if arch == "flux":  # guidance-distilled: one row per image, no CFG to vary
        for spec in specs:
            spec.pop("guidance_scale", None)
    requests = [engine.prepare(validate_request({"width": SIZE, "height": SIZE, **spec})) for spec in specs]
    together = run_mixed(engine, requests, join_at={2: 1, 3: 2})
    for request, images in zip(requests, together, strict=True):
        (alone,) = engine.run([request], lambda *_: None)
        for mixed, single in zip(images, alone, strict=True):
            assert max_pixel_diff(mixed.image, single.image) <= 2, request.prompt
    plain = engine.prepare(
        validate_request({"width": SIZE, "height": SIZE, "prompt": "a red circle", "steps": 4, "seed": 1})
    )
    silent = requests[0].model_copy(
        update={"controlnets": (requests[0].controlnets[0].model_copy(update={"weight": 0.0}),)}
    )
    without, steered, at_zero = (engine.run([r], lambda *_: None)[0][0] for r in (plain, requests[0], silent))
    assert max_pixel_diff(without.image, steered.image) > 2  # the ControlNet steers
    assert max_pixel_diff(without.image, at_zero.image) <= 1  # and weight 0 is no ControlNet
