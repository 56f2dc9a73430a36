"""Tiny random-weight ControlNets for tests: a diffusers folder made from a tiny model's UNet, and the same
weights as a single file in the original (lllyasviel) layout, as people download them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from safetensors.torch import save_file

from tests.support.original_layout import _NO_RENAMES, _remap, _unet_modules


def make_tiny_controlnet(unet_folder: Path, out: Path, *, seed: int = 0) -> Path:
    """A ControlNet with the UNet's encoder (diffusers' `from_unet`), saved with save_pretrained. Its zero
    convolutions get small random weights, so its residuals are not all zero (a trained one's are not)."""
    if (out / "config.json").is_file():
        return out
    unet = UNet2DConditionModel.from_pretrained(unet_folder)
    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(unet)  # the standard hint block: 3 stride-2 convs, an 8x image
    with torch.no_grad():
        for module in (*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block):
            for parameter in module.parameters():
                parameter.normal_(0.0, 0.05)
    controlnet.save_pretrained(out)
    return out


def controlnet_to_original(controlnet: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """The ControlNet's weights in the original layout: the UNet encoder's LDM names, `zero_convs`,
    `middle_block_out` and `input_hint_block`."""
    modules = _unet_modules(controlnet)
    modules["controlnet_mid_block"] = ("middle_block_out.0", _NO_RENAMES)
    modules["controlnet_cond_embedding.conv_in"] = ("input_hint_block.0", _NO_RENAMES)
    blocks = len(controlnet.controlnet_cond_embedding.blocks)
    for index in range(blocks):
        modules[f"controlnet_cond_embedding.blocks.{index}"] = (f"input_hint_block.{2 * (index + 1)}", _NO_RENAMES)
    modules["controlnet_cond_embedding.conv_out"] = (f"input_hint_block.{2 * (blocks + 1)}", _NO_RENAMES)
    for index in range(len(controlnet.controlnet_down_blocks)):
        modules[f"controlnet_down_blocks.{index}"] = (f"zero_convs.{index}.0", _NO_RENAMES)
    return {prefix + key: value.contiguous() for key, value in _remap(controlnet.state_dict(), modules).items()}


def save_original(folder: Path, path: Path, *, prefix: str = "") -> Path:
    """The folder's ControlNet as one original-layout file: .safetensors, or a pickle (.pth)."""
    state = controlnet_to_original(ControlNetModel.from_pretrained(folder), prefix)
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    return path


def make_tiny_transformer_controlnet(model_folder: Path, out: Path, *, seed: int = 0) -> Path:
    """An SD3 or FLUX ControlNet from a tiny model's transformer (diffusers' `from_transformer`, one block
    of each kind), saved with save_pretrained; its zero-initialised input and output layers get small
    random weights, so it steers (a trained one does)."""
    from diffusers import FluxControlNetModel, FluxTransformer2DModel, SD3ControlNetModel, SD3Transformer2DModel

    if (out / "config.json").is_file():
        return out
    config = json.loads((model_folder / "transformer" / "config.json").read_text(encoding="utf-8"))
    torch.manual_seed(seed)
    controlnet: Any
    if config["_class_name"] == "SD3Transformer2DModel":
        transformer = SD3Transformer2DModel.from_pretrained(model_folder / "transformer")
        controlnet = SD3ControlNetModel.from_transformer(transformer, num_layers=1, num_extra_conditioning_channels=0)
        zeroed = [controlnet.pos_embed_input, *controlnet.controlnet_blocks]
    else:
        transformer = FluxTransformer2DModel.from_pretrained(model_folder / "transformer")
        heads = {key: config[key] for key in ("attention_head_dim", "num_attention_heads")}
        controlnet = FluxControlNetModel.from_transformer(transformer, num_layers=1, num_single_layers=1, **heads)
        zeroed = [controlnet.controlnet_x_embedder, *controlnet.controlnet_blocks, *controlnet.controlnet_single_blocks]
    with torch.no_grad():
        for module in zeroed:
            for parameter in module.parameters():
                parameter.normal_(0.0, 0.05)
    controlnet.save_pretrained(out)
    return out
