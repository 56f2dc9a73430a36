"""Every sampler name runs the real tiny pipeline, and the model's own scheduler is left untouched."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from sdserver.api.app import create_app
from sdserver.core.errors import InvalidRequest
from sdserver.core.types import SAMPLER_ALIASES, SAMPLER_NAMES, GenerationRequest, validate_request
from sdserver.engine.samplers import SAMPLERS, sampler_label
from sdserver.metadata import params_of
from sdserver.settings import Settings
from tests.conftest import SIZE, STEPS, max_pixel_diff


@pytest.fixture(scope="module")
def client(tiny_model: Path) -> Iterator[TestClient]:
    """One app for the module (loading the model is the slow part)."""
    with TestClient(create_app(Settings(model=str(tiny_model))), raise_server_exceptions=False) as app_client:
        yield app_client


def test_every_core_name_has_a_diffusers_scheduler() -> None:
    assert list(SAMPLERS) == list(SAMPLER_NAMES)
    assert set(SAMPLER_ALIASES.values()) <= set(SAMPLER_NAMES)


def test_names_are_matched_case_insensitively_and_by_alias() -> None:
    assert validate_request({"prompt": "x", "sampler": "dpm++ 2m karras"}).sampler == "DPM++ 2M Karras"
    assert validate_request({"prompt": "x", "sampler": "k_euler_a"}).sampler == "Euler a"
    assert validate_request({"prompt": "x", "sampler": "PLMS"}).sampler == "PNDM"
    assert validate_request({"prompt": "x", "sampler": ""}).sampler is None


def test_unknown_name_is_rejected_with_the_list() -> None:
    with pytest.raises(InvalidRequest) as caught:
        validate_request({"prompt": "x", "sampler": "Euler b"})
    assert caught.value.field == "sampler"
    assert caught.value.message.startswith("sampler: unknown sampler; valid: Euler, Euler a, ")
    assert caught.value.message.endswith("got 'Euler b'")


def test_clip_skip_bounds() -> None:
    with pytest.raises(InvalidRequest) as caught:
        validate_request({"prompt": "x", "clip_skip": 0})
    assert caught.value.field == "clip_skip" and "got 0" in caught.value.message


def test_clip_skip_beyond_the_models_layers(client: TestClient) -> None:
    scheduler = client.app.state.scheduler  # type: ignore[attr-defined]
    with pytest.raises(InvalidRequest) as caught:
        scheduler.submit(GenerationRequest(prompt="x", clip_skip=3, steps=STEPS, width=SIZE, height=SIZE))
    assert caught.value.field == "clip_skip" and "at most 2" in caught.value.message and "got 3" in caught.value.message


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_sampler_runs(client: TestClient, name: str) -> None:
    scheduler = client.app.state.scheduler  # type: ignore[attr-defined]
    pipelines = client.app.state.engine.registry.get(None)  # type: ignore[attr-defined]
    own = pipelines.txt2img.scheduler
    request = GenerationRequest(prompt="a red circle", sampler=name, steps=STEPS, width=SIZE, height=SIZE, seed=3)
    result = scheduler.submit(request).wait(120)
    (out,) = result.images
    assert out.image.size == (SIZE, SIZE)
    params = params_of(out.image)
    assert params is not None and params["sampler"] == name
    assert pipelines.txt2img.scheduler is own  # the model's own scheduler is back
    assert type(own).__name__ == "PNDMScheduler"


def test_samplers_change_the_picture_and_default_is_reported(client: TestClient) -> None:
    scheduler = client.app.state.scheduler  # type: ignore[attr-defined]
    base = {"prompt": "a red circle", "steps": STEPS, "width": SIZE, "height": SIZE, "seed": 3}
    default = scheduler.submit(GenerationRequest(**base)).wait(120).images[0].image
    euler = scheduler.submit(GenerationRequest(**base, sampler="Euler")).wait(120).images[0].image
    ddim = scheduler.submit(GenerationRequest(**base, sampler="DDIM")).wait(120).images[0].image
    assert max_pixel_diff(euler, ddim) > 0 and max_pixel_diff(default, euler) > 0
    params = params_of(default)
    assert params is not None and params["sampler"] == "PNDM"
    pipelines = client.app.state.engine.registry.get(None)  # type: ignore[attr-defined]
    assert sampler_label(None, pipelines.txt2img.scheduler) == "PNDM"
