"""Build a tiny, random-weight Stable Diffusion model in diffusers format, fully offline.

It is the same kind of folder as a user's fine-tuned model (model_index.json, unet, vae,
text_encoder, tokenizer, scheduler, safety_checker, feature_extractor), only a few MB, so tests
and offline demos exercise the real loading and pipeline code. It draws noise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from transformers import CLIPConfig, CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

TEXT_HIDDEN = 32
MAX_TOKENS = 77


def _byte_symbols() -> list[str]:
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


def _write_byte_level_tokenizer(folder: Path) -> CLIPTokenizer:
    """A CLIP BPE tokenizer with only byte-level tokens (no merges): any text tokenizes."""
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
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


def _unet(in_channels: int) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def _vae() -> AutoencoderKL:
    # Four blocks: an 8x down-sampling VAE, the geometry of real Stable Diffusion.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=64,
    )


def _text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


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
    *, inpainting: bool = False, safety_checker: bool = True, always_flag: bool = False, seed: int = 0
) -> StableDiffusionPipeline:
    torch.manual_seed(seed)
    tokenizer_dir = Path(_tmp_dir()) / "tokenizer"
    tokenizer = _write_byte_level_tokenizer(tokenizer_dir)
    checker = _safety_checker(always_flag) if safety_checker else None
    return StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=_text_encoder(tokenizer),
        tokenizer=tokenizer,
        unet=_unet(9 if inpainting else 4),
        scheduler=PNDMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            num_train_timesteps=1000,
            skip_prk_steps=True,
            steps_offset=1,
            set_alpha_to_one=False,
        ),
        safety_checker=checker,
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        requires_safety_checker=safety_checker,
    )


def _tmp_dir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="sdserver-tiny-")


def make_tiny_model(
    folder: Path,
    *,
    inpainting: bool = False,
    safety_checker: bool = True,
    always_flag: bool = False,
    seed: int = 0,
) -> Path:
    """Write the tiny model to `folder` (created) and return it."""
    pipe: Any = build_tiny_pipeline(
        inpainting=inpainting, safety_checker=safety_checker, always_flag=always_flag, seed=seed
    )
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(folder, safe_serialization=True)
    if inpainting:
        # Mark it as the inpainting kind of folder, as hub inpainting models are.
        index_path = folder / "model_index.json"
        index = json.loads(index_path.read_text())
        index["_class_name"] = "StableDiffusionInpaintPipeline"
        index_path.write_text(json.dumps(index, indent=2))
    return folder
