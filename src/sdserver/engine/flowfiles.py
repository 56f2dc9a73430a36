"""Stable Diffusion 3 / 3.5 and FLUX.1 single files: what they are (from tensor names and shapes, no
weights read) and how they load into diffusers pipelines, offline.

The forms people download:
- SD 3 / 3.5 all-in-one `.safetensors` (StabilityAI / ComfyUI): the MMDiT under `model.diffusion_model.`,
  the VAE under `first_stage_model.`, CLIP-L / CLIP-G / (optional) T5 under `text_encoders.{clip_l,clip_g,
  t5xxl}.transformer.` (FLUX all-in-one checkpoints use the same layout with CLIP-L and T5);
- transformer-only `.safetensors`: SD3 `joint_blocks.*`, FLUX `double_blocks.*` / `single_blocks.*`,
  with or without the `model.diffusion_model.` prefix;
- GGUF-quantised transformers (`.gguf`, city96's layout: the same names, quantised 2-D weights).

Each loads through diffusers' own converters and GGUF support with the configs shipped in
`assets/architectures/<variant>`; every size the shapes tell (layers, widths, heads, channels, text
encoder sizes) overrides the shipped value, so fine-tunes and tiny test models of any width load.
What a file does not hold (text encoders, tokenizers, VAE) comes from `encoders`: a diffusers folder or
hub id of the same family. T5's tokenizer (spiece) cannot ship with sdserver, so a file with a T5
encoder needs `encoders` too. The CLIP tokenizers ship (the real vocabulary, as for SD 1.x/XL).
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import re
import shutil
import tempfile
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from sdserver.core.errors import ModelLoadError, SDServerError, UnsupportedModel
from sdserver.engine.architectures import _text_encoder_config, _vae_config, architectures_root
from sdserver.engine.checkpoint import Shapes, read_shapes, read_state_dict

log = logging.getLogger(__name__)

Family = Literal["sd3", "flux"]
# The shipped architecture folders; a file's variant names the one whose configs it loads with.
Variant = Literal["sd3-medium", "sd3.5-medium", "sd3.5-large", "flux-dev", "flux-schnell", "flux-fill"]
VARIANTS: tuple[Variant, ...] = typing.get_args(Variant)
Format = Literal["safetensors", "gguf"]

TRANSFORMER_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_VOCAB = 49408
SD3_HEAD_CHANNELS = 64  # every SD3 / 3.5 model; with QK norm the file tells it (SD3 Medium has none)
_MARKERS: dict[Family, str] = {
    "sd3": "joint_blocks.0.x_block.attn.qkv.weight",
    "flux": "double_blocks.0.img_attn.qkv.weight",
}
# The text encoders of each family: diffusers component -> where an all-in-one file keeps it.
TEXT_ENCODERS: dict[Family, dict[str, str]] = {
    "sd3": {
        "text_encoder": "text_encoders.clip_l.transformer.",
        "text_encoder_2": "text_encoders.clip_g.transformer.",
        "text_encoder_3": "text_encoders.t5xxl.transformer.",
    },
    "flux": {"text_encoder": "text_encoders.clip_l.transformer.", "text_encoder_2": "text_encoders.t5xxl.transformer."},
}
T5_ENCODER: dict[Family, str] = {"sd3": "text_encoder_3", "flux": "text_encoder_2"}
DISPLAY: dict[Variant, str] = {
    "sd3-medium": "Stable Diffusion 3 Medium",
    "sd3.5-medium": "Stable Diffusion 3.5 Medium",
    "sd3.5-large": "Stable Diffusion 3.5 Large",
    "flux-dev": "FLUX.1 [dev]",
    "flux-schnell": "FLUX.1 [schnell]",
    "flux-fill": "FLUX.1 Fill [dev]",
}
HUB_EXAMPLE: dict[Variant, str] = {
    "sd3-medium": "stabilityai/stable-diffusion-3-medium-diffusers",
    "sd3.5-medium": "stabilityai/stable-diffusion-3.5-medium",
    "sd3.5-large": "stabilityai/stable-diffusion-3.5-large",
    "flux-dev": "black-forest-labs/FLUX.1-dev",
    "flux-schnell": "black-forest-labs/FLUX.1-schnell",
    "flux-fill": "black-forest-labs/FLUX.1-Fill-dev",
}
# Recognised but not served: a key that marks them, and what they are.
_OTHER_FLOW_MODELS = (
    ("distilled_guidance_layer.", "Chroma (a FLUX.1 derivative with its own pipeline)"),
    ("single_stream_modulation.", "FLUX.2"),
    ("double_stream_modulation_img.", "FLUX.2"),
)


@dataclass(frozen=True)
class FlowFile:
    """What an SD3 / FLUX single file is, from its header alone."""

    path: Path
    family: Family
    variant: Variant
    format: Format
    prefix: str  # where the transformer's keys start: "" or "model.diffusion_model."
    parts: frozenset[str]  # the diffusers components it holds: transformer, vae, text_encoder...
    transformer: dict[str, Any]  # the transformer config values its shapes tell

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def display(self) -> str:
        return DISPLAY[self.variant]

    @property
    def pipeline_class(self) -> str:
        return str(_shipped_index(self.variant)["_class_name"])

    @property
    def has_t5(self) -> bool:
        return T5_ENCODER[self.family] in self.parts

    def missing(self) -> list[str]:
        """The weighted components (VAE, text encoders) it lacks; SD3's T5 is optional, not listed."""
        needed = ["vae", *TEXT_ENCODERS[self.family]]
        optional = {"text_encoder_3"} if self.family == "sd3" else set()
        return [part for part in needed if part not in self.parts and part not in optional]


def flux_rope_axes(head: int) -> list[int]:
    """FLUX's rotary axes (time, height, width) for a head width, by the real model's split: 128 ->
    16, 56, 56 (the shapes do not hold them: rotary embeddings have no weights)."""
    time = head // 8
    side = (head - time) // 2
    return [time, side, side]


def read_flow_shapes(path: Path) -> dict[str, tuple[int, ...]] | None:
    """Each tensor's (logical) shape from the header of a `.safetensors` or `.gguf` file; None for
    other files (a `.ckpt` is never an SD3/FLUX download)."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return read_shapes(path)
    if suffix != ".gguf":
        return None
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError) as exc:
        raise ModelLoadError(f"cannot read {path.name}: not a valid .gguf file ({exc})") from None
    # GGUF lists dimensions innermost first (ggml's order); torch's order is the reverse.
    return {tensor.name: tuple(int(n) for n in reversed(tensor.shape.tolist())) for tensor in reader.tensors}


def detect(path: Path) -> FlowFile | None:
    """What SD3 / FLUX file `path` is; None when it is not one (an SD 1.x/2.x/XL checkpoint, say).
    UnsupportedModel names what a related file is when it cannot be served (Chroma, FLUX.2, FLUX
    Depth/Canny, an odd MLP width)."""
    shapes = read_flow_shapes(path)
    if shapes is None:
        return None
    return detect_shapes(shapes, path)


def detect_shapes(shapes: Shapes, path: Path) -> FlowFile | None:
    prefix = TRANSFORMER_PREFIX if any(key.startswith(TRANSFORMER_PREFIX) for key in shapes) else ""
    inner = {key[len(prefix) :]: shape for key, shape in shapes.items() if key.startswith(prefix)}
    for marker, what in _OTHER_FLOW_MODELS:
        if any(key.startswith(marker) for key in inner):
            raise UnsupportedModel(f"{path.name} looks like {what}; sdserver serves SD 3 / 3.5 and FLUX.1")
    family = next((f for f, marker in _MARKERS.items() if marker in inner), None)
    if family is None:
        return None
    if family == "sd3":
        config = _sd3_config(inner, path.name)
        variant: Variant = _sd3_variant(config)
    else:
        config = _flux_config(inner, path.name)
        variant = _flux_variant(config, path.name)
    parts = {"transformer"}
    if VAE_PREFIX + "encoder.conv_in.weight" in shapes:
        parts.add("vae")
    for component, text_prefix in TEXT_ENCODERS[family].items():
        if any(key.startswith(text_prefix) for key in shapes):
            parts.add(component)
    form: Format = "gguf" if path.suffix.lower() == ".gguf" else "safetensors"
    return FlowFile(path, family, variant, form, prefix, frozenset(parts), config)


def _sd3_config(shapes: Shapes, name: str) -> dict[str, Any]:
    inner, in_channels, patch, _ = _shape(shapes, "x_embedder.proj.weight", name)
    layers = _count(shapes, "joint_blocks.")
    qk_norm = "joint_blocks.0.x_block.attn.ln_q.weight" in shapes
    head = _shape(shapes, "joint_blocks.0.x_block.attn.ln_q.weight", name)[0] if qk_norm else SD3_HEAD_CHANNELS
    positions = _shape(shapes, "pos_embed", name)[1]
    context_out, context_in = _shape(shapes, "context_embedder.weight", name)
    return {
        "num_layers": layers,
        "num_attention_heads": inner // head,
        "attention_head_dim": head,
        "in_channels": in_channels,
        "out_channels": _shape(shapes, "final_layer.linear.weight", name)[0] // (patch * patch),
        "patch_size": patch,
        "joint_attention_dim": context_in,
        "caption_projection_dim": context_out,
        "pooled_projection_dim": _shape(shapes, "y_embedder.mlp.0.weight", name)[1],
        "pos_embed_max_size": math.isqrt(positions),
        "dual_attention_layers": [i for i in range(layers) if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in shapes],
        "qk_norm": "rms_norm" if qk_norm else None,
    }


def _sd3_variant(config: dict[str, Any]) -> Variant:
    if config["qk_norm"] is None:
        return "sd3-medium"
    return "sd3.5-medium" if config["dual_attention_layers"] else "sd3.5-large"


def _flux_config(shapes: Shapes, name: str) -> dict[str, Any]:
    inner, in_channels = _shape(shapes, "img_in.weight", name)
    head = _shape(shapes, "double_blocks.0.img_attn.norm.query_norm.scale", name)[0]
    mlp = _shape(shapes, "double_blocks.0.img_mlp.0.weight", name)[0]
    if mlp != 4 * inner:
        raise UnsupportedModel(f"{name}: a FLUX transformer whose MLP is {mlp / inner:g}x its width (FLUX.1: 4x)")
    return {
        "num_layers": _count(shapes, "double_blocks."),
        "num_single_layers": _count(shapes, "single_blocks."),
        "num_attention_heads": inner // head,
        "attention_head_dim": head,
        "in_channels": in_channels,
        "out_channels": _shape(shapes, "final_layer.linear.weight", name)[0],
        "joint_attention_dim": _shape(shapes, "txt_in.weight", name)[1],
        "pooled_projection_dim": _shape(shapes, "vector_in.in_layer.weight", name)[1],
        "guidance_embeds": "guidance_in.in_layer.weight" in shapes,
        "axes_dims_rope": flux_rope_axes(head),
    }


def _flux_variant(config: dict[str, Any], name: str) -> Variant:
    latents, inputs = config["out_channels"], config["in_channels"]
    if inputs == latents:
        return "flux-dev" if config["guidance_embeds"] else "flux-schnell"
    if inputs == 2 * latents:
        raise UnsupportedModel(
            f"{name} looks like FLUX.1 Depth or Canny (a control model), which sdserver does not serve"
        )
    if inputs == 6 * latents and config["guidance_embeds"]:
        return "flux-fill"  # packed latents + packed masked-image latents + the packed 8x8 mask (4 x 64)
    raise UnsupportedModel(f"{name}: a FLUX transformer taking {inputs} input channels for {latents} latent ones")


def _shape(shapes: Shapes, key: str, name: str) -> tuple[int, ...]:
    try:
        return tuple(shapes[key])
    except KeyError:
        raise UnsupportedModel(f"{name} has no {key}: not an SD3 / FLUX file sdserver can read") from None


def _count(shapes: Shapes, prefix: str) -> int:
    """How many numbered children `prefix<N>.` exist."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(match.group(1)) for key in shapes if (match := pattern.match(key))}
    return max(found) + 1 if found else 0


# --- configs ----------------------------------------------------------------------------------


def _shipped_index(variant: Variant) -> dict[str, Any]:
    index: dict[str, Any] = json.loads(
        (architectures_root() / variant / "model_index.json").read_text(encoding="utf-8")
    )
    return index


def write_config_folder(info: FlowFile, shapes: Shapes, folder: Path) -> Path:
    """The shipped diffusers config folder of the file's variant (no weights), with every size its
    shapes tell: transformer, and the VAE and text encoders it holds. CLIP tokenizers included."""
    shutil.copytree(architectures_root() / info.variant, folder, dirs_exist_ok=True)
    for component, (library, class_name) in _components(_shipped_index(info.variant)).items():
        if (library, class_name) == ("transformers", "CLIPTokenizer"):
            for file in (architectures_root() / "clip-tokenizer").iterdir():
                shutil.copy(file, folder / component / file.name)
    _update(folder / "transformer" / "config.json", info.transformer)
    if "vae" in info.parts:
        _update(folder / "vae" / "config.json", _vae_config(shapes, name=info.name))
    for component, prefix in TEXT_ENCODERS[info.family].items():
        if component not in info.parts:
            continue
        if component == T5_ENCODER[info.family]:
            config = _t5_config(shapes, prefix, info.name)
        else:
            config = _clip_config(shapes, prefix, info.name)
        _update(folder / component / "config.json", config)
    return folder


def _clip_config(shapes: Shapes, prefix: str, name: str) -> dict[str, Any]:
    config = _text_encoder_config(shapes, prefix + "text_model.", "hf", drop_last=False, name=name)
    if config["vocab_size"] != CLIP_VOCAB:  # the shipped tokenizer is CLIP's
        raise UnsupportedModel(
            f"{name}: its CLIP text encoder has a vocabulary of {config['vocab_size']} tokens; "
            f"single files need CLIP's {CLIP_VOCAB}"
        )
    projection = shapes.get(prefix + "text_projection.weight")
    config["projection_dim"] = projection[0] if projection is not None else config["hidden_size"]
    return config


def _t5_config(shapes: Shapes, prefix: str, name: str) -> dict[str, Any]:
    vocab, width = _shape(shapes, prefix + "shared.weight", name)
    attention = prefix + "encoder.block.0.layer.0.SelfAttention."
    buckets, heads = _shape(shapes, attention + "relative_attention_bias.weight", name)
    inner = _shape(shapes, attention + "q.weight", name)[0]
    layers = _count(shapes, prefix + "encoder.block.")
    return {
        "vocab_size": vocab,
        "d_model": width,
        "num_heads": heads,
        "d_kv": inner // heads,
        "d_ff": _shape(shapes, prefix + "encoder.block.0.layer.1.DenseReluDense.wi_0.weight", name)[0],
        "num_layers": layers,
        "num_decoder_layers": layers,
        "relative_attention_num_buckets": buckets,
    }


def _update(path: Path, values: dict[str, Any]) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(values)
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


def _components(index: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """model_index.json's components that are there (not `[null, null]`, not settings)."""
    return {
        name: (value[0], value[1])
        for name, value in index.items()
        if isinstance(value, list) and len(value) == 2 and value[0] is not None
    }


# --- loading ----------------------------------------------------------------------------------

_HUMAN: dict[Family, dict[str, str]] = {
    "sd3": {
        "vae": "VAE",
        "text_encoder": "CLIP-L text encoder",
        "text_encoder_2": "CLIP-G text encoder",
        "text_encoder_3": "T5 text encoder",
    },
    "flux": {"vae": "VAE", "text_encoder": "CLIP-L text encoder", "text_encoder_2": "T5 text encoder"},
}


@dataclass(frozen=True)
class Encoders:
    """A diffusers folder or hub id of the same family that lends a single file what it lacks."""

    source: str
    index: dict[str, Any]
    local: bool
    token: str | None

    @classmethod
    def open(cls, source: str, info: FlowFile, token: str | None) -> Encoders:
        from diffusers import DiffusionPipeline

        local = Path(source).expanduser().is_dir()
        location = str(Path(source).expanduser()) if local else source
        try:
            index = DiffusionPipeline.load_config(location, token=token, local_files_only=local)
        except Exception as exc:  # huggingface_hub raises many kinds (OSError, HTTP, offline errors)
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
            raise ModelLoadError(
                f"encoders {source!r} for {info.name}: cannot read its model_index.json ({reason}); it must be a "
                f"local diffusers folder or a hub id of a {_family_name(info.family)} model"
            ) from None
        pipeline = str(index.get("_class_name"))
        if _pipeline_family(pipeline) != info.family:
            raise UnsupportedModel(
                f"encoders {source!r} is a {pipeline}; {info.name} ({info.display}) needs the encoders of a "
                f"{_family_name(info.family)} model (e.g. {HUB_EXAMPLE[info.variant]})"
            )
        return cls(source, index, local, token)

    def has(self, component: str) -> bool:
        return component in _components(self.index)

    def load(self, component: str, dtype: torch.dtype) -> Any:
        library, class_name = _components(self.index)[component]
        model_class = getattr(importlib.import_module(library), class_name)
        location = str(Path(self.source).expanduser()) if self.local else self.source
        options: dict[str, Any] = {"subfolder": component, "token": self.token, "local_files_only": self.local}
        if "Tokenizer" not in class_name:
            options["torch_dtype"] = dtype
        return model_class.from_pretrained(location, **options)


def _pipeline_family(class_name: str) -> Family | None:
    if class_name.startswith("StableDiffusion3"):
        return "sd3"
    if re.match(r"Flux(?!\d)", class_name):  # FLUX.1's pipelines, not Flux2*
        return "flux"
    return None


def _family_name(family: Family) -> str:
    return "Stable Diffusion 3 / 3.5" if family == "sd3" else "FLUX.1"


_T5_WITHOUT_VOCABULARY = 104  # <pad>, </s>, <unk>, "▁" and 100 sentinels: what transformers makes of nothing


def _t5_tokenizer(family: Family) -> str:
    return "tokenizer_3" if family == "sd3" else "tokenizer_2"


def load_pipeline(path: Path, dtype: torch.dtype, encoders: str | None = None, token: str | None = None) -> Any:
    """The diffusers pipeline (StableDiffusion3Pipeline, FluxPipeline or FluxFillPipeline) of an SD3 /
    FLUX single file; what the file lacks comes from `encoders` (a diffusers folder or hub id of the
    same family; `token` for gated hub repos). UnsupportedModel / ModelLoadError say in one line what
    is missing and how to provide it."""
    path = Path(path)
    shapes = read_flow_shapes(path)
    info = detect_shapes(shapes, path) if shapes is not None else None
    if info is None or shapes is None:
        raise UnsupportedModel(f"{path.name} is not a Stable Diffusion 3 / 3.5 or FLUX.1 file")
    lender = Encoders.open(encoders, info, token) if encoders else None
    plan = _plan(info, lender)
    try:
        state = _read_weights(info)
        with tempfile.TemporaryDirectory(prefix="sdserver-config-") as tmp:
            folder = write_config_folder(info, shapes, Path(tmp))
            components = {
                name: _component(name, source, info, state, folder, lender, dtype) for name, source in plan.items()
            }
    except SDServerError:
        raise
    except Exception as exc:  # diffusers/transformers raise many kinds (ValueError, KeyError, OSError...)
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise ModelLoadError(f"could not load {path.name} ({info.display}): {reason}") from exc
    log.info("%s: %s, %s, parts in the file: %s", path.name, info.display, info.format, ", ".join(sorted(info.parts)))
    import diffusers

    return getattr(diffusers, info.pipeline_class)(**components)


Source = Literal["file", "encoders", "config", "none"]


def _plan(info: FlowFile, lender: Encoders | None) -> dict[str, Source]:
    """Where each pipeline component comes from, decided before any weight is read; one clear line
    when something can come from nowhere."""
    t5, t5_tokenizer = T5_ENCODER[info.family], _t5_tokenizer(info.family)
    plan: dict[str, Source] = {}
    lacking = []
    for name, (_, class_name) in _components(_shipped_index(info.variant)).items():
        if name == "scheduler" or class_name == "CLIPTokenizer":
            plan[name] = "config"
        elif name == t5_tokenizer:
            continue  # follows the T5 encoder, below
        elif name in info.parts:
            plan[name] = "file"
        elif lender is not None and lender.has(name):
            plan[name] = "encoders"
        elif name == "text_encoder_3":
            plan[name] = "none"  # SD 3 / 3.5 run without T5, as the real models can
        else:
            lacking.append(name)
    if lacking:
        raise UnsupportedModel(_lacking(info, lacking, lender))
    if plan[t5] == "none":
        plan[t5_tokenizer] = "none"
    elif lender is not None and lender.has(t5_tokenizer):
        plan[t5_tokenizer] = "encoders"
    elif lender is not None:
        raise UnsupportedModel(f"encoders {lender.source!r} has no T5 tokenizer ({t5_tokenizer}) for {info.name}")
    else:
        raise UnsupportedModel(
            f"{info.name} holds a T5 text encoder, but T5's tokenizer (spiece) cannot ship with sdserver: set "
            f"`encoders` for this model to a diffusers {_family_name(info.family)} folder or hub id that has it "
            f"(e.g. {HUB_EXAMPLE[info.variant]})"
        )
    return plan


def _lacking(info: FlowFile, lacking: list[str], lender: Encoders | None) -> str:
    human = _listing([_HUMAN[info.family][name] for name in lacking])
    if lender is not None:
        return f"{info.name} ({info.display}) has no {human}, and encoders {lender.source!r} has none either"
    held = _listing([_HUMAN[info.family].get(part, part) for part in sorted(info.parts)])
    return (
        f"{info.name} holds {'only the transformer' if info.parts == {'transformer'} else held} of "
        f"{info.display}, not its {human}: set `encoders` for this model to a diffusers "
        f"{_family_name(info.family)} folder or hub id that has them (e.g. {HUB_EXAMPLE[info.variant]})"
    )


def _listing(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _read_weights(info: FlowFile) -> dict[str, torch.Tensor]:
    if info.format == "gguf":
        from diffusers.models.model_loading_utils import load_gguf_checkpoint

        weights: dict[str, torch.Tensor] = load_gguf_checkpoint(str(info.path))
        return weights
    return read_state_dict(info.path)


def _component(
    name: str,
    source: Source,
    info: FlowFile,
    state: dict[str, torch.Tensor],
    folder: Path,
    lender: Encoders | None,
    dtype: torch.dtype,
) -> Any:
    if source == "none":
        return None
    if source == "encoders":
        assert lender is not None
        loaded = lender.load(name, dtype)
        if name == _t5_tokenizer(info.family) and len(loaded) <= _T5_WITHOUT_VOCABULARY:
            # transformers 5 builds a placeholder T5 tokenizer when the vocabulary file is absent.
            raise ModelLoadError(
                f"encoders {lender.source!r}: its {name} has no vocabulary (no spiece.model or tokenizer.json)"
            )
        return loaded
    library, class_name = _components(_shipped_index(info.variant))[name]
    model_class = getattr(importlib.import_module(library), class_name)
    if source == "config":  # the scheduler, the CLIP tokenizers
        return model_class.from_pretrained(folder / name)
    if name == "transformer":
        return _transformer(info, state, folder, dtype)
    import diffusers
    from diffusers.loaders.single_file import load_single_file_sub_model

    model = load_single_file_sub_model(
        library_name=library,
        class_name=class_name,
        name=name,
        checkpoint=state,
        pipelines=diffusers.pipelines,
        is_pipeline_module=False,
        cached_model_config_path=str(folder),
        local_files_only=True,
        torch_dtype=dtype,
    )
    if name == T5_ENCODER[info.family]:
        # Real files hold T5's token embedding once (`shared`); diffusers leaves the tied copy that
        # the encoder reads on the meta device. And it leaves T5 in training mode (dropout on).
        model.encoder.embed_tokens = model.shared
        model.eval()
    return model


def _transformer(info: FlowFile, state: dict[str, torch.Tensor], folder: Path, dtype: torch.dtype) -> Any:
    from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig, SD3Transformer2DModel

    start = len(info.prefix)
    weights = {key[start:]: tensor for key, tensor in state.items() if key.startswith(info.prefix)}
    if info.family == "flux":
        model_class: Any = FluxTransformer2DModel
        weights = _flux_to_diffusers(weights, info.transformer)
    else:
        model_class = SD3Transformer2DModel
    quantization = GGUFQuantizationConfig(compute_dtype=dtype) if info.format == "gguf" else None
    return model_class.from_single_file(
        weights,
        config=str(folder),
        subfolder="transformer",
        torch_dtype=dtype,
        quantization_config=quantization,
        local_files_only=True,
    )


_FLUX1_WIDTH = 3072  # diffusers' FLUX converter assumes it (and a 4x MLP) when it splits `linear1`


def _flux_to_diffusers(weights: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """diffusers' own FLUX converter, for any width: it splits each single block's fused `linear1`
    (q, k, v, MLP in) at FLUX.1's width, so it gets empty stand-ins and the split is done here."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    inner = config["num_attention_heads"] * config["attention_head_dim"]
    fused = re.compile(r"single_blocks\.(\d+)\.linear1\.(weight|bias)")
    linear1 = {key: weights.pop(key) for key in list(weights) if fused.fullmatch(key)}
    for key in linear1:
        weights[key] = torch.empty(7 * _FLUX1_WIDTH, 0)
    converted: dict[str, torch.Tensor] = convert_flux_transformer_checkpoint_to_diffusers(weights)
    for key, tensor in linear1.items():
        match = fused.fullmatch(key)
        assert match is not None
        block, kind = f"single_transformer_blocks.{match.group(1)}.", match.group(2)
        q, k, v, mlp = torch.split(tensor, [inner, inner, inner, 4 * inner], dim=0)
        parts = {"attn.to_q": q, "attn.to_k": k, "attn.to_v": v, "proj_mlp": mlp}
        converted.update({f"{block}{name}.{kind}": part for name, part in parts.items()})
    return converted
