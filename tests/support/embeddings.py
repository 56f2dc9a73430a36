"""Tiny textual-inversion embeddings for tests, in the formats people download: A1111's `.pt`, its
`.safetensors` (`emb_params`), SDXL's `.safetensors` (`clip_l` + `clip_g`) and diffusers' `{token: tensor}`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file

Format = Literal["pt", "pt-module", "safetensors", "sdxl", "diffusers"]


def text_widths(model: Path) -> tuple[int, ...]:
    """The widths of a diffusers model folder's text encoders (text_encoder, then text_encoder_2 if any)."""
    widths = []
    for part in ("text_encoder", "text_encoder_2"):
        config = model / part / "config.json"
        if config.is_file():
            widths.append(int(json.loads(config.read_text(encoding="utf-8"))["hidden_size"]))
    return tuple(widths)


def make_tiny_embedding(
    path: Path, width: int | tuple[int, ...], vectors: int = 2, fmt: Format = "pt", seed: int = 0
) -> Path:
    """Random vectors of `width` (for "sdxl": the two widths, CLIP-L's then OpenCLIP-G's) saved at `path`."""
    generator = torch.Generator().manual_seed(seed)
    widths = (width,) if isinstance(width, int) else tuple(width)
    parts = [torch.randn(vectors, each, generator=generator) for each in widths]
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "sdxl":
        assert len(parts) == 2, "an SDXL embedding has two widths"
        save_file({"clip_l": parts[0], "clip_g": parts[1]}, str(path))
    elif fmt == "safetensors":
        save_file({"emb_params": parts[0]}, str(path))
    elif fmt == "diffusers":
        torch.save({path.stem: parts[0]}, path)
    else:  # A1111's own .pt, as its training tab writes it ("pt-module": as older code did, a ParameterDict)
        params = torch.nn.ParameterDict({"*": torch.nn.Parameter(parts[0])}) if fmt == "pt-module" else {"*": parts[0]}
        data = {
            "string_to_token": {"*": 265},
            "string_to_param": params,
            "name": path.stem,
            "step": 1000,
            "sd_checkpoint": "0123456789",
            "sd_checkpoint_name": "tiny",
        }
        torch.save(data, path)
    return path
