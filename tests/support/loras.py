"""Tiny LoRA adapters for tests: random low-rank weights on a tiny model's attention layers, saved as
diffusers saves LoRAs (one .safetensors file)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict


def make_tiny_lora(model: Path, folder: Path, name: str, *, seed: int = 0) -> Path:
    """A LoRA for `model` (a diffusers folder) at `folder/name.safetensors`, touching its denoiser's
    attention: the UNet's (SD 1.x/2.x/XL) or the transformer's (SD3, FLUX)."""
    pipe = DiffusionPipeline.from_pretrained(model)
    torch.manual_seed(seed)
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    part = "unet" if hasattr(pipe, "unet") else "transformer"
    denoiser = getattr(pipe, part)
    denoiser.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    folder.mkdir(parents=True, exist_ok=True)
    layers = {f"{part}_lora_layers": get_peft_model_state_dict(denoiser)}
    type(pipe).save_lora_weights(folder, **layers, weight_name=f"{name}.safetensors")
    return folder / f"{name}.safetensors"
