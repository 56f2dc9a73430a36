"""Write a diffusers Stable Diffusion pipeline as one checkpoint in the original (CompVis/Stability, A1111) layout.

Tests use it to make small single-file checkpoints (SD1.x, SD2.x, SDXL, inpainting) offline, shaped like the
files users download. It is the inverse of diffusers' own single-file converters
(`diffusers.loaders.single_file_utils`), and `test_original_layout.py` proves the round trip through them.

The layout, by component:
- UNet under `model.diffusion_model.`: `input_blocks` / `middle_block` / `output_blocks` numbered by layer,
  LDM resnet names (`in_layers`, `emb_layers`, `out_layers`, `skip_connection`); transformer blocks keep
  diffusers' names and shapes (1x1 conv or Linear `proj_in`/`proj_out`, as `use_linear_projection` says).
- VAE under `first_stage_model.`: `encoder.down.N` / `decoder.up.N` (decoder levels in reverse order), `mid.block_1`,
  `mid.attn_1`, `mid.block_2`; the mid attention's q/k/v/proj_out are 1x1 convs (4D), as in real files.
- SD1: CLIP text model, transformers' names, under `cond_stage_model.transformer.text_model.`.
- SD2: OpenCLIP under `cond_stage_model.model.` (fused `in_proj`), with one more resblock than diffusers'
  text encoder, since SD2 files hold the whole OpenCLIP tower and diffusers drops its last layer.
- SDXL: CLIP-L under `conditioner.embedders.0.transformer.text_model.`, OpenCLIP bigG under
  `conditioner.embedders.1.model.`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

StateDict = dict[str, torch.Tensor]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_CLIP_PREFIX = "cond_stage_model.transformer."
SD2_OPENCLIP_PREFIX = "cond_stage_model.model."
SDXL_EMBEDDERS_PREFIX = "conditioner.embedders."

# A module map: diffusers module path -> (original module path, renames of the children under it).
ModuleMap = dict[str, tuple[str, Mapping[str, str]]]

_NO_RENAMES: Mapping[str, str] = {}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPENCLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def _rename_child(rest: str, renames: Mapping[str, str]) -> str:
    for old, new in renames.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old) :]
    return rest


def _remap(state: Mapping[str, torch.Tensor], modules: ModuleMap) -> StateDict:
    """Rename every key by its longest mapped module path; an unmapped key is a bug, so it raises."""
    out: StateDict = {}
    unmapped = []
    for key, tensor in state.items():
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            module = ".".join(parts[:cut])
            if module in modules:
                target, renames = modules[module]
                out[f"{target}.{_rename_child('.'.join(parts[cut:]), renames)}"] = tensor
                break
        else:
            unmapped.append(key)
    if unmapped:
        raise KeyError(f"no original-layout name for {unmapped}")
    return out


def _unet_modules(unet: Any) -> ModuleMap:
    config = unet.config
    per_level = config.layers_per_block
    if not isinstance(per_level, int):
        raise ValueError("only an int layers_per_block has an LDM layout (diffusers' converter assumes one too)")
    keys = list(unet.state_dict())
    levels = len(config.block_out_channels)
    modules: ModuleMap = {
        "conv_in": ("input_blocks.0.0", _NO_RENAMES),
        "time_embedding.linear_1": ("time_embed.0", _NO_RENAMES),
        "time_embedding.linear_2": ("time_embed.2", _NO_RENAMES),
        # SDXL's text_time embedding and SD2 upscaler/unCLIP's class projection are both `label_emb.0`.
        "add_embedding.linear_1": ("label_emb.0.0", _NO_RENAMES),
        "add_embedding.linear_2": ("label_emb.0.2", _NO_RENAMES),
        "class_embedding.linear_1": ("label_emb.0.0", _NO_RENAMES),
        "class_embedding.linear_2": ("label_emb.0.2", _NO_RENAMES),
        "mid_block.resnets.0": ("middle_block.0", _UNET_RESNET),
        "mid_block.attentions.0": ("middle_block.1", _NO_RENAMES),
        "mid_block.resnets.1": ("middle_block.2", _UNET_RESNET),
        "conv_norm_out": ("out.0", _NO_RENAMES),
        "conv_out": ("out.2", _NO_RENAMES),
    }
    # Each resnet(+attention) layer and each downsampler is one `input_blocks` entry; the last level has no
    # downsampler, so numbering with a stride of layers+1 per level still lines up.
    for level in range(levels):
        for layer in range(per_level):
            block = 1 + level * (per_level + 1) + layer
            modules[f"down_blocks.{level}.resnets.{layer}"] = (f"input_blocks.{block}.0", _UNET_RESNET)
            modules[f"down_blocks.{level}.attentions.{layer}"] = (f"input_blocks.{block}.1", _NO_RENAMES)
        modules[f"down_blocks.{level}.downsamplers.0.conv"] = (
            f"input_blocks.{1 + level * (per_level + 1) + per_level}.0.op",
            _NO_RENAMES,
        )
    # Up levels have one more layer; the upsampler shares the last layer's entry, after its attention if any.
    for level in range(levels):
        for layer in range(per_level + 1):
            block = level * (per_level + 1) + layer
            modules[f"up_blocks.{level}.resnets.{layer}"] = (f"output_blocks.{block}.0", _UNET_RESNET)
            modules[f"up_blocks.{level}.attentions.{layer}"] = (f"output_blocks.{block}.1", _NO_RENAMES)
        last = level * (per_level + 1) + per_level
        slot = 2 if any(key.startswith(f"up_blocks.{level}.attentions.") for key in keys) else 1
        modules[f"up_blocks.{level}.upsamplers.0.conv"] = (f"output_blocks.{last}.{slot}.conv", _NO_RENAMES)
    return modules


def unet_to_original(unet: Any) -> StateDict:
    return _remap(unet.state_dict(), _unet_modules(unet))


def _vae_modules(levels: int) -> ModuleMap:
    modules: ModuleMap = {
        name: (name, _NO_RENAMES)
        for name in (
            "quant_conv",
            "post_quant_conv",
            "encoder.conv_in",
            "encoder.conv_out",
            "decoder.conv_in",
            "decoder.conv_out",
        )
    }
    for part in ("encoder", "decoder"):
        modules[f"{part}.conv_norm_out"] = (f"{part}.norm_out", _NO_RENAMES)
        modules[f"{part}.mid_block.resnets.0"] = (f"{part}.mid.block_1", _NO_RENAMES)
        modules[f"{part}.mid_block.resnets.1"] = (f"{part}.mid.block_2", _NO_RENAMES)
        modules[f"{part}.mid_block.attentions.0"] = (f"{part}.mid.attn_1", _VAE_ATTENTION)
    for level in range(levels):
        modules[f"encoder.down_blocks.{level}.resnets"] = (f"encoder.down.{level}.block", _NO_RENAMES)
        modules[f"encoder.down_blocks.{level}.downsamplers.0.conv"] = (
            f"encoder.down.{level}.downsample.conv",
            _NO_RENAMES,
        )
        # LDM numbers decoder levels from the highest resolution, diffusers in the order they run.
        original = levels - 1 - level
        modules[f"decoder.up_blocks.{level}.resnets"] = (f"decoder.up.{original}.block", _NO_RENAMES)
        modules[f"decoder.up_blocks.{level}.upsamplers.0.conv"] = (f"decoder.up.{original}.upsample.conv", _NO_RENAMES)
    return modules


def vae_to_original(vae: Any) -> StateDict:
    out = _remap(vae.state_dict(), _vae_modules(len(vae.config.block_out_channels)))
    # Resnets are mapped as whole lists (`...resnets` -> `...block`), so rename their shortcut here.
    out = {key.replace(".conv_shortcut.", ".nin_shortcut."): tensor for key, tensor in out.items()}
    for key, tensor in out.items():
        if ".mid.attn_1." in key and key.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
            out[key] = tensor[:, :, None, None]  # Linear -> 1x1 conv, as real checkpoints store it
    return out


def _hf_text_model_state(text_encoder: Any) -> StateDict:
    """The encoder's state with every tower key under `text_model.` (transformers 5 flattens CLIPTextModel)."""
    out: StateDict = {}
    for key, tensor in text_encoder.state_dict().items():
        if key.startswith(("text_model.", "text_projection.")):
            out[key] = tensor
        else:
            out[f"text_model.{key}"] = tensor
    return out


def clip_to_original(text_encoder: Any, prefix: str) -> StateDict:
    """OpenAI CLIP (SD1, SDXL's first encoder): the original files keep transformers' own names."""
    return {f"{prefix}{key}": tensor for key, tensor in _hf_text_model_state(text_encoder).items()}


def _openclip_layer(state: Mapping[str, torch.Tensor], index: int, block: str) -> StateDict:
    source = f"text_model.encoder.layers.{index}."
    layer = {key[len(source) :]: tensor for key, tensor in state.items() if key.startswith(source)}
    out: StateDict = {}
    for kind in ("weight", "bias"):
        # OpenCLIP's nn.MultiheadAttention keeps q, k, v as one projection, stacked in that order.
        out[f"{block}attn.in_proj_{kind}"] = torch.cat([layer.pop(f"self_attn.{p}_proj.{kind}") for p in "qkv"])
    out.update({f"{block}{_rename_child(key, _OPENCLIP_LAYER)}": tensor for key, tensor in layer.items()})
    return out


def openclip_to_original(text_encoder: Any, prefix: str, *, extra_layer: bool = False) -> StateDict:
    """OpenCLIP text tower (SD2, SDXL's second encoder).

    `extra_layer` appends a copy of the last layer as one more resblock: SD2 files hold all of OpenCLIP ViT-H's 24
    layers while diffusers' SD2 text encoder keeps 23 (SD2 conditions on the penultimate layer), and diffusers skips
    that last resblock on loading.
    """
    state = _hf_text_model_state(text_encoder)
    config = text_encoder.config
    layers = config.num_hidden_layers
    out: StateDict = {
        "token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": state["text_model.final_layer_norm.weight"],
        "ln_final.bias": state["text_model.final_layer_norm.bias"],
    }
    for index in range(layers):
        out.update(_openclip_layer(state, index, f"transformer.resblocks.{index}."))
    if extra_layer:
        last = _openclip_layer(state, layers - 1, f"transformer.resblocks.{layers}.")
        out.update({key: tensor.clone() for key, tensor in last.items()})  # no shared storage, safetensors refuses it
    if "text_projection.weight" in state:
        out["text_projection"] = state["text_projection.weight"].T.contiguous()  # OpenCLIP multiplies x @ proj
    else:
        # SD2's diffusers encoder has no projection; the file has one (unused by SD2). Its shape[0] tells
        # diffusers the width to split in_proj by, so it must be [hidden, projection].
        out["text_projection"] = torch.eye(config.hidden_size, config.projection_dim)
    return {f"{prefix}{key}": tensor for key, tensor in out.items()}


def _is_openclip(text_encoder: Any) -> bool:
    # OpenCLIP towers (SD2's ViT-H, SDXL's bigG) use exact GELU; OpenAI's CLIP uses quick_gelu.
    return text_encoder.config.hidden_act == "gelu"


def _text_encoders_to_original(pipe: Any) -> StateDict:
    encoders = [getattr(pipe, name, None) for name in ("text_encoder", "text_encoder_2")]
    if encoders[1] is None:  # SD1 / SD2: a single `cond_stage_model`
        encoder = encoders[0]
        if encoder is None:
            return {}
        if _is_openclip(encoder):
            return openclip_to_original(encoder, SD2_OPENCLIP_PREFIX, extra_layer=True)
        return clip_to_original(encoder, SD1_CLIP_PREFIX)
    # SDXL: `conditioner.embedders.N`, numbered over the encoders present (the refiner has only bigG, as 0).
    out: StateDict = {}
    for index, encoder in enumerate(e for e in encoders if e is not None):
        prefix = f"{SDXL_EMBEDDERS_PREFIX}{index}."
        if _is_openclip(encoder):
            out.update(openclip_to_original(encoder, f"{prefix}model."))
        else:
            out.update(clip_to_original(encoder, f"{prefix}transformer."))
    return out


def to_original_state_dict(pipe: Any) -> dict[str, torch.Tensor]:
    """The pipeline's UNet, VAE and text encoder(s) as one state dict in the original single-file layout.

    Tensors may be views of the pipeline's parameters; clone before changing them.
    """
    out: StateDict = {}
    out.update({f"{UNET_PREFIX}{key}": tensor for key, tensor in unet_to_original(pipe.unet).items()})
    out.update({f"{VAE_PREFIX}{key}": tensor for key, tensor in vae_to_original(pipe.vae).items()})
    out.update(_text_encoders_to_original(pipe))
    return out


def save_single_file(pipe: Any, path: Path, *, dtype: torch.dtype | None = None) -> Path:
    """Save as `.safetensors`, or as a Lightning-style `.ckpt` (`{"state_dict": ..., "global_step": 0}`)."""
    state = to_original_state_dict(pipe)
    if dtype is not None:
        state = {key: t.to(dtype) if t.is_floating_point() else t for key, t in state.items()}
    state = {key: t.detach().contiguous() for key, t in state.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    elif path.suffix == ".ckpt":
        torch.save({"state_dict": state, "global_step": 0}, path)
    else:
        raise ValueError(f"unsupported checkpoint suffix {path.suffix!r}: use .safetensors or .ckpt")
    return path
