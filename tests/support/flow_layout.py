"""Write diffusers SD3 / FLUX.1 models as the single files people download, for tests.

The inverse of diffusers' own converters (`convert_sd3_transformer_checkpoint_to_diffusers`,
`convert_flux_transformer_checkpoint_to_diffusers`, the CLIP/T5/VAE converters in
`diffusers.loaders.single_file_utils`); `test_flow_layout.py` proves the round trip through them.

Layouts:
- SD3 transformer (StabilityAI's MMDiT names): `pos_embed`, `x_embedder.proj`, `t_embedder.mlp.{0,2}`,
  `y_embedder.mlp.{0,2}`, `context_embedder`, `joint_blocks.N.{x_block,context_block}` with fused
  `attn.qkv`, `attn.ln_q/ln_k`, `attn.proj`, `adaLN_modulation.1`, `mlp.fc1/fc2`; SD 3.5 Medium's dual
  attention as `x_block.attn2.*`; `final_layer.{linear,adaLN_modulation.1}`. The last block's context
  modulation and the final modulation are stored (shift, scale), diffusers' (scale, shift).
- FLUX transformer (Black Forest Labs' names): `img_in`, `txt_in`, `time_in`, `vector_in`, `guidance_in`
  (dev and Fill), `double_blocks.N.{img,txt}_{mod.lin,attn.qkv,attn.norm.*_norm.scale,attn.proj,mlp.0,mlp.2}`,
  `single_blocks.N.{modulation.lin,linear1 (q,k,v,mlp fused),linear2,norm.*_norm.scale}`, `final_layer`.
- SD 3.5 all-in-one (ComfyUI / StabilityAI): the transformer under `model.diffusion_model.`, the VAE in
  the LDM layout under `first_stage_model.`, and `text_encoders.{clip_l,clip_g,t5xxl}.transformer.` with
  transformers' own names (CLIP under `text_model.`).
- GGUF (city96's layout, as llama.cpp's `gguf` package writes it): the transformer's original names,
  2-D weights quantised (Q8_0 by default) when their rows split into whole blocks, the rest F32.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors.torch import save_file

from tests.support.original_layout import _hf_text_model_state, vae_to_original

StateDict = dict[str, torch.Tensor]

TRANSFORMER_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L, CLIP_G, T5XXL = (f"text_encoders.{name}.transformer." for name in ("clip_l", "clip_g", "t5xxl"))


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """(scale, shift) <-> (shift, scale): its own inverse."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first])


def _fuse(state: Mapping[str, torch.Tensor], prefix: str, names: list[str], kind: str) -> torch.Tensor:
    return torch.cat([state[f"{prefix}{name}.{kind}"] for name in names])


def _linear(out: StateDict, state: Mapping[str, torch.Tensor], source: str, target: str) -> None:
    """Copy `source`'s weight and bias (when it has one) to `target`."""
    for kind in ("weight", "bias"):
        if f"{source}.{kind}" in state:
            out[f"{target}.{kind}"] = state[f"{source}.{kind}"]


def _attention(out: StateDict, state: Mapping[str, torch.Tensor], source: str, target: str, qkv: list[str]) -> None:
    for kind in ("weight", "bias"):
        out[f"{target}.qkv.{kind}"] = _fuse(state, source, qkv, kind)


def sd3_transformer_to_original(transformer: Any) -> StateDict:
    state = transformer.state_dict()
    out: StateDict = {"pos_embed": state["pos_embed.pos_embed"]}
    _linear(out, state, "pos_embed.proj", "x_embedder.proj")
    _linear(out, state, "context_embedder", "context_embedder")
    for index, name in ((0, "linear_1"), (2, "linear_2")):
        _linear(out, state, f"time_text_embed.timestep_embedder.{name}", f"t_embedder.mlp.{index}")
        _linear(out, state, f"time_text_embed.text_embedder.{name}", f"y_embedder.mlp.{index}")
    layers = transformer.config.num_layers
    for i in range(layers):
        src, x, ctx = f"transformer_blocks.{i}.", f"joint_blocks.{i}.x_block.", f"joint_blocks.{i}.context_block."
        last = i == layers - 1
        _attention(out, state, src + "attn.", x + "attn", ["to_q", "to_k", "to_v"])
        _attention(out, state, src + "attn.", ctx + "attn", ["add_q_proj", "add_k_proj", "add_v_proj"])
        renames = {
            "attn.norm_q": x + "attn.ln_q",
            "attn.norm_k": x + "attn.ln_k",
            "attn.norm_added_q": ctx + "attn.ln_q",
            "attn.norm_added_k": ctx + "attn.ln_k",
            "attn.to_out.0": x + "attn.proj",
            "attn.to_add_out": ctx + "attn.proj",
            "norm1.linear": x + "adaLN_modulation.1",
            "norm1_context.linear": ctx + "adaLN_modulation.1",
            "ff.net.0.proj": x + "mlp.fc1",
            "ff.net.2": x + "mlp.fc2",
            "ff_context.net.0.proj": ctx + "mlp.fc1",
            "ff_context.net.2": ctx + "mlp.fc2",
            "attn2.norm_q": x + "attn2.ln_q",
            "attn2.norm_k": x + "attn2.ln_k",
            "attn2.to_out.0": x + "attn2.proj",
        }
        for source, target in renames.items():
            _linear(out, state, src + source, target)
        if f"{src}attn2.to_q.weight" in state:
            _attention(out, state, src + "attn2.", x + "attn2", ["to_q", "to_k", "to_v"])
        if last:  # a context-pre-only block: an AdaLayerNormContinuous, stored (shift, scale)
            for kind in ("weight", "bias"):
                out[f"{ctx}adaLN_modulation.1.{kind}"] = _swap_halves(state[f"{src}norm1_context.linear.{kind}"])
    _linear(out, state, "proj_out", "final_layer.linear")
    for kind in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{kind}"] = _swap_halves(state[f"norm_out.linear.{kind}"])
    _check_complete(state, out)
    return out


def flux_transformer_to_original(transformer: Any) -> StateDict:
    state = transformer.state_dict()
    out: StateDict = {}
    embedders = {"timestep_embedder": "time_in", "text_embedder": "vector_in", "guidance_embedder": "guidance_in"}
    for source, target in embedders.items():
        _linear(out, state, f"time_text_embed.{source}.linear_1", f"{target}.in_layer")
        _linear(out, state, f"time_text_embed.{source}.linear_2", f"{target}.out_layer")
    _linear(out, state, "context_embedder", "txt_in")
    _linear(out, state, "x_embedder", "img_in")
    for i in range(transformer.config.num_layers):
        src, dst = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        _attention(out, state, src + "attn.", dst + "img_attn", ["to_q", "to_k", "to_v"])
        _attention(out, state, src + "attn.", dst + "txt_attn", ["add_q_proj", "add_k_proj", "add_v_proj"])
        renames = {
            "norm1.linear": "img_mod.lin",
            "norm1_context.linear": "txt_mod.lin",
            "attn.to_out.0": "img_attn.proj",
            "attn.to_add_out": "txt_attn.proj",
            "ff.net.0.proj": "img_mlp.0",
            "ff.net.2": "img_mlp.2",
            "ff_context.net.0.proj": "txt_mlp.0",
            "ff_context.net.2": "txt_mlp.2",
        }
        for source, target in renames.items():
            _linear(out, state, src + source, dst + target)
        norms = {"norm_q": "img_attn", "norm_k": "img_attn", "norm_added_q": "txt_attn", "norm_added_k": "txt_attn"}
        for source, target in norms.items():
            which = "query_norm" if source.endswith("q") else "key_norm"
            out[f"{dst}{target}.norm.{which}.scale"] = state[f"{src}attn.{source}.weight"]
    for i in range(transformer.config.num_single_layers):
        src, dst = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for kind in ("weight", "bias"):  # q, k, v and the MLP input are one projection
            out[f"{dst}linear1.{kind}"] = torch.cat(
                [state[f"{src}attn.to_{p}.{kind}"] for p in "qkv"] + [state[f"{src}proj_mlp.{kind}"]]
            )
        _linear(out, state, src + "norm.linear", dst + "modulation.lin")
        _linear(out, state, src + "proj_out", dst + "linear2")
        out[f"{dst}norm.query_norm.scale"] = state[f"{src}attn.norm_q.weight"]
        out[f"{dst}norm.key_norm.scale"] = state[f"{src}attn.norm_k.weight"]
    _linear(out, state, "proj_out", "final_layer.linear")
    for kind in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{kind}"] = _swap_halves(state[f"norm_out.linear.{kind}"])
    _check_complete(state, out)
    return out


def _check_complete(state: Mapping[str, torch.Tensor], out: StateDict) -> None:
    """Every parameter went somewhere (a missed one is a bug in this writer)."""
    written = sum(t.numel() for t in out.values())
    expected = sum(t.numel() for t in state.values())
    if written != expected:
        raise AssertionError(f"the original layout holds {written} numbers, the model {expected}")


def transformer_to_original(transformer: Any) -> StateDict:
    if type(transformer).__name__ == "SD3Transformer2DModel":
        return sd3_transformer_to_original(transformer)
    return flux_transformer_to_original(transformer)


def all_in_one(pipe: Any, *, t5: bool = True) -> StateDict:
    """An SD3 or FLUX pipeline as one checkpoint (ComfyUI's layout): transformer, VAE, CLIP-L, CLIP-G
    (SD3) and T5 (unless `t5` is False, as in `sd3_medium_incl_clips.safetensors`)."""
    out = {TRANSFORMER_PREFIX + key: t for key, t in transformer_to_original(pipe.transformer).items()}
    out.update({VAE_PREFIX + key: t for key, t in vae_to_original(pipe.vae).items()})
    sd3 = type(pipe.transformer).__name__ == "SD3Transformer2DModel"
    prefixes = {"text_encoder": CLIP_L, "text_encoder_2": CLIP_G if sd3 else T5XXL, "text_encoder_3": T5XXL}
    for component, prefix in prefixes.items():
        encoder = getattr(pipe, component, None)
        if encoder is None or (prefix == T5XXL and not t5):
            continue
        if prefix == T5XXL:
            # Real files hold T5's embedding once, as `shared`; `encoder.embed_tokens` is tied to it.
            state = {k: v for k, v in encoder.state_dict().items() if k != "encoder.embed_tokens.weight"}
        else:
            state = _hf_text_model_state(encoder)
        out.update({prefix + key: tensor for key, tensor in state.items()})
    return out


def save_safetensors(state: Mapping[str, torch.Tensor], path: Path, *, dtype: torch.dtype | None = None) -> Path:
    tensors = {
        key: (t.to(dtype) if dtype is not None and t.is_floating_point() else t).detach().contiguous().clone()
        for key, t in state.items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def save_gguf(
    state: Mapping[str, torch.Tensor],
    path: Path,
    *,
    arch: str,
    quant: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.Q8_0,
) -> Path:
    """A GGUF file as city96's SD3/FLUX quantisations are: 2-D weights whose rows split into whole
    blocks quantised with `quant`; the rest (biases, norms, the patch embedding, `pos_embed`) in F32."""
    block = gguf.GGML_QUANT_SIZES[quant][0]
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch=arch)
    for key, tensor in state.items():
        data = tensor.detach().float().cpu().numpy()
        if data.ndim == 2 and data.shape[1] % block == 0:
            writer.add_tensor(key, gguf.quants.quantize(data, quant), raw_dtype=quant)
        else:
            writer.add_tensor(key, np.ascontiguousarray(data, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
