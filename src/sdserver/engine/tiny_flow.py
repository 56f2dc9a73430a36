"""Tiny, random-weight Stable Diffusion 3 / 3.5 and FLUX.1 models in diffusers format, built offline.

The same kind of folder as the real hub models (model_index.json, transformer, vae, text encoders,
tokenizers, scheduler), a few MB, for tests and offline demos. Each component is the shipped
architecture config (assets/architectures/<arch>) shrunk, so single-file copies of a tiny model load
back through the same code as the real files:
- CLIP-L is 32 wide and CLIP-G 64 wide (diffusers' single-file loader tells them apart by width),
  both with CLIP's real 49,408-token vocabulary, as single files need;
- SD3 pools CLIP-L unprojected: its projection is the identity (as diffusers' single-file loader sets);
- the T5 encoder is a T5 v1.1 (gated-GELU) encoder, 128 wide (SD3 pads CLIP-L + CLIP-G to T5's
  width), with a small Unigram tokenizer trained here on generated captions (real T5's ids for
  `<pad>`, `</s>`, `<unk>`, `</s>` appended, 100 `<extra_id_*>` sentinels last);
- the VAE is 16-channel and 8x down-sampling with the real model's scaling and shift factors;
- channels per attention head follow the real models' rule (SD3: 64; FLUX: read from the QK norm),
  so a single file's head count can be told from its shapes;
- "sd3" is the SD 3.5 Medium layout (QK norm, dual attention on the first block), "flux" FLUX.1 dev.
The text inputs (and FLUX's output) are scaled up: with plain random init the image barely reacts to
the prompt, which tests of "the prompt changes the image" need. Drawing 64x64 in 4 steps takes
about 0.2 s on a CPU; a folder is 17 MB (FLUX) to 33 MB (SD3), mostly CLIP's vocabulary.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxFillPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
from tokenizers.models import Unigram
from transformers import (  # type: ignore[attr-defined]  # T5TokenizerFast: an alias in transformers 5
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from sdserver.engine.architectures import architectures_root
from sdserver.engine.flowfiles import SD3_HEAD_CHANNELS, VARIANTS, Variant, flux_rope_axes

FlowArch = Variant
FLOW_ARCHS = VARIANTS
# Short names: "sd3" is the SD 3.5 Medium layout (QK norm and dual attention: every SD3 code path).
ALIASES: dict[str, FlowArch] = {"sd3": "sd3.5-medium", "flux": "flux-dev"}

CLIP_TOKENS = 77
T5_WIDTH = 128  # SD3 pads CLIP-L + CLIP-G (32 + 64) to the T5 width
T5_EXTRA_IDS = 100
FLUX_HEAD = 32


def resolve(arch: str) -> FlowArch | None:
    """The flow architecture `arch` names (aliases included); None for the SD 1.x/2.x/XL names."""
    name = ALIASES.get(arch, arch)
    return name if name in FLOW_ARCHS else None


def shipped(arch: str, component: str) -> dict[str, Any]:
    """The shipped full-size config of a component, without diffusers'/transformers' bookkeeping keys."""
    config = json.loads((architectures_root() / arch / component / "config.json").read_text(encoding="utf-8"))
    return {key: value for key, value in config.items() if not key.startswith("_") and key != "architectures"}


# --- the T5 tokenizer -------------------------------------------------------------------------

_COLOURS = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple", "pink", "brown", "grey"]
_THINGS = ["circle", "square", "triangle", "cat", "dog", "horse", "astronaut", "house", "tree", "mountain", "city"]
_THINGS += ["car", "boat", "flower", "portrait", "landscape", "robot", "castle", "forest", "ocean", "sky", "moon"]
_STYLES = ["a photo of", "a painting of", "an oil painting of", "a drawing of", "a watercolor of", "a render of"]
_LINKS = ["on a", "with a", "in the style of", "at night under the", "next to a", "riding a", "beside the"]


def _captions(count: int = 600) -> list[str]:
    rng = random.Random(0)
    lines = [
        f"{rng.choice(_STYLES)} {rng.choice(_COLOURS)} {rng.choice(_THINGS)} {rng.choice(_LINKS)} "
        f"{rng.choice(_COLOURS)} {rng.choice(_THINGS)}"
        for _ in range(count)
    ]
    return [*lines, string.ascii_letters + string.digits + string.punctuation]


def write_t5_tokenizer(folder: Path, *, max_length: int = 512) -> T5TokenizerFast:
    """A small T5-style tokenizer (Unigram, `<pad>` 0, `</s>` 1, `<unk>` 2, `</s>` appended, 100
    `<extra_id_*>` sentinels last), trained on generated captions; loads with T5TokenizerFast."""
    tokenizer = Tokenizer(Unigram())
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(" {2,}", " ")])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        initial_alphabet=list(string.ascii_letters + string.digits + string.punctuation),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_captions(), trainer)
    sentinels = [f"<extra_id_{i}>" for i in range(T5_EXTRA_IDS)]
    tokenizer.add_special_tokens(list(reversed(sentinels)))  # real T5: <extra_id_0> is the last id
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "T5Tokenizer",
        "model_max_length": max_length,
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "extra_ids": T5_EXTRA_IDS,
        "additional_special_tokens": sentinels,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    loaded: T5TokenizerFast = T5TokenizerFast.from_pretrained(folder)
    return loaded


# --- components -------------------------------------------------------------------------------


def _clip_tokenizer(arch: str, component: str, tmp: Path) -> CLIPTokenizer:
    folder = tmp / component
    folder.mkdir(parents=True)
    config = architectures_root() / arch / component / "tokenizer_config.json"
    (folder / "tokenizer_config.json").write_text(config.read_text(encoding="utf-8"), encoding="utf-8")
    for file in (architectures_root() / "clip-tokenizer").iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    tokenizer: CLIPTokenizer = CLIPTokenizer.from_pretrained(folder)
    return tokenizer


def _clip(
    arch: str, component: str, width: int, tokenizer: CLIPTokenizer, *, projection: bool
) -> CLIPTextModel | CLIPTextModelWithProjection:
    sizes = {
        "vocab_size": len(tokenizer),
        "hidden_size": width,
        "intermediate_size": 2 * width,
        "num_hidden_layers": 2,
        "num_attention_heads": max(1, width // 64),
        "max_position_embeddings": CLIP_TOKENS,
        "projection_dim": width,
    }
    config = CLIPTextConfig(**(shipped(arch, component) | sizes))
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _t5(arch: str, component: str, tokenizer: T5TokenizerFast) -> T5EncoderModel:
    sizes = {
        "vocab_size": len(tokenizer),
        "d_model": T5_WIDTH,
        "d_kv": 32,
        "d_ff": 2 * T5_WIDTH,
        "num_layers": 2,
        "num_decoder_layers": 2,
        "num_heads": 2,
        "relative_attention_num_buckets": 8,
    }
    return T5EncoderModel(T5Config(**(shipped(arch, component) | sizes)))


def _vae(arch: str) -> AutoencoderKL:
    sizes = {"block_out_channels": (32, 32, 64, 64), "layers_per_block": 1, "sample_size": 64}
    return AutoencoderKL(**(shipped(arch, "vae") | sizes))


def _scheduler(arch: str) -> FlowMatchEulerDiscreteScheduler:
    path = architectures_root() / arch / "scheduler" / "scheduler_config.json"
    scheduler: FlowMatchEulerDiscreteScheduler = FlowMatchEulerDiscreteScheduler.from_config(
        json.loads(path.read_text())
    )
    return scheduler


def _sd3_transformer(arch: str, joint: int, pooled: int) -> SD3Transformer2DModel:
    full = shipped(arch, "transformer")
    sizes = {
        "sample_size": 8,  # native 64 px with the 8x VAE (the full model: 1024)
        "num_layers": 2,
        "num_attention_heads": 1,
        "attention_head_dim": SD3_HEAD_CHANNELS,
        "caption_projection_dim": SD3_HEAD_CHANNELS,
        "joint_attention_dim": joint,
        "pooled_projection_dim": pooled,
        "pos_embed_max_size": 32,
        "dual_attention_layers": (0,) if full["dual_attention_layers"] else (),
    }
    return SD3Transformer2DModel(**(full | sizes))


def _flux_transformer(arch: str, joint: int, pooled: int) -> FluxTransformer2DModel:
    sizes = {
        "num_layers": 1,
        "num_single_layers": 2,
        "num_attention_heads": 2,
        "attention_head_dim": FLUX_HEAD,
        "joint_attention_dim": joint,
        "pooled_projection_dim": pooled,
        "axes_dims_rope": flux_rope_axes(FLUX_HEAD),
    }
    return FluxTransformer2DModel(**(shipped(arch, "transformer") | sizes))


def _amplify(transformer: Any, *, text: float, out: float) -> None:
    """Scale the text inputs (sequence and pooled) and the output up: with plain random init the
    image barely reacts to the prompt. Measured at 64 px, 4 steps: prompt and seed changes then move
    pixels by 25-35 grey levels on average, with almost none clipped."""
    with torch.no_grad():
        transformer.context_embedder.weight.mul_(text)
        transformer.time_text_embed.text_embedder.linear_2.weight.mul_(text)
        transformer.proj_out.weight.mul_(out)


def build_tiny_flow_pipeline(arch: FlowArch, *, t5: bool = True, seed: int = 0) -> Any:
    """A tiny StableDiffusion3Pipeline / FluxPipeline / FluxFillPipeline of `arch`. SD3 may leave out
    T5 (`t5=False`), as the real model can; FLUX always has it."""
    import tempfile

    if not t5 and arch.startswith("flux"):
        raise ValueError("FLUX.1 cannot run without its T5 encoder")
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory(prefix="sdserver-tiny-") as tmp:
        return _sd3_pipeline(arch, t5, Path(tmp)) if arch.startswith("sd3") else _flux_pipeline(arch, Path(tmp))


def _sd3_pipeline(arch: FlowArch, t5: bool, tmp: Path) -> Any:
    tokenizer, tokenizer_2 = _clip_tokenizer(arch, "tokenizer", tmp), _clip_tokenizer(arch, "tokenizer_2", tmp)
    tokenizer_3 = write_t5_tokenizer(tmp / "tokenizer_3") if t5 else None
    transformer = _sd3_transformer(arch, joint=T5_WIDTH, pooled=32 + 64)
    _amplify(transformer, text=8.0, out=1.0)
    clip_l: Any = _clip(arch, "text_encoder", 32, tokenizer, projection=True)
    with torch.no_grad():  # SD3 pools CLIP-L unprojected (diffusers' single-file loader: an identity)
        clip_l.text_projection.weight.copy_(torch.eye(32))
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=_scheduler(arch),
        vae=_vae(arch),
        text_encoder=clip_l,
        tokenizer=tokenizer,
        text_encoder_2=_clip(arch, "text_encoder_2", 64, tokenizer_2, projection=True),
        tokenizer_2=tokenizer_2,
        text_encoder_3=_t5(arch, "text_encoder_3", tokenizer_3) if tokenizer_3 is not None else None,
        tokenizer_3=tokenizer_3,
    )


def _flux_pipeline(arch: FlowArch, tmp: Path) -> Any:
    tokenizer, tokenizer_2 = _clip_tokenizer(arch, "tokenizer", tmp), write_t5_tokenizer(tmp / "tokenizer_2")
    transformer = _flux_transformer(arch, joint=T5_WIDTH, pooled=32)
    _amplify(transformer, text=16.0, out=2.0)
    pipe_class = FluxFillPipeline if arch == "flux-fill" else FluxPipeline
    return pipe_class(
        transformer=transformer,
        scheduler=_scheduler(arch),
        vae=_vae(arch),
        text_encoder=_clip(arch, "text_encoder", 32, tokenizer, projection=False),
        tokenizer=tokenizer,
        text_encoder_2=_t5(arch, "text_encoder_2", tokenizer_2),
        tokenizer_2=tokenizer_2,
    )
