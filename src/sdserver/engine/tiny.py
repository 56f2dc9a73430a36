"""Build a tiny, random-weight Stable Diffusion model (1.x, 2.x, XL; 3 / 3.5 and FLUX.1 through
`tiny_flow.py`) in diffusers format, offline.

It is the same kind of folder as a user's fine-tuned model (model_index.json, unet, vae,
text_encoder, tokenizer, scheduler, safety_checker, feature_extractor), only a few MB, so tests
and offline demos exercise the real loading and pipeline code. It draws noise. Each is the shipped
architecture config (assets/architectures) shrunk, so a single-file copy of it loads back the same.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Literal, TypedDict, Unpack

import diffusers
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from sdserver.engine.architectures import Kind as Arch
from sdserver.engine.architectures import architectures_root
from sdserver.engine.tiny_flow import ALIASES, FLOW_ARCHS, build_tiny_flow_pipeline, resolve, shipped

TEXT_HIDDEN = 32
MAX_TOKENS = 77


def byte_symbols() -> list[str]:
    """GPT-2/CLIP's reversible byte -> printable unicode mapping (its 256 base symbols)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    symbols, extra = [], 0
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


def write_byte_level_tokenizer(folder: Path) -> CLIPTokenizer:
    """A CLIP BPE tokenizer with only byte-level tokens (no merges): any text tokenizes."""
    folder.mkdir(parents=True, exist_ok=True)
    symbols = byte_symbols()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(symbol, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": MAX_TOKENS,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
            }
        ),
        encoding="utf-8",
    )
    # transformers 5: constructing from files directly gives wrong ids; from_pretrained is right.
    return CLIPTokenizer.from_pretrained(folder)


def _unet(arch: Arch, in_channels: int, context: int, pooled: int) -> UNet2DConditionModel:
    """The shipped UNet config, shrunk; heads follow the shipped rule (1.x: 8 heads; 2.x/XL: 64 channels each)."""
    sizes: dict[str, Any] = {"in_channels": in_channels, "layers_per_block": 1, "sample_size": 8}
    if arch == "sd1":
        sizes |= {
            "block_out_channels": (32, 64),
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        }
    elif arch == "sd2":
        sizes |= {
            "block_out_channels": (64, 128),
            "attention_head_dim": (1, 2),
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        }
    else:
        sizes |= {
            "block_out_channels": (64, 128),
            "attention_head_dim": (1, 2),
            "transformer_layers_per_block": (1, 2),
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 6 * 8 + pooled,
        }
    return UNet2DConditionModel(**(shipped(arch, "unet") | sizes | {"cross_attention_dim": context}))


def _vae(arch: Arch) -> AutoencoderKL:
    # Four blocks: an 8x down-sampling VAE, the geometry of real Stable Diffusion.
    sizes = {"block_out_channels": (32, 32, 64, 64), "layers_per_block": 1, "sample_size": 64}
    return AutoencoderKL(**(shipped(arch, "vae") | sizes))


def _text_encoder(
    arch: Arch, component: str, tokenizer: CLIPTokenizer, hidden: int
) -> CLIPTextModel | CLIPTextModelWithProjection:
    sizes = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": 2,
        "num_attention_heads": max(1, hidden // 64),  # 64 channels per head, as in every real CLIP
        "max_position_embeddings": MAX_TOKENS,
        "projection_dim": hidden,
    }
    config = CLIPTextConfig(**(shipped(arch, component) | sizes))
    if component == "text_encoder_2":
        return CLIPTextModelWithProjection(config)
    return CLIPTextModel(config)


def _clip_tokenizer(arch: Arch, component: str) -> CLIPTokenizer:
    """The real CLIP vocabulary (49,408 tokens), as single-file checkpoints need."""
    folder = Path(_tmp_dir()) / component
    shutil.copytree(architectures_root() / arch / component, folder)
    for file in (architectures_root() / "clip-tokenizer").iterdir():
        shutil.copy(file, folder / file.name)
    return CLIPTokenizer.from_pretrained(folder)


def _safety_checker(always_flag: bool) -> StableDiffusionSafetyChecker:
    config = CLIPConfig(
        text_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        },
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    checker = StableDiffusionSafetyChecker(config)
    if always_flag:
        # Thresholds of -1 make every image score above every concept: every image is flagged.
        with torch.no_grad():
            checker.concept_embeds_weights.fill_(-1.0)
            checker.special_care_embeds_weights.fill_(-1.0)
    return checker


def build_tiny_pipeline(
    *,
    arch: Arch = "sd1",
    inpainting: bool = False,
    safety_checker: bool = True,
    always_flag: bool = False,
    clip_vocab: bool = False,
    seed: int = 0,
) -> Any:
    """A tiny pipeline of `arch`. SD 1.x uses a byte-level vocabulary unless `clip_vocab` (smaller and
    faster); 2.x and XL always use CLIP's. SDXL has no safety checker slot, as the real one."""
    torch.manual_seed(seed)
    in_channels = 9 if inpainting else 4
    scheduler = _scheduler(arch, inpainting)
    if arch == "sd1" and not clip_vocab:
        tokenizer = write_byte_level_tokenizer(Path(_tmp_dir()) / "tokenizer")
    else:
        tokenizer = _clip_tokenizer(arch, "tokenizer")
    if arch == "sdxl":
        # The two encoders differ in width, as in the real model (diffusers' single-file loader tells
        # them apart by width).
        tokenizer_2 = _clip_tokenizer(arch, "tokenizer_2")
        encoder = _text_encoder(arch, "text_encoder", tokenizer, 32)
        encoder_2 = _text_encoder(arch, "text_encoder_2", tokenizer_2, 64)
        return StableDiffusionXLPipeline(
            vae=_vae(arch),
            text_encoder=encoder,
            text_encoder_2=encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=_unet(arch, in_channels, context=32 + 64, pooled=64),
            scheduler=scheduler,
        )
    hidden = TEXT_HIDDEN if arch == "sd1" else 64
    checker = _safety_checker(always_flag) if safety_checker else None
    return StableDiffusionPipeline(
        vae=_vae(arch),
        text_encoder=_text_encoder(arch, "text_encoder", tokenizer, hidden),
        tokenizer=tokenizer,
        unet=_unet(arch, in_channels, context=hidden, pooled=0),
        scheduler=scheduler,
        safety_checker=checker,
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        requires_safety_checker=safety_checker,
    )


def _scheduler(arch: Arch, inpainting: bool) -> Any:
    """The shipped scheduler of `arch`; 2.x inpainting predicts epsilon, as the real one does."""
    path = architectures_root() / arch / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    overrides = {"prediction_type": "epsilon"} if arch == "sd2" and inpainting else {}
    return getattr(diffusers, config["_class_name"]).from_config(config, **overrides)


def _tmp_dir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="sdserver-tiny-")


# Every architecture a tiny model can have: SD 1.x/2.x/XL, and the SD3/FLUX layouts (with aliases).
TinyArch = Literal[
    "sd1",
    "sd2",
    "sdxl",
    "sd3",
    "sd3-medium",
    "sd3.5-medium",
    "sd3.5-large",
    "flux",
    "flux-dev",
    "flux-schnell",
    "flux-fill",
]
TINY_ARCHS: tuple[str, ...] = ("sd1", "sd2", "sdxl", *ALIASES, *FLOW_ARCHS)


class TinyOptions(TypedDict, total=False):
    arch: TinyArch
    inpainting: bool
    safety_checker: bool
    always_flag: bool
    clip_vocab: bool
    t5: bool
    seed: int


def make_tiny_model(folder: Path, **options: Unpack[TinyOptions]) -> Path:
    """Write the tiny model to `folder` (created) and return it. SD 1.x/2.x/XL: see build_tiny_pipeline
    for the options; SD3/FLUX (`arch` "sd3", "sd3.5-large", "flux-schnell"...): see
    tiny_flow.build_tiny_flow_pipeline (`t5`, `seed`)."""
    flow = resolve(options.get("arch", "sd1"))
    if flow is not None:
        return _make_tiny_flow_model(folder, flow, options)
    if "t5" in options:
        raise ValueError("t5 applies to SD3 and FLUX tiny models only")
    pipe = build_tiny_pipeline(**options)  # type: ignore[arg-type, misc]  # an SD 1.x/2.x/XL arch, by now
    inpainting, arch = options.get("inpainting", False), options.get("arch", "sd1")
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(folder, safe_serialization=True)
    if inpainting:
        # Mark it as the inpainting kind of folder, as hub inpainting models are.
        index_path = folder / "model_index.json"
        index = json.loads(index_path.read_text())
        index["_class_name"] = (
            "StableDiffusionXLInpaintPipeline" if arch == "sdxl" else "StableDiffusionInpaintPipeline"
        )
        index_path.write_text(json.dumps(index, indent=2))
    return folder


def _make_tiny_flow_model(folder: Path, arch: Any, options: TinyOptions) -> Path:
    unsupported = sorted(set(options) - {"arch", "t5", "seed"})
    if unsupported:
        raise ValueError(f"{', '.join(unsupported)} do not apply to a tiny {arch} model")
    pipe = build_tiny_flow_pipeline(arch, t5=options.get("t5", True), seed=options.get("seed", 0))
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(folder, safe_serialization=True)
    # transformers 5 saves its T5 tokenizer as "T5Tokenizer"; hub folders (and older versions) say Fast.
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    for name, value in index.items():
        if value == ["transformers", "T5Tokenizer"]:
            index[name] = ["transformers", "T5TokenizerFast"]
    index_path.write_text(json.dumps(index, indent=2))
    return folder
