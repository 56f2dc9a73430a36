"""The original-layout writer is exactly what diffusers' own single-file converters read back.

Each tiny pipeline (SD1, SD1 inpainting, SD2, SDXL) is written in the original layout, loaded back by diffusers'
converters (model-level `from_single_file`, `create_diffusers_clip_model_from_ldm`, pipeline `from_single_file`) and
every tensor must come back bit-identical, with no key missing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sdserver.engine.tiny import write_byte_level_tokenizer
from tests.support.original_layout import save_single_file, to_original_state_dict

ARCHS = ["sd1", "sd1-inpainting", "sd2", "sdxl"]
UNET = "model.diffusion_model."
VAE = "first_stage_model."


def _randomize(module: Any) -> Any:  # Any: mypy does not see diffusers' models as nn.Modules
    # Zero-initialised layers (conv_out, proj_out, ...) would round-trip equal even if misnamed.
    with torch.no_grad():
        for param in module.parameters():
            param.normal_()
    return module


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(32, 32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
    )


def _text_config(hidden_act: str, hidden_size: int = 64) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=1,
        max_position_embeddings=77,
        hidden_act=hidden_act,
        projection_dim=64,
    )


def _sd_unet(*, v2: bool, in_channels: int = 4) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=in_channels,
        block_out_channels=(64, 128) if v2 else (32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(1, 2) if v2 else 8,
        use_linear_projection=v2,
        cross_attention_dim=64,
        norm_num_groups=32,
    )


def _xl_unet(cross_attention_dim: int) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(64, 128),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(1, 2),
        use_linear_projection=True,
        cross_attention_dim=cross_attention_dim,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=112,  # 6 time ids * 8 + text_encoder_2's 64-wide pooled output
        norm_num_groups=32,
    )


def build_pipeline(arch: str, workdir: Path, *, clip_l_width: int = 64) -> Any:
    """The tiny pipeline of `arch`; `clip_l_width` sets SDXL's first text encoder's width (bigG's stays 64)."""
    torch.manual_seed(0)
    tokenizer = write_byte_level_tokenizer(workdir / "tokenizer")  # any tokenizer: only weights are compared
    parts: dict[str, Any] = {
        "vae": _randomize(_vae()),
        "tokenizer": tokenizer,
        "scheduler": EulerDiscreteScheduler(steps_offset=1),
    }
    if arch == "sdxl":
        parts["unet"] = _randomize(_xl_unet(cross_attention_dim=clip_l_width + 64))  # both encoders' states, joined
        parts["text_encoder"] = _randomize(CLIPTextModel(_text_config("quick_gelu", clip_l_width)))
        parts["text_encoder_2"] = _randomize(CLIPTextModelWithProjection(_text_config("gelu")))
        return StableDiffusionXLPipeline(tokenizer_2=tokenizer, **parts)
    v2 = arch == "sd2"
    parts["unet"] = _randomize(_sd_unet(v2=v2, in_channels=9 if arch == "sd1-inpainting" else 4))
    parts["text_encoder"] = _randomize(CLIPTextModel(_text_config("gelu" if v2 else "quick_gelu")))
    pipeline_class = StableDiffusionInpaintPipeline if arch == "sd1-inpainting" else StableDiffusionPipeline
    return pipeline_class(safety_checker=None, feature_extractor=None, requires_safety_checker=False, **parts)


@dataclass
class Converted:
    arch: str
    pipe: Any
    folder: Path  # the diffusers folder: configs for the single-file loaders
    state: dict[str, torch.Tensor]


@pytest.fixture(scope="module", params=ARCHS)
def converted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Converted:
    pipe = build_pipeline(request.param, tmp_path_factory.mktemp("build"))
    folder = tmp_path_factory.mktemp(request.param)
    pipe.save_pretrained(folder)
    return Converted(request.param, pipe, folder, to_original_state_dict(pipe))


def assert_same_tensors(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    differing = [key for key, tensor in want.items() if got[key].is_meta or not torch.equal(got[key], tensor)]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:5]}"


def _load_text_encoder(cls: type, checkpoint: Mapping[str, torch.Tensor], subfolder: str, folder: Path) -> Any:
    return create_diffusers_clip_model_from_ldm(
        cls, checkpoint=dict(checkpoint), subfolder=subfolder, config=str(folder), local_files_only=True
    )


def test_unet_round_trips(converted: Converted) -> None:
    unet = UNet2DConditionModel.from_single_file(
        converted.state, config=str(converted.folder), subfolder="unet", local_files_only=True
    )
    assert_same_tensors(unet.state_dict(), converted.pipe.unet.state_dict())


def test_vae_round_trips(converted: Converted) -> None:
    vae = AutoencoderKL.from_single_file(
        converted.state, config=str(converted.folder), subfolder="vae", local_files_only=True
    )
    assert_same_tensors(vae.state_dict(), converted.pipe.vae.state_dict())


def test_text_encoders_round_trip(converted: Converted) -> None:
    pipe, state = converted.pipe, converted.state
    encoder = _load_text_encoder(type(pipe.text_encoder), state, "text_encoder", converted.folder)
    assert_same_tensors(encoder.state_dict(), pipe.text_encoder.state_dict())
    if getattr(pipe, "text_encoder_2", None) is None:
        return
    # diffusers tells SDXL's two encoders apart only by width; the tiny ones are equally wide, so it would read
    # CLIP-L's weights for bigG. Hand it the file without CLIP-L to test the bigG mapping itself.
    without_clip_l = {key: t for key, t in state.items() if not key.startswith("conditioner.embedders.0.")}
    encoder_2 = _load_text_encoder(CLIPTextModelWithProjection, without_clip_l, "text_encoder_2", converted.folder)
    assert_same_tensors(encoder_2.state_dict(), pipe.text_encoder_2.state_dict())


def test_layout_matches_real_checkpoints(converted: Converted) -> None:
    arch, pipe, state = converted.arch, converted.pipe, converted.state
    # VAE: mid attention as 1x1 convs, decoder levels numbered the LDM way round.
    assert state[f"{VAE}encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    assert torch.equal(
        state[f"{VAE}decoder.up.3.block.0.conv1.weight"], pipe.vae.decoder.up_blocks[0].resnets[0].conv1.weight
    )
    assert f"{VAE}decoder.up.0.upsample.conv.weight" not in state  # the full-resolution level has no upsampler
    # UNet: linear projection in the transformers exactly where the config asks for it.
    # With one layer per level: input_blocks 1, 2 (downsampler), 3; output_blocks 0, 1 | 2, 3.
    attention = "input_blocks.3.1" if arch == "sdxl" else "input_blocks.1.1"
    assert state[f"{UNET}{attention}.proj_in.weight"].ndim == (2 if pipe.unet.config.use_linear_projection else 4)
    assert state[f"{UNET}input_blocks.0.0.weight"].shape[1] == (9 if arch == "sd1-inpainting" else 4)
    if arch in ("sd1", "sd1-inpainting"):
        assert f"{UNET}output_blocks.3.1.transformer_blocks.0.attn2.to_k.weight" in state
        assert f"{UNET}output_blocks.1.1.conv.weight" in state  # upsampler right after the resnet
        assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in state
    if arch == "sd2":
        resblocks = {key.split(".")[4] for key in state if ".resblocks." in key}
        assert resblocks == {"0", "1", "2"}  # one more than diffusers' encoder has, as in real SD2 files
        assert state["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (192, 64)
        assert state["cond_stage_model.model.text_projection"].shape == (64, 64)
    if arch == "sdxl":
        assert state[f"{UNET}label_emb.0.0.weight"].shape == (256, 112)  # time_embed width (4 * 64) x adm input
        assert f"{UNET}input_blocks.3.1.transformer_blocks.1.attn1.to_q.weight" in state  # depth 2 at level 1
        assert f"{UNET}output_blocks.1.2.conv.weight" in state  # upsampler after the attention
        projection = state["conditioner.embedders.1.model.text_projection"]
        assert torch.equal(projection, pipe.text_encoder_2.text_projection.weight.T)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_save_single_file_reloads(converted: Converted, tmp_path: Path, suffix: str) -> None:
    path = save_single_file(converted.pipe, tmp_path / f"model{suffix}")
    if suffix == ".safetensors":
        loaded = load_file(path)
    else:
        checkpoint = torch.load(path, weights_only=True)
        assert checkpoint["global_step"] == 0
        loaded = checkpoint["state_dict"]
    assert_same_tensors(loaded, converted.state)


def test_save_single_file_casts_dtype(converted: Converted, tmp_path: Path) -> None:
    loaded = load_file(save_single_file(converted.pipe, tmp_path / "half.safetensors", dtype=torch.float16))
    assert {t.dtype for t in loaded.values()} == {torch.float16}
    assert_same_tensors(loaded, {key: t.half() for key, t in converted.state.items()})


def test_save_single_file_rejects_unknown_suffix(converted: Converted, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="suffix"):
        save_single_file(converted.pipe, tmp_path / "model.bin")


def _load_pipeline(pipe: Any, folder: Path, path: Path) -> Any:
    return type(pipe).from_single_file(str(path), config=str(folder), local_files_only=True)


def test_pipeline_from_single_file(converted: Converted, tmp_path: Path) -> None:
    pipe = converted.pipe
    loaded = _load_pipeline(pipe, converted.folder, save_single_file(pipe, tmp_path / "model.safetensors"))
    assert type(loaded) is type(pipe)
    # SDXL's text_encoder_2 is left out here: see the two tests below.
    for name in ("unet", "vae", "text_encoder"):
        assert_same_tensors(getattr(loaded, name).state_dict(), getattr(pipe, name).state_dict())


def test_sdxl_pipeline_from_single_file_with_distinct_encoder_widths(tmp_path: Path) -> None:
    # Real SDXL encoders differ in width (768 vs 1280), which is what diffusers keys bigG's detection on.
    pipe = build_pipeline("sdxl", tmp_path, clip_l_width=32)
    pipe.save_pretrained(tmp_path / "diffusers")
    loaded = _load_pipeline(pipe, tmp_path / "diffusers", save_single_file(pipe, tmp_path / "model.safetensors"))
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert_same_tensors(getattr(loaded, name).state_dict(), getattr(pipe, name).state_dict())


@pytest.mark.xfail(
    strict=True,
    reason="diffusers reads an SDXL file's CLIP-L weights into text_encoder_2 when both encoders are equally wide "
    "(its is_clip_sdxl_model check compares only the position embedding's width), leaving text_projection on meta",
)
def test_sdxl_pipeline_from_single_file_with_equal_encoder_widths(tmp_path: Path) -> None:
    pipe = build_pipeline("sdxl", tmp_path)
    pipe.save_pretrained(tmp_path / "diffusers")
    loaded = _load_pipeline(pipe, tmp_path / "diffusers", save_single_file(pipe, tmp_path / "model.safetensors"))
    assert_same_tensors(loaded.text_encoder_2.state_dict(), pipe.text_encoder_2.state_dict())
