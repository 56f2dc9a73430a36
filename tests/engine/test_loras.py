"""LoRA adapters from loras_dir: named per request (a field, or <lora:name:weight> in the prompt), applied
to that request only, and the model is left exactly as it was for the next one."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from sdserver.core.types import GenerationRequest
from sdserver.service.jobs import Job
from sdserver.service.running import group_key
from tests.conftest import SIZE, STEPS, ArchModels, ClientFactory, decode_png, max_pixel_diff
from tests.support.loras import make_tiny_lora

FIELDS = {"prompt": "a red circle", "width": SIZE, "height": SIZE, "num_inference_steps": STEPS, "seed": 5}


@pytest.fixture(scope="module")
def loras_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, arch_model: ArchModels) -> Path:
    folder = tmp_path_factory.mktemp("loras")
    make_tiny_lora(tiny_model, folder, "ink", seed=1)
    make_tiny_lora(tiny_model, folder, "film", seed=2)
    make_tiny_lora(arch_model("sdxl").folder, folder, "xl-only", seed=3)
    return folder


@pytest.fixture
def lora_client(make_client: ClientFactory, tiny_model: Path, loras_dir: Path) -> TestClient:
    return make_client(model=str(tiny_model), loras_dir=str(loras_dir))


def draw(client: TestClient, **fields: Any) -> Any:
    response = client.post("/txt2img", data={key: str(value) for key, value in {**FIELDS, **fields}.items()})
    assert response.status_code == 200, response.text
    return decode_png(response.json()["images"][0]["base64"])


def test_a_lora_changes_that_request_and_leaves_the_model_clean(lora_client: TestClient) -> None:
    before = draw(lora_client)
    inked = draw(lora_client, loras="ink:1")
    after = draw(lora_client)
    assert max_pixel_diff(inked, before) > 10
    assert max_pixel_diff(after, before) == 0  # the adapter is off again: bit for bit the plain model


def test_the_weight_and_the_combination_matter(lora_client: TestClient) -> None:
    full, half = draw(lora_client, loras="ink:1"), draw(lora_client, loras="ink:0.5")
    both = draw(lora_client, loras="ink:1,film:1")
    assert max_pixel_diff(full, half) > 0 and max_pixel_diff(both, full) > 0
    assert max_pixel_diff(draw(lora_client, loras="ink:1"), full) == 0  # reproducible


def test_the_prompt_tag_is_the_same_as_the_field(lora_client: TestClient) -> None:
    tagged = draw(lora_client, prompt="a red circle <lora:ink:0.7>")
    assert max_pixel_diff(tagged, draw(lora_client, loras="ink:0.7")) == 0
    assert "<lora:ink:0.7>" in tagged.text["parameters"]  # A1111 infotext keeps the tag: pasting it back works


def test_unknown_and_misfit_loras_are_refused_naming_them(lora_client: TestClient) -> None:
    unknown = lora_client.post("/txt2img", data={**FIELDS, "loras": "nope"})
    assert unknown.status_code == 400
    assert "'nope'" in unknown.json()["message"] and "ink" in unknown.json()["message"]  # lists what exists
    misfit = lora_client.post("/txt2img", data={**FIELDS, "loras": "xl-only"})
    assert misfit.status_code == 400 and "does not fit" in misfit.json()["message"]
    assert max_pixel_diff(draw(lora_client, loras="ink:1"), draw(lora_client, loras="ink:1")) == 0  # still serving
    bad_weight = lora_client.post("/txt2img", data={**FIELDS, "loras": "ink:lots"})
    assert bad_weight.status_code == 400 and "loras[0].weight" in bad_weight.json()["message"]


def test_without_loras_dir_a_lora_is_unknown(client: TestClient) -> None:
    response = client.post("/txt2img", data={**FIELDS, "loras": "ink"})
    assert response.status_code == 400 and "loras_dir" in response.json()["message"]


def test_every_protocol_can_name_loras(lora_client: TestClient) -> None:
    assert [lora["name"] for lora in lora_client.get("/sdapi/v1/loras").json()] == ["film", "ink", "xl-only"]
    plain = lora_client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "width": SIZE, "height": SIZE})
    tagged = lora_client.post(
        "/sdapi/v1/txt2img", json={"prompt": "a red circle <lora:ink:1>", "width": SIZE, "height": SIZE, "seed": 1}
    )
    assert plain.status_code == tagged.status_code == 200
    job = lora_client.post("/v1/jobs", json={"prompt": "x", "width": SIZE, "steps": STEPS, "loras": {"film": 0.5}})
    assert job.status_code == 202, job.text


def test_requests_with_different_loras_never_share_a_batch() -> None:
    def job(prompt: str = "x", **fields: Any) -> Job:
        return Job(GenerationRequest(prompt=prompt, width=SIZE, height=SIZE, **fields))

    assert job(loras="ink:1").batch_key != job(loras="ink:0.5").batch_key != job().batch_key
    assert job(loras="ink:1").batch_key == job(prompt="y <lora:ink:1>").batch_key
    # nor a running set (step batching)
    keys = [group_key(job(**fields).request) for fields in ({"loras": "ink:1"}, {"loras": "ink:0.5"}, {})]
    assert len(set(keys)) == 3
    assert group_key(job(loras="ink:1", steps=9).request) == group_key(job(prompt="y <lora:ink:1>").request)


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_a_lora_applies_to_sd3_and_flux_models_and_leaves_them_clean(
    make_client: ClientFactory, family_model: Callable[[str], Path], tmp_path: Path, arch: str
) -> None:
    make_tiny_lora(family_model(arch), tmp_path, "flow-style", seed=4)
    client = make_client(model=str(family_model(arch)), loras_dir=str(tmp_path))
    before, styled, after = draw(client), draw(client, loras="flow-style:1"), draw(client)
    assert max_pixel_diff(styled, before) > 10 and max_pixel_diff(after, before) == 0


def test_an_sdxl_lora_applies_to_an_sdxl_model(
    make_client: ClientFactory, arch_model: ArchModels, loras_dir: Path
) -> None:
    client = make_client(model=str(arch_model("sdxl").folder), loras_dir=str(loras_dir))
    before, styled, after = draw(client), draw(client, loras="xl-only:1"), draw(client)
    assert max_pixel_diff(styled, before) > 0 and max_pixel_diff(after, before) == 0
