"""Tiny random-weight ControlNets for tests: a diffusers folder made from a tiny model's UNet, and the same
weights as a single file in the original (lllyasviel) layout, as people download them."""

from __future__ import annotations

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
