"""Tiny SD 3 / 3.5 and FLUX.1 models: real diffusers folders, built offline, that draw in a few steps,
react visibly to the prompt and the seed, and carry a real-shaped T5 tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image
from transformers import AutoTokenizer

from sdserver.engine.tiny import make_tiny_model
from sdserver.engine.tiny_flow import write_t5_tokenizer
from tests.conftest import SIZE, FlowModels

PIPELINES = {
    "sd3": "StableDiffusion3Pipeline",
    "sd3-medium": "StableDiffusion3Pipeline",
    "sd3.5-large": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
    "flux-schnell": "FluxPipeline",
    "flux-fill": "FluxFillPipeline",
}


def draw(pipe: Any, prompt: str, seed: int) -> np.ndarray:
    options: dict[str, Any] = {}
    if "Fill" in type(pipe).__name__:
        options = {
            "image": Image.new("RGB", (SIZE, SIZE), (90, 90, 90)),
            "mask_image": Image.new("L", (SIZE, SIZE), 255),
        }
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    image = pipe(prompt=prompt, num_inference_steps=4, height=SIZE, width=SIZE, generator=generator, **options).images[
        0
    ]
    assert image.size == (SIZE, SIZE)
    return np.asarray(image, dtype=np.int16)


@pytest.mark.parametrize("arch", list(PIPELINES))
def test_each_tiny_model_is_a_diffusers_folder_of_its_pipeline(flow_model: FlowModels, arch: str) -> None:
    folder = flow_model(arch).folder
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == PIPELINES[arch]
    t5 = "tokenizer_3" if arch.startswith("sd3") else "tokenizer_2"
    assert index[t5] == ["transformers", "T5TokenizerFast"]  # as hub folders name it
    assert type(flow_model(arch).pipeline).__name__ == PIPELINES[arch]  # DiffusionPipeline.from_pretrained


@pytest.mark.parametrize("arch", ["sd3", "flux", "flux-fill"])  # the other variants draw in test_flowfiles
def test_tiny_images_follow_the_prompt_and_the_seed(flow_model: FlowModels, arch: str) -> None:
    pipe = flow_model(arch).pipeline
    base = draw(pipe, "a red circle", seed=0)
    assert np.abs(draw(pipe, "a red circle", seed=0) - base).max() == 0  # deterministic
    assert np.abs(draw(pipe, "a blue square on a green background", seed=0) - base).mean() > 10
    assert np.abs(draw(pipe, "a red circle", seed=1) - base).mean() > 10
    assert ((base <= 1) | (base >= 254)).mean() < 0.1  # not a saturated mess


def test_tiny_models_keep_the_shipped_configs_where_size_does_not_matter(flow_model: FlowModels) -> None:
    sd3, flux = flow_model("sd3").folder, flow_model("flux").folder
    vae = json.loads((sd3 / "vae" / "config.json").read_text())
    assert (vae["latent_channels"], vae["scaling_factor"], vae["shift_factor"]) == (16, 1.5305, 0.0609)
    transformer = json.loads((sd3 / "transformer" / "config.json").read_text())
    assert transformer["qk_norm"] == "rms_norm" and transformer["dual_attention_layers"] == [0]  # SD 3.5 Medium
    scheduler = json.loads((flux / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler" and scheduler["use_dynamic_shifting"]
    fill = json.loads((flow_model("flux-fill").folder / "transformer" / "config.json").read_text())
    assert (fill["in_channels"], fill["out_channels"]) == (384, 64)  # latents, masked-image latents, 8x8 mask
    schnell = json.loads((flow_model("flux-schnell").folder / "transformer" / "config.json").read_text())
    assert schnell["guidance_embeds"] is False


def test_the_t5_tokenizer_has_t5s_special_ids(tmp_path: Path) -> None:
    write_t5_tokenizer(tmp_path / "t5")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "t5")
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    ids = tokenizer("a red circle").input_ids
    assert ids[-1] == 1 and 2 not in ids  # </s> appended; known words, no <unk>
    assert tokenizer.convert_tokens_to_ids("<extra_id_0>") == len(tokenizer) - 1  # sentinels last, reversed
    assert tokenizer.convert_tokens_to_ids("<extra_id_99>") == len(tokenizer) - 100
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a red circle"
    padded = tokenizer("a cat", padding="max_length", max_length=12, truncation=True).input_ids
    assert len(padded) == 12 and padded[-1] == 0


def test_sd3_can_be_built_without_t5_and_flux_cannot(tmp_path: Path) -> None:
    folder = make_tiny_model(tmp_path / "sd3", arch="sd3", t5=False)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["text_encoder_3"] == [None, None] and index["tokenizer_3"] == [None, None]
    # diffusers lists SD3's T5 as required: such a folder loads with explicit Nones.
    pipe = DiffusionPipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    assert draw(pipe, "a red circle", seed=0).shape == (SIZE, SIZE, 3)
    with pytest.raises(ValueError, match="T5"):
        make_tiny_model(tmp_path / "flux", arch="flux", t5=False)
    with pytest.raises(ValueError, match="inpainting"):
        make_tiny_model(tmp_path / "flux", arch="flux", inpainting=True)
    with pytest.raises(ValueError, match="t5"):
        make_tiny_model(tmp_path / "sd1", t5=False)
