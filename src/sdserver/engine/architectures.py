"""What a single-file checkpoint is (SD 1.x, 2.x or XL; inpainting; v-prediction), and its diffusers configs.

A single file holds weights only. diffusers converts them once it has the architecture's configs;
those ship in `assets/architectures/<kind>` (configs and tokenizer, no weights) so loading works
offline. Every size the weights determine (channels, layers, context width, vocabulary) is read from
the tensor shapes and overrides the shipped value, so fine-tunes of any width load; the rest
(attention heads, norm groups, scheduler) follows the original model's config: SD 1.x uses 8 heads,
SD 2.x and XL 64 channels per head, and CLIP 64 channels per head.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from sdserver.core.errors import UnsupportedModel
from sdserver.engine.checkpoint import Shapes

Kind = Literal["sd1", "sd2", "sdxl"]
Prediction = Literal["epsilon", "v_prediction"]

UNET = "model.diffusion_model."
VAE = "first_stage_model."
_CLIP_VOCAB = 49408
_HEAD_CHANNELS = 64
# Where each kind keeps its text encoders: (diffusers component, checkpoint prefix, layout).
_TEXT_ENCODERS: dict[Kind, list[tuple[str, str, str]]] = {
    "sd1": [("text_encoder", "cond_stage_model.transformer.text_model.", "hf")],
    "sd2": [("text_encoder", "cond_stage_model.model.", "openclip")],
    "sdxl": [
        ("text_encoder", "conditioner.embedders.0.transformer.text_model.", "hf"),
        ("text_encoder_2", "conditioner.embedders.1.model.", "openclip"),
    ],
}
# Families we recognise but cannot serve: a key that marks them, and their name.
_OTHER_FAMILIES = (
    ("joint_blocks.", "a Stable Diffusion 3 model in a layout sdserver cannot read"),
    ("double_blocks.", "a FLUX model in a layout sdserver cannot read"),
    ("edm_mean", "a Playground v2.5 model"),
    ("control_model.", "a ControlNet"),
    ("lora_unet_", "a LoRA (put it in loras_dir)"),
    ("lora_te", "a LoRA (put it in loras_dir)"),
    (".lora_down.", "a LoRA (put it in loras_dir)"),
    ("motion_modules.", "an AnimateDiff motion module"),
)


@dataclass(frozen=True)
class Architecture:
    kind: Kind
    inpainting: bool
    prediction_type: Prediction


def architectures_root() -> Path:
    return Path(str(resources.files("sdserver") / "assets" / "architectures"))


def detect(shapes: Shapes, *, name: str, prediction_type: Prediction | None = None) -> Architecture:
    """The architecture of a checkpoint from its tensor names and shapes; UnsupportedModel names what
    the file is when we cannot serve it. `prediction_type` overrides the guess (SD 2.x: v)."""
    kind = _kind(shapes, name)
    in_channels = _shape(shapes, UNET + "input_blocks.0.0.weight", name)[1]
    if in_channels not in (4, 9):
        raise UnsupportedModel(
            f"{name} is a {kind} model whose UNet takes {in_channels} input channels (a depth or instruct "
            "model?); only regular (4) and inpainting (9) models are served"
        )
    inpainting = in_channels == 9
    if prediction_type is None:
        # A v_pred marker key is how v-prediction fine-tunes announce themselves; SD 2.x's flagship
        # 768 px model is v-prediction (2.x base and inpainting are not: set prediction_type for those).
        sd2_v = kind == "sd2" and not inpainting
        prediction_type = "v_prediction" if "v_pred" in shapes or sd2_v else "epsilon"
    return Architecture(kind, inpainting, prediction_type)


def _kind(shapes: Shapes, name: str) -> Kind:
    for marker, family in _OTHER_FAMILIES:
        if any(marker in key for key in shapes):
            raise UnsupportedModel(f"{name} looks like {family}")
    has_unet = UNET + "input_blocks.0.0.weight" in shapes
    if not has_unet or VAE + "encoder.conv_in.weight" not in shapes:
        missing = "UNet" if not has_unet else "VAE"
        raise UnsupportedModel(
            f"{name} is not a full Stable Diffusion checkpoint (no {missing} weights in the original layout)"
        )
    kind: Kind
    if _has_prefix(shapes, "conditioner.embedders.1.model."):
        kind = "sdxl"
    elif _has_prefix(shapes, "conditioner.embedders.0.model."):
        raise UnsupportedModel(f"{name} looks like the SDXL refiner, which cannot serve txt2img; use a base model")
    elif _has_prefix(shapes, "cond_stage_model.model."):
        kind = "sd2"
    elif _has_prefix(shapes, "cond_stage_model.transformer."):
        kind = "sd1"
    else:
        raise UnsupportedModel(f"{name} has a UNet but no text encoder that sdserver knows (CLIP or OpenCLIP)")
    for _, prefix, layout in _TEXT_ENCODERS[kind]:
        vocab = _shape(shapes, _token_embedding(prefix, layout), name)[0]
        if vocab != _CLIP_VOCAB:  # the shipped tokenizer is CLIP's
            raise UnsupportedModel(
                f"{name}: its text encoder has a vocabulary of {vocab} tokens; single files need CLIP's {_CLIP_VOCAB}"
            )
    return kind


def write_config_folder(arch: Architecture, shapes: Shapes, folder: Path, *, name: str) -> Path:
    """Write a diffusers config folder (no weights) for this checkpoint into `folder`."""
    source = architectures_root() / arch.kind
    shutil.copytree(source, folder, dirs_exist_ok=True)
    tokenizer_files = architectures_root() / "clip-tokenizer"
    for component in ("tokenizer", "tokenizer_2"):
        if (folder / component).is_dir():
            for file in tokenizer_files.iterdir():
                shutil.copy(file, folder / component / file.name)

    text_widths: dict[str, int] = {}
    for component, prefix, layout in _TEXT_ENCODERS[arch.kind]:
        config = _text_encoder_config(shapes, prefix, layout, drop_last=arch.kind == "sd2", name=name)
        text_widths[component] = config.get("projection_dim", config["hidden_size"])
        _update(folder / component / "config.json", config)
    unet, vae = _unet_config(arch, shapes, text_widths, name=name), _vae_config(shapes, name=name)
    if arch.kind == "sd2" and arch.prediction_type == "epsilon":
        unet["sample_size"], vae["sample_size"] = 64, 512  # 2.x base and inpainting: 512 px
    _update(folder / "unet" / "config.json", unet)
    _update(folder / "vae" / "config.json", vae)
    _update(folder / "scheduler" / "scheduler_config.json", {"prediction_type": arch.prediction_type})
    if arch.inpainting:
        index = "StableDiffusionXLInpaintPipeline" if arch.kind == "sdxl" else "StableDiffusionInpaintPipeline"
        _update(folder / "model_index.json", {"_class_name": index})
    return folder


def _unet_config(arch: Architecture, shapes: Shapes, text_widths: dict[str, int], *, name: str) -> dict[str, Any]:
    levels = _unet_levels(shapes, name)
    channels = [level.channels for level in levels]
    per_level = {level.resblocks for level in levels}
    if len(per_level) != 1:
        raise UnsupportedModel(f"{name}: UNet levels have different numbers of blocks ({sorted(per_level)})")
    attention = [level.depth > 0 for level in levels]
    unet = {key: shape for key, shape in shapes.items() if key.startswith(UNET)}
    context = next((shape[1] for key, shape in unet.items() if key.endswith("attn2.to_k.weight")), None)
    proj_in = next((shape for key, shape in unet.items() if key.endswith(".proj_in.weight")), None)
    if context is None or proj_in is None:
        raise UnsupportedModel(f"{name}: the UNet has no cross-attention layers")
    config: dict[str, Any] = {
        "in_channels": _shape(shapes, UNET + "input_blocks.0.0.weight", name)[1],
        "out_channels": _shape(shapes, UNET + "out.2.weight", name)[0],
        "block_out_channels": channels,
        "layers_per_block": per_level.pop(),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "cross_attention_dim": context,
        "use_linear_projection": len(proj_in) == 2,
    }
    if arch.kind != "sd1":
        config["attention_head_dim"] = [max(1, c // _HEAD_CHANNELS) for c in channels]
    if arch.kind == "sdxl":
        config["transformer_layers_per_block"] = [max(1, level.depth) for level in levels]
        added = _shape(shapes, UNET + "label_emb.0.0.weight", name)[1]
        config["projection_class_embeddings_input_dim"] = added
        config["addition_time_embed_dim"] = (added - text_widths["text_encoder_2"]) // 6  # 6 size/crop numbers
    elif any(level.depth > 1 for level in levels):
        config["transformer_layers_per_block"] = [max(1, level.depth) for level in levels]
    return config


@dataclass(frozen=True)
class _Level:
    channels: int
    resblocks: int
    depth: int  # transformer blocks per attention (0: no attention at this level)


def _unet_levels(shapes: Shapes, name: str) -> list[_Level]:
    """Walk `input_blocks`: resnet blocks (with or without attention) until a downsampler ends a level."""
    levels: list[_Level] = []
    channels, resblocks, depth = 0, 0, 0
    index = 1
    while _has_prefix(shapes, f"{UNET}input_blocks.{index}."):
        block = f"{UNET}input_blocks.{index}."
        if block + "0.op.weight" in shapes:  # a downsampler: the level is complete
            levels.append(_Level(channels, resblocks, depth))
            resblocks, depth = 0, 0
        else:
            channels = _shape(shapes, block + "0.out_layers.3.weight", name)[0]
            resblocks += 1
            depth = max(depth, _count(shapes, block + "1.transformer_blocks."))
        index += 1
    levels.append(_Level(channels, resblocks, depth))
    return levels


def _vae_config(shapes: Shapes, *, name: str) -> dict[str, Any]:
    count = _count(shapes, VAE + "encoder.down.")
    return {
        "in_channels": _shape(shapes, VAE + "encoder.conv_in.weight", name)[1],
        "out_channels": _shape(shapes, VAE + "decoder.conv_out.weight", name)[0],
        "latent_channels": _shape(shapes, VAE + "encoder.conv_out.weight", name)[0] // 2,
        "block_out_channels": [
            _shape(shapes, f"{VAE}encoder.down.{i}.block.0.conv1.weight", name)[0] for i in range(count)
        ],
        "layers_per_block": _count(shapes, VAE + "encoder.down.0.block."),
        "down_block_types": ["DownEncoderBlock2D"] * count,
        "up_block_types": ["UpDecoderBlock2D"] * count,
    }


def _text_encoder_config(shapes: Shapes, prefix: str, layout: str, *, drop_last: bool, name: str) -> dict[str, Any]:
    vocab, hidden = _shape(shapes, _token_embedding(prefix, layout), name)
    if layout == "hf":
        positions = _shape(shapes, prefix + "embeddings.position_embedding.weight", name)[0]
        layers = _count(shapes, prefix + "encoder.layers.")
        intermediate = _shape(shapes, prefix + "encoder.layers.0.mlp.fc1.weight", name)[0]
    else:
        positions = _shape(shapes, prefix + "positional_embedding", name)[0]
        # SD 2.x uses the penultimate layer: its last resblock is in the file but never run.
        layers = _count(shapes, prefix + "transformer.resblocks.") - (1 if drop_last else 0)
        intermediate = _shape(shapes, prefix + "transformer.resblocks.0.mlp.c_fc.weight", name)[0]
    config = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": max(1, hidden // _HEAD_CHANNELS),
        "max_position_embeddings": positions,
    }
    if layout == "openclip" and prefix + "text_projection" in shapes:
        config["projection_dim"] = _shape(shapes, prefix + "text_projection", name)[1]
    return config


def _token_embedding(prefix: str, layout: str) -> str:
    return prefix + ("embeddings.token_embedding.weight" if layout == "hf" else "token_embedding.weight")


def _update(path: Path, values: dict[str, Any]) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(values)
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


def _shape(shapes: Shapes, key: str, name: str) -> tuple[int, ...]:
    try:
        return tuple(shapes[key])
    except KeyError:
        raise UnsupportedModel(f"{name} has no {key}: not a Stable Diffusion checkpoint sdserver can read") from None


def _has_prefix(shapes: Shapes, prefix: str) -> bool:
    return any(key.startswith(prefix) for key in shapes)


def _count(shapes: Shapes, prefix: str) -> int:
    """How many numbered children `prefix<N>.` exist."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(match.group(1)) for key in shapes if (match := pattern.match(key))}
    return max(found) + 1 if found else 0
