"""The core's inpainting options reach every family through one code path: the latent fills start the
masked area from noise or from nothing, "only masked" works on a crop, and whatever the family, the
pixels outside the blurred mask come back exactly as sent."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from PIL import Image

from sdserver.core.errors import InvalidRequest
from sdserver.core.inpainting import blurred_mask
from sdserver.core.types import validate_request
from sdserver.engine import Engine
from sdserver.settings import Settings
from tests.conftest import SIZE, pixels, scene

# sd1 and SDXL share sd.py's start, tested through the A1111 API (test_inpainting_options.py); here the
# 9-channel path and the flow families'
ARCHS = ("sd1-inpainting", "sd3", "flux")
MASK_BOX = (16, 16, 48, 40)


@pytest.fixture(scope="module")
def engine_for(family_model: Callable[[str], Any]) -> Callable[[str], Engine]:
    engines: dict[str, Engine] = {}

    def get(arch: str) -> Engine:
        if arch not in engines:
            engines[arch] = Engine.from_settings(Settings(model=str(family_model(arch)), device="cpu"))
            engines[arch].load()
        return engines[arch]

    return get


def mask() -> Image.Image:
    made = Image.new("L", (SIZE, SIZE), 0)
    made.paste(255, MASK_BOX)
    return made


def inpaint(engine: Engine, **fields: Any) -> np.ndarray:
    values = {"task": "inpaint", "prompt": "a red circle", "seed": 5, "steps": 4, "strength": 0.8,
              "init_image": scene(), "mask_image": mask(), **fields}  # fmt: skip
    (out,) = engine.run([engine.prepare(validate_request(values))], lambda *_: None)[0]
    return pixels(out.image)


@pytest.mark.parametrize("arch", ARCHS)
def test_latent_fills_change_the_start_and_the_outside_stays(engine_for: Callable[[str], Engine], arch: str) -> None:
    engine = engine_for(arch)
    made = {fill: inpaint(engine, inpaint_fill=fill) for fill in ("original", "latent_noise", "latent_nothing")}
    sent, outside = pixels(scene()), np.asarray(mask()) == 0
    left, top, right, bottom = MASK_BOX
    for fill, image in made.items():
        assert (image[outside] == sent[outside]).all(), fill
    inside = (slice(top, bottom), slice(left, right))
    assert np.abs(made["latent_noise"][inside] - made["original"][inside]).max() > 10
    assert np.abs(made["latent_nothing"][inside] - made["original"][inside]).max() > 10


def test_only_masked_with_a_blur_keeps_the_outside_on_packed_latents(engine_for: Callable[[str], Engine]) -> None:
    made = inpaint(engine_for("flux"), inpaint_full_res=True, inpaint_padding=4, mask_blur=3, inpaint_fill="fill")
    sent, outside = pixels(scene()), np.asarray(blurred_mask(mask(), 3)) == 0
    assert made.shape == sent.shape and (made[outside] == sent[outside]).all()
    assert np.abs(made[20:36, 20:44] - sent[20:36, 20:44]).max() > 10


def test_flux_fill_refuses_the_latent_fills_by_name(engine_for: Callable[[str], Engine]) -> None:
    engine = engine_for("flux-fill")
    values = {"task": "inpaint", "prompt": "x", "init_image": scene(), "mask_image": mask()}
    with pytest.raises(InvalidRequest) as refused:
        engine.prepare(validate_request({**values, "inpaint_fill": "latent_noise"}))
    assert refused.value.field == "inpaint_fill" and "'latent_noise'" in refused.value.message
    assert engine.prepare(validate_request({**values, "inpaint_fill": "fill"})).paste is not None
