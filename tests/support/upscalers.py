"""Tiny upscaler models for tests: random weights in the architectures people download (ESRGAN,
SwinIR), saved as those files are (a .safetensors or a pickled .pth state dict), so spandrel
recognises them as it does the real ones."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file

from sdserver.engine.upscalers import import_spandrel

Arch = Literal["esrgan", "swinir"]


def make_tiny_upscaler(path: Path, scale: int = 2, arch: Arch = "esrgan", *, seed: int = 0) -> Path:
    """A random-weight upscaler at `path` (its suffix says the format: .safetensors, .pth, .pt, .ckpt)."""
    import_spandrel()  # the architectures import torchvision eagerly: through the placeholders
    torch.manual_seed(seed)
    model = _esrgan(scale) if arch == "esrgan" else _swinir(scale)
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save(state, path)
    return path


def _esrgan(scale: int) -> Any:
    from spandrel.architectures.ESRGAN import ESRGAN

    return ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=scale)


def _swinir(scale: int) -> Any:
    from spandrel.architectures.SwinIR import SwinIR

    return SwinIR(
        upscale=scale,
        img_size=16,
        window_size=4,
        embed_dim=12,
        depths=[1],
        num_heads=[2],
        mlp_ratio=2,
        upsampler="pixelshuffledirect",
    )
