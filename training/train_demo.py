#!/usr/bin/env python
"""Train the bundled ``demo`` Stable Diffusion model from scratch, on CPU, offline.

The model draws simple scenes: one coloured shape (circle, square or triangle)
on a plain coloured background, e.g. "a red circle on a blue background".

Everything is built from scratch (no downloads):

1. a synthetic dataset, generated on the fly (64x64 px, anti-aliased shapes);
2. an ``AutoencoderKL`` with real Stable Diffusion's 8x down geometry
   (64x64x3 px -> 8x8x4 latents);
3. a word-level ``CLIPTokenizer`` (written in CLIP's BPE file format) and a small
   ``CLIPTextModel``;
4. a ``UNet2DConditionModel`` trained on cached VAE latents (epsilon objective,
   min-SNR weighting, caption dropout for classifier-free guidance, EMA),
   jointly with the text encoder;
5. a standard diffusers folder (``model_index.json`` + components, safetensors),
   loadable with ``StableDiffusionPipeline.from_pretrained(out)``, including a
   tiny random ``StableDiffusionSafetyChecker`` (never flags) and a
   ``CLIPImageProcessor`` so the folder looks like a real SD model.

Usage (the bundled model was made with the defaults)::

    python training/train_demo.py --out src/sdserver/assets/demo

The functions are importable (``tests/training/test_train_demo.py`` runs a tiny
end-to-end training with them).
"""

from __future__ import annotations

import argparse
import bisect
import copy
import itertools
import json
import math
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------
# The synthetic world
# --------------------------------------------------------------------------

RESOLUTION = 64

# Six colours far apart in RGB, so that "nearest palette colour" is unambiguous.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOURS = list(PALETTE)
SHAPES = ["circle", "square", "triangle"]

# Half-size of a shape, in pixels at 64 px: shapes are 28..48 px wide.
MIN_HALF, MAX_HALF = 14.0, 24.0
MARGIN = 3.0  # keep shapes off the image border (the border shows the background)

_PALETTE_T = torch.tensor([PALETTE[c] for c in COLOURS], dtype=torch.float32) / 127.5 - 1.0


def caption(fg: int, shape: int, bg: int) -> str:
    return f"a {COLOURS[fg]} {SHAPES[shape]} on a {COLOURS[bg]} background"


# The sentence forms of the training captions, with their weights. The short forms are the ones
# people type first; a colour they leave out is whatever the scene has (uniformly random).
CAPTION_FORMS: list[tuple[str, float]] = [
    ("a {fg} {shape} on a {bg} background", 0.45),
    ("a {fg} {shape}", 0.15),
    ("{fg} {shape}", 0.10),
    ("a {shape} on a {bg} background", 0.15),
    ("{fg} {shape} on a {bg} background", 0.05),
    ("{shape} on a {bg} background", 0.05),
    ("a {shape}", 0.05),
]


def form_cdf(full_weight: float | None = None) -> list[float]:
    """The cumulative weights of CAPTION_FORMS; `full_weight` replaces the full form's weight (the
    fine-tuning stage lowers it so the short forms get more of the batch)."""
    weights = [w for _, w in CAPTION_FORMS]
    if full_weight is not None:
        weights[0] = full_weight
    return list(itertools.accumulate(weights))


_FORM_CDF = form_cdf()


def varied_caption(fg: int, shape: int, bg: int, u: float, cdf: list[float] = _FORM_CDF) -> str:
    """The caption of a scene in the form picked by `u` (uniform in [0, 1)) from CAPTION_FORMS."""
    index = min(bisect.bisect_right(cdf, u * cdf[-1]), len(CAPTION_FORMS) - 1)
    return CAPTION_FORMS[index][0].format(fg=COLOURS[fg], shape=SHAPES[shape], bg=COLOURS[bg])


@dataclass
class Batch:
    images: torch.Tensor  # (n, 3, H, W) in [-1, 1]
    fg: torch.Tensor  # (n,) colour index
    bg: torch.Tensor  # (n,) colour index
    shape: torch.Tensor  # (n,) shape index
    captions: list[str]


def shape_alpha(
    shape: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, r: torch.Tensor, size: int = RESOLUTION
) -> torch.Tensor:
    """Anti-aliased coverage (n, size, size) of each shape from a signed distance.

    circle: radius r; square: side 2r; triangle: apex up, base 2r, height 2r.
    All three have the same 2r x 2r bounding box centred on (cx, cy).
    """
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    x = coords.view(1, 1, size) - cx.view(-1, 1, 1)
    y = coords.view(1, size, 1) - cy.view(-1, 1, 1)
    r = r.view(-1, 1, 1)
    d_circle = torch.sqrt(x * x + y * y) - r
    d_square = torch.maximum(x.abs(), y.abs()) - r
    # triangle: apex (0, -r), base corners (+-r, r); sides have normal (2, -1)/sqrt5 (right)
    k = 1.0 / math.sqrt(5.0)
    d_right = (2 * x - y - r) * k
    d_left = (-2 * x - y - r) * k
    d_base = y - r
    d_tri = torch.maximum(torch.maximum(d_right, d_left), d_base)
    s = shape.view(-1, 1, 1)
    d = torch.where(s == 0, d_circle, torch.where(s == 1, d_square, d_tri))
    return (0.5 - d).clamp(0.0, 1.0)


def make_batch(n: int, gen: torch.Generator, size: int = RESOLUTION) -> Batch:
    """n random scenes (one shape on a plain background, fg colour != bg colour)."""
    nc = len(COLOURS)
    fg = torch.randint(0, nc, (n,), generator=gen)
    bg = (fg + torch.randint(1, nc, (n,), generator=gen)) % nc
    shape = torch.randint(0, len(SHAPES), (n,), generator=gen)
    scale = size / 64.0
    r = (MIN_HALF + (MAX_HALF - MIN_HALF) * torch.rand(n, generator=gen)) * scale
    lo = r + MARGIN * scale
    hi = size - lo
    cx = lo + (hi - lo) * torch.rand(n, generator=gen)
    cy = lo + (hi - lo) * torch.rand(n, generator=gen)
    a = shape_alpha(shape, cx, cy, r, size).unsqueeze(1)
    img = _PALETTE_T[fg].view(n, 3, 1, 1) * a + _PALETTE_T[bg].view(n, 3, 1, 1) * (1 - a)
    caps = [caption(int(f), int(s), int(b)) for f, s, b in zip(fg, shape, bg, strict=True)]
    return Batch(img.contiguous(), fg, bg, shape, caps)


# --------------------------------------------------------------------------
# Tokenizer: a word-level vocabulary written in CLIP's BPE format
# --------------------------------------------------------------------------

EXTRA_WORDS = [
    "a",
    "an",
    "the",
    "on",
    "of",
    "in",
    "with",
    "and",
    "background",
    "shape",
    "picture",
    "image",
    "photo",
    "drawing",
    "big",
    "small",
]
MAX_LENGTH = 16
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def write_tokenizer_files(out_dir: Path) -> None:
    """Write vocab.json + merges.txt so that every known word is ONE token.

    Base symbols: the 26 letters, with and without the end-of-word marker
    ("</w>"), so that unknown words still tokenize (into letters). Each word is
    then built by left-to-right merges. Gotcha: merge *rank* decides which pair
    merges first, so the merges of long words go first; otherwise e.g. the
    "r e" merge of "red" would fire inside "green" and "green" would never
    become one token. ``check_tokenizer`` verifies the result.
    """
    words = sorted(set(COLOURS + SHAPES + EXTRA_WORDS), key=lambda w: (-len(w), w))
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab: list[str] = letters + [c + "</w>" for c in letters]
    merges: list[tuple[str, str]] = []
    for w in words:
        pieces = [*list(w[:-1]), w[-1] + "</w>"]
        cur = pieces[0]
        for p in pieces[1:]:
            pair = (cur, p)
            cur = cur + p
            if pair not in merges:
                merges.append(pair)
            if cur not in vocab:
                vocab.append(cur)
    vocab += [BOS, EOS]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, indent=0))
    with open(out_dir / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    # tokenizer_config: the pipeline pads to model_max_length
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": MAX_LENGTH,
                "bos_token": BOS,
                "eos_token": EOS,
                "unk_token": EOS,
                "pad_token": EOS,
                "do_lower_case": True,
                "clean_up_tokenization_spaces": False,
            },
            indent=2,
        )
    )
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}, indent=2)
    )


def load_tokenizer(tok_dir: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(tok_dir))


def check_tokenizer(tok) -> None:
    """Every vocabulary word must be a single token; raise otherwise."""
    for w in COLOURS + SHAPES + EXTRA_WORDS:
        ids = tok(w, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise RuntimeError(f"tokenizer splits {w!r} into {tok.convert_ids_to_tokens(ids)}")
    ids = tok(caption(0, 0, 1), padding="max_length", max_length=MAX_LENGTH).input_ids
    if len(ids) != MAX_LENGTH:
        raise RuntimeError("caption does not fit in max length")


# --------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------


def build_vae(channels=(16, 32, 64, 64)):
    from diffusers import AutoencoderKL

    n = len(channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(channels),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=RESOLUTION,
    )


def build_text_encoder(tok, hidden: int = 64, layers: int = 2):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        hidden_act="quick_gelu",
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        projection_dim=hidden,
    )
    return CLIPTextModel(cfg)


def build_unet(channels=(64, 128), cross_dim: int = 64, layers_per_block: int = 1, text_time_embedding: bool = False):
    """UNet on 8x8x4 latents. With ``text_time_embedding`` the (attention-pooled) prompt is
    also added to the timestep embedding (``addition_embed_type="text"``), which conditions
    every ResNet block on the prompt, not only the cross-attention layers."""
    from diffusers import UNet2DConditionModel

    n = len(channels)
    extra = {}
    if text_time_embedding:
        extra = dict(addition_embed_type="text", addition_embed_type_num_heads=4)
    return UNet2DConditionModel(
        **extra,
        sample_size=RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * n,
        up_block_types=("CrossAttnUpBlock2D",) * n,
        block_out_channels=tuple(channels),
        layers_per_block=layers_per_block,
        cross_attention_dim=cross_dim,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def n_params(m) -> int:
    return sum(p.numel() for p in m.parameters())


# --------------------------------------------------------------------------
# Training helpers
# --------------------------------------------------------------------------


def lr_at(step: int, total: int, base: float, warmup: int = 100, final_frac: float = 0.05) -> float:
    """Linear warm-up, then cosine decay to final_frac * base."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * p)))


def _pbar(total: int, desc: str, disable: bool = False):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=disable, mininterval=2.0, file=sys.stdout)


def _deadline(minutes: float | None) -> float:
    return time.time() + minutes * 60 if minutes else float("inf")


def image_grad_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """MSE between finite-difference image gradients: rewards sharp, well placed edges."""
    dxa, dxb = a[..., :, 1:] - a[..., :, :-1], b[..., :, 1:] - b[..., :, :-1]
    dya, dyb = a[..., 1:, :] - a[..., :-1, :], b[..., 1:, :] - b[..., :-1, :]
    return F.mse_loss(dxa, dxb) + F.mse_loss(dya, dyb)


def train_vae(
    vae,
    steps: int,
    batch_size: int = 32,
    lr: float = 2e-3,
    kl_weight: float = 1e-6,
    grad_weight: float = 1.0,
    seed: int = 0,
    minutes: float | None = None,
    log_every: int = 50,
    quiet: bool = False,
) -> list[float]:
    """Train the autoencoder on fresh synthetic images. Returns the loss history."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    vae.train()
    hist, run = [], None
    end = _deadline(minutes)
    bar = _pbar(steps, "vae", quiet)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup=min(100, steps // 10 + 1))
        x = make_batch(batch_size, gen).images
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        mse = F.mse_loss(rec, x)
        kl = post.kl().mean()
        loss = mse + grad_weight * image_grad_loss(rec, x) + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        hist.append(mse.item())
        run = mse.item() if run is None else 0.98 * run + 0.02 * mse.item()
        bar.update(1)
        if step % log_every == 0 or step == steps - 1:
            bar.set_postfix(mse=f"{run:.4f}", kl=f"{kl.item():.0f}")
        if time.time() > end:
            print(f"vae: time limit reached after {step + 1} steps")
            break
    bar.close()
    vae.eval()
    return hist


@torch.no_grad()
def vae_recon_mse(vae, n: int = 256, seed: int = 12345) -> float:
    b = make_batch(n, torch.Generator().manual_seed(seed))
    rec = vae.decode(vae.encode(b.images).latent_dist.mean).sample
    return F.mse_loss(rec.clamp(-1, 1), b.images).item()


@dataclass
class LatentCache:
    mean: torch.Tensor  # (N, 4, h, w) posterior mean, unscaled
    std: torch.Tensor  # (N, 4, h, w) posterior std
    ids: torch.Tensor  # (N, MAX_LENGTH) token ids of the caption
    labels: torch.Tensor  # (N, 3) fg, shape, bg


@torch.no_grad()
def encode_dataset(
    vae,
    tok,
    n: int,
    seed: int,
    chunk: int = 256,
    quiet: bool = False,
    size: int = RESOLUTION,
    varied: bool = True,
    cdf: list[float] = _FORM_CDF,
) -> LatentCache:
    """Generate n scenes of `size` px and cache their VAE posteriors and caption token ids (each
    caption in a random form of CAPTION_FORMS, or all in the full form unless `varied`)."""
    gen = torch.Generator().manual_seed(seed)
    means, stds, ids, labels = [], [], [], []
    bar = _pbar(n, f"encode {size}px", quiet)
    done = 0
    while done < n:
        k = min(chunk, n - done)
        b = make_batch(k, gen, size=size)
        post = vae.encode(b.images).latent_dist
        means.append(post.mean)
        stds.append(post.std)
        captions = b.captions
        if varied:
            forms = torch.rand(k, generator=gen).tolist()
            captions = [
                varied_caption(int(f), int(s), int(g), u, cdf)
                for f, s, g, u in zip(b.fg, b.shape, b.bg, forms, strict=True)
            ]
        ids.append(
            tok(captions, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt").input_ids
        )
        labels.append(torch.stack([b.fg, b.shape, b.bg], 1))
        done += k
        bar.update(k)
    bar.close()
    return LatentCache(torch.cat(means), torch.cat(stds), torch.cat(ids), torch.cat(labels))


def make_scheduler(kind: str = "ddim", v_pred: bool = False):
    """The noise schedule used for training, and the sampler saved with the model.

    Default: exactly Stable Diffusion 1.x's schedule (scaled_linear betas
    0.00085..0.012, 1000 steps, epsilon objective), sampled with DDIM
    (``timestep_spacing="leading"``, ``steps_offset=1``, no clipping), so every
    diffusers scheduler that works with SD 1.5 works with this model.

    ``v_pred=True`` is the alternative that was also tried: v-prediction with the
    betas rescaled to zero terminal SNR (Lin et al. 2024) and trailing spacing.
    """
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    common = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        timestep_spacing="leading",
        steps_offset=1,
    )
    if v_pred:
        common.update(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing")
    if kind == "euler":
        return EulerDiscreteScheduler(**common)
    return DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **common)


class EMA:
    def __init__(self, modules, decay: float):
        self.decay = decay
        self.shadow = [copy.deepcopy(m).eval().requires_grad_(False) for m in modules]
        self.modules = modules
        self.n = 0

    @torch.no_grad()
    def update(self):
        self.n += 1
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        for s, m in zip(self.shadow, self.modules, strict=True):
            for ps, pm in zip(s.parameters(), m.parameters(), strict=True):
                ps.lerp_(pm, 1 - d)
            for bs, bm in zip(s.buffers(), m.buffers(), strict=True):
                bs.copy_(bm)


def train_unet(
    unet,
    text_encoder,
    cache: LatentCache,
    scaling_factor: float,
    steps: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    text_lr: float | None = None,
    uncond_prob: float = 0.1,
    snr_gamma: float = 5.0,
    ema_decay: float = 0.999,
    seed: int = 0,
    minutes: float | None = None,
    empty_ids: torch.Tensor | None = None,
    log_every: int = 25,
    quiet: bool = False,
    v_pred: bool = False,
    device: str = "cpu",
    cache_hi: LatentCache | None = None,
    hi_every: int = 0,
):
    """Train UNet + text encoder jointly. Returns (ema_unet, ema_text, losses).

    With ``cache_hi`` (scenes at a larger size), every ``hi_every``-th step trains on those, with a
    quarter of the batch (4x the latent cells per scene: about the same cost), so the model also draws
    one shape, not several, at that size.

    All random numbers come from one CPU generator seeded with ``seed`` (reproducible).
    """
    sched = make_scheduler(v_pred=v_pred)
    ac = sched.alphas_cumprod.float()
    alpha = ac.sqrt()
    sigma = (1 - ac).sqrt()
    snr = ac / (1 - ac).clamp_min(1e-8)
    # epsilon objective: min-SNR-gamma weighting (Hang et al. 2023). v objective: x0-space
    # weight min(snr, gamma) + 1 (min-SNR capped at the low-noise end; the high-noise steps,
    # where layout and colours are decided, keep weight 1).
    w_v = (snr.clamp(max=snr_gamma) + 1) / (snr + 1) if v_pred else snr.clamp(max=snr_gamma) / snr
    alpha, sigma, w_v = alpha.to(device), sigma.to(device), w_v.to(device)
    unet.to(device)
    text_encoder.to(device)

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    params = [
        {"params": list(unet.parameters()), "lr": lr},
        {"params": list(text_encoder.parameters()), "lr": text_lr or lr},
    ]
    opt = torch.optim.AdamW(params, weight_decay=0.01, betas=(0.9, 0.99))
    base = [g["lr"] for g in opt.param_groups]
    ema = EMA([unet, text_encoder], ema_decay)
    unet.train()
    text_encoder.train()
    losses, run = [], None
    end = _deadline(minutes)
    bar = _pbar(steps, "unet", quiet)
    for step in range(steps):
        for g, b0 in zip(opt.param_groups, base, strict=True):
            g["lr"] = lr_at(step, steps, b0, warmup=min(200, steps // 10 + 1))
        hi = cache_hi is not None and hi_every > 0 and step % hi_every == hi_every - 1
        data, bs = (cache_hi, max(1, batch_size // 4)) if hi else (cache, batch_size)
        idx = torch.randint(0, data.mean.shape[0], (bs,), generator=gen)
        z0 = data.mean[idx] + data.std[idx] * torch.randn(data.mean[idx].shape, generator=gen)
        z0 = z0 * scaling_factor
        ids = data.ids[idx].clone()
        if uncond_prob > 0 and empty_ids is not None:
            drop = torch.rand(bs, generator=gen) < uncond_prob
            ids[drop] = empty_ids
        t = torch.randint(0, 1000, (bs,), generator=gen)
        eps = torch.randn(z0.shape, generator=gen)
        z0, ids, t, eps = z0.to(device), ids.to(device), t.to(device), eps.to(device)
        a, s = alpha[t].view(-1, 1, 1, 1), sigma[t].view(-1, 1, 1, 1)
        zt = a * z0 + s * eps
        v = a * eps - s * z0 if v_pred else eps
        cond = text_encoder(ids)[0]
        pred = unet(zt, t, encoder_hidden_states=cond).sample
        per = ((pred - v) ** 2).mean(dim=(1, 2, 3))
        loss = (per * w_v[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        torch.nn.utils.clip_grad_norm_(text_encoder.parameters(), 1.0)
        opt.step()
        ema.update()
        losses.append(loss.item())
        run = loss.item() if run is None else 0.98 * run + 0.02 * loss.item()
        bar.update(1)
        if step % log_every == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{run:.4f}")
        if time.time() > end:
            print(f"unet: time limit reached after {step + 1} steps")
            break
    bar.close()
    unet.eval()
    text_encoder.eval()
    return ema.shadow[0], ema.shadow[1], losses


@torch.no_grad()
def measure_scaling_factor(vae, n: int = 1024, seed: int = 4321) -> float:
    """1 / std of latent samples, as SD does (0.18215 for SD 1.x)."""
    b = make_batch(n, torch.Generator().manual_seed(seed))
    post = vae.encode(b.images).latent_dist
    z = post.mean + post.std * torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(seed))
    return float(1.0 / z.std())


def build_safety_checker_and_processor():
    """A tiny StableDiffusionSafetyChecker that never flags, and its image processor.

    Concept and special-care embeddings are random unit-free vectors with
    threshold weights of 1.0: the check flags an image when cosine similarity
    exceeds the weight, which a cosine can never do, so nothing is ever flagged.
    (Setting ``concept_embeds_weights`` to -1 makes it flag everything.)
    """
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    cfg = CLIPConfig(
        text_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=1,
            num_attention_heads=4,
            vocab_size=100,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=1,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
            num_channels=3,
        ),
        projection_dim=32,
    )
    checker = StableDiffusionSafetyChecker(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        checker.concept_embeds.copy_(torch.randn(checker.concept_embeds.shape, generator=g))
        checker.special_care_embeds.copy_(torch.randn(checker.special_care_embeds.shape, generator=g))
        checker.concept_embeds_weights.fill_(1.0)
        checker.special_care_embeds_weights.fill_(1.0)
    proc = CLIPImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        do_center_crop=True,
        do_resize=True,
        do_normalize=True,
    )
    return checker, proc


def save_pipeline(out: Path, unet, vae, text_encoder, tok, scheduler, fp16: bool = True) -> None:
    """Write a standard diffusers folder (safetensors).

    With ``fp16`` the UNet and VAE weights are stored in float16 (half the size);
    diffusers loads them as float32 unless asked otherwise. The transformers
    components (text encoder, safety checker) stay float32, because transformers
    would load them in the stored dtype.
    """
    import warnings

    from diffusers import StableDiffusionPipeline

    checker, proc = build_safety_checker_and_processor()
    if fp16:
        unet, vae = copy.deepcopy(unet).to(torch.float16), copy.deepcopy(vae).to(torch.float16)
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder.float(),
        tokenizer=tok,
        scheduler=scheduler,
        safety_checker=checker,
        feature_extractor=proc,
        requires_safety_checker=True,
    )
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.save_pretrained(str(out), safe_serialization=True)
    # The tokenizer in CLIP's own file format (vocab.json + merges.txt), as SD checkpoints ship it.
    shutil.rmtree(out / "tokenizer")
    write_tokenizer_files(out / "tokenizer")
    _tidy_configs(out)


def _tidy_configs(out: Path) -> None:
    """Make the saved configs read like a real SD model's and add sdserver's defaults."""
    # Without torchvision transformers substitutes CLIPImageProcessorPil; record the generic class
    # (it loads either way) so the folder reads like a real SD model.
    mi = json.loads((out / "model_index.json").read_text())
    mi["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
    (out / "model_index.json").write_text(json.dumps(mi, indent=2) + "\n")
    pc = out / "feature_extractor" / "preprocessor_config.json"
    cfg = json.loads(pc.read_text())
    cfg["image_processor_type"] = "CLIPImageProcessor"
    pc.write_text(json.dumps(cfg, indent=2) + "\n")
    # A fine-tuned model's configs would record the folder it came from (a path on the trainer's machine).
    for sub in ("unet", "vae"):
        model_cfg = out / sub / "config.json"
        cfg = json.loads(model_cfg.read_text())
        if cfg.pop("_name_or_path", None) is not None:
            model_cfg.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    # sdserver reads a model folder's own defaults from here (other servers ignore the file).
    (out / "sdserver.json").write_text(json.dumps(SDSERVER_DEFAULTS, indent=2) + "\n")


# What this model is best sampled with (docs/demo-model.md): sdserver's defaults for it.
SDSERVER_DEFAULTS = {"default_steps": 20}


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="output diffusers folder (replaced)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared 2-core machine, 2 threads stall "
        "badly whenever another process takes a core; 2 is ~1.6x faster on an idle machine)",
    )
    ap.add_argument("--vae-steps", type=int, default=1000)
    ap.add_argument("--vae-batch", type=int, default=32)
    ap.add_argument("--vae-lr", type=float, default=2e-3)
    ap.add_argument(
        "--vae-minutes",
        type=float,
        default=20.0,
        help="wall-clock safety cap for the VAE stage (0 = none); a run that hits it is no longer exactly reproducible",
    )
    ap.add_argument(
        "--vae-from",
        type=Path,
        default=None,
        help="take the VAE of this model folder instead of training one (the bundled demo's VAE is this "
        "script's VAE stage with the defaults: reusing it saves that stage)",
    )
    ap.add_argument(
        "--vae-channels",
        default="16,32,64,64",
        help="AutoencoderKL block_out_channels; 4 blocks = 8x down (SD geometry), 3 = 4x",
    )
    ap.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="fine-tune the UNet and text encoder of this model folder instead of new ones (the short "
        "caption forms, e.g. with a lower --full-form-weight)",
    )
    ap.add_argument(
        "--full-form-weight",
        type=float,
        default=None,
        help=f"the weight of the full caption form among CAPTION_FORMS (default {CAPTION_FORMS[0][1]})",
    )
    ap.add_argument(
        "--measure-scenes",
        type=int,
        default=1024,
        help="scenes that measure the VAE's scaling factor (a quarter of them: its held-out reconstruction error)",
    )
    ap.add_argument("--cache-size", type=int, default=30000, help="scenes encoded once for UNet training")
    ap.add_argument(
        "--hi-size", type=int, default=128, help="a second scene size (px) the UNet also trains on (0 = none)"
    )
    ap.add_argument("--hi-cache-size", type=int, default=8000, help="scenes of --hi-size encoded once")
    ap.add_argument(
        "--hi-every", type=int, default=3, help="every n-th UNet step trains on --hi-size scenes (batch / 4)"
    )
    ap.add_argument("--unet-steps", type=int, default=2000)
    ap.add_argument("--unet-batch", type=int, default=128)
    ap.add_argument("--unet-lr", type=float, default=1e-3)
    ap.add_argument(
        "--unet-minutes",
        type=float,
        default=120.0,
        help="wall-clock safety cap for the UNet stage (0 = none); a run that hits it "
        "is no longer exactly reproducible",
    )
    ap.add_argument("--unet-channels", default="64,128")
    ap.add_argument("--unet-layers", type=int, default=1, help="layers per UNet block")
    ap.add_argument(
        "--text-time",
        action="store_true",
        help="also add the pooled prompt to the timestep embedding (addition_embed_type='text')",
    )
    ap.add_argument(
        "--v-pred",
        action="store_true",
        help="v-prediction with a zero-terminal-SNR schedule instead of SD 1.x's epsilon schedule",
    )
    ap.add_argument("--text-hidden", type=int, default=64)
    ap.add_argument("--text-layers", type=int, default=2)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--fp32", action="store_true", help="save fp32 weights (default fp16, loads as fp32)")
    ap.add_argument(
        "--eval-seeds",
        type=int,
        default=0,
        help="after saving, measure prompt adherence over this many seeds per prompt",
    )
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap.parse_args(argv)


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(","))


def text_encoder_and_unet(args, tok):
    """New ones, or with --init-from a trained folder's (its architecture options win over the flags)."""
    if not args.init_from:
        text_encoder = build_text_encoder(tok, args.text_hidden, args.text_layers)
        return text_encoder, build_unet(_ints(args.unet_channels), args.text_hidden, args.unet_layers, args.text_time)
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = str(args.init_from)
    print(f"unet and text encoder: fine-tuning {folder}")
    return (
        CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=torch.float32),
        UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch.float32),
    )


def run(args) -> dict:
    """Full pipeline; returns a summary dict (losses, timings, sizes)."""
    import warnings

    warnings.filterwarnings("ignore", message=".*torchvision.*")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    t0 = time.time()
    summary: dict = {"args": {k: str(v) for k, v in vars(args).items()}}

    with tempfile.TemporaryDirectory() as td:
        write_tokenizer_files(Path(td))
        tok = load_tokenizer(Path(td))
    check_tokenizer(tok)
    print(f"tokenizer: {len(tok)} tokens, max length {tok.model_max_length}")

    # 1. autoencoder
    t = time.time()
    if args.vae_from:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(str(args.vae_from), subfolder="vae", torch_dtype=torch.float32).eval()
        vae_hist: list[float] = []
        print(f"vae: taken from {args.vae_from}")
    else:
        vae = build_vae(_ints(args.vae_channels))
        print(f"vae: {n_params(vae) / 1e6:.2f}M params, {2 ** (len(_ints(args.vae_channels)) - 1)}x down")
        vae_hist = train_vae(
            vae, args.vae_steps, args.vae_batch, args.vae_lr, seed=args.seed, minutes=args.vae_minutes, quiet=args.quiet
        )
    vae.requires_grad_(False)
    summary["vae_minutes"] = (time.time() - t) / 60
    summary["vae_recon_mse"] = vae_recon_mse(vae, n=max(1, args.measure_scenes // 4))
    sf = float(vae.config.scaling_factor) if args.vae_from else measure_scaling_factor(vae, n=args.measure_scenes)
    vae.register_to_config(scaling_factor=sf)
    summary["scaling_factor"] = sf
    if vae_hist:
        summary["vae_loss_first_last"] = (float(np.mean(vae_hist[:20])), float(np.mean(vae_hist[-20:])))
    print(
        f"vae: {len(vae_hist)} steps in {summary['vae_minutes']:.1f} min, held-out recon MSE "
        f"{summary['vae_recon_mse']:.4f}, scaling_factor {sf:.4f}",
        flush=True,
    )

    # 2. latents
    t = time.time()
    cdf = form_cdf(args.full_form_weight)
    cache = encode_dataset(vae, tok, args.cache_size, seed=args.seed + 1, quiet=args.quiet, cdf=cdf)
    cache_hi = None
    if args.hi_size and args.hi_cache_size:
        cache_hi = encode_dataset(
            vae, tok, args.hi_cache_size, seed=args.seed + 3, quiet=args.quiet, size=args.hi_size, cdf=cdf
        )
    print(f"encoded {args.cache_size} + {args.hi_cache_size} scenes in {time.time() - t:.0f} s", flush=True)

    # 3. text encoder + UNet
    text_encoder, unet = text_encoder_and_unet(args, tok)
    print(f"text encoder: {n_params(text_encoder) / 1e6:.2f}M params; unet: {n_params(unet) / 1e6:.2f}M params")
    empty_ids = tok("", padding="max_length", max_length=MAX_LENGTH, return_tensors="pt").input_ids[0]
    t = time.time()
    ema_unet, ema_text, losses = train_unet(
        unet,
        text_encoder,
        cache,
        sf,
        args.unet_steps,
        args.unet_batch,
        args.unet_lr,
        ema_decay=args.ema,
        seed=args.seed + 2,
        minutes=args.unet_minutes,
        empty_ids=empty_ids,
        quiet=args.quiet,
        v_pred=args.v_pred,
        cache_hi=cache_hi,
        hi_every=args.hi_every,
    )
    summary["unet_minutes"] = (time.time() - t) / 60
    k = max(1, min(50, len(losses) // 5))
    summary["unet_loss_first_last"] = (float(np.mean(losses[:k])), float(np.mean(losses[-k:])))
    print(
        f"unet: {len(losses)} steps in {summary['unet_minutes']:.1f} min, loss "
        f"{summary['unet_loss_first_last'][0]:.4f} -> {summary['unet_loss_first_last'][1]:.4f}",
        flush=True,
    )

    # 4. save
    with tempfile.TemporaryDirectory() as td:
        write_tokenizer_files(Path(td))
        tok = load_tokenizer(Path(td))
        save_pipeline(args.out, ema_unet, vae, ema_text, tok, make_scheduler(v_pred=args.v_pred), fp16=not args.fp32)
    summary["size_bytes"] = folder_size(args.out)
    summary["total_minutes"] = (time.time() - t0) / 60
    print(
        f"saved {args.out} ({summary['size_bytes'] / 1e6:.1f} MB); total {summary['total_minutes']:.1f} min", flush=True
    )
    summary["vae_losses"] = vae_hist
    summary["unet_losses"] = losses

    if args.eval_seeds:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from diffusers import StableDiffusionPipeline
        from eval_demo import evaluate_pipeline

        pipe = StableDiffusionPipeline.from_pretrained(str(args.out))
        pipe.set_progress_bar_config(disable=True)
        summary["eval"] = evaluate_pipeline(pipe, n_seeds=args.eval_seeds)
    return summary


def main(argv=None):
    args = parse_args(argv)
    run(args)


if __name__ == "__main__":
    main()
