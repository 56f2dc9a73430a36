#!/usr/bin/env python
"""Measure how well a demo model follows its prompts (colours and shapes).

Pixel statistics only (the same ones as ``tests/demo/test_demo_model.py``):

* every pixel is mapped to its nearest palette colour;
* background = most frequent palette colour of the 2-px image border;
* foreground = most frequent palette colour among the other pixels;
* shape: each pixel gets a coverage ``alpha`` by projecting its RGB onto the
  background->foreground colour segment (blur-robust; exact for anti-aliased
  edges); the mask ``alpha > 0.5`` is compared (IoU) with the ideal circle,
  square and triangle of the same area and centroid (plus a small local
  search over position and size); the best-fitting ideal shape wins.

Usage::

    python training/eval_demo.py --model src/sdserver/assets/demo --seeds 20
    python training/eval_demo.py --short             # "a red circle", "a circle on a blue background"...
    python training/eval_demo.py --size 128          # one clean shape at 128 px, not tiles
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_demo import COLOURS, PALETTE, SHAPES

PAL = np.array([PALETTE[c] for c in COLOURS], dtype=np.float32)


def nearest_palette(img: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) palette index."""
    d = ((img.astype(np.float32)[:, :, None, :] - PAL[None, None]) ** 2).sum(-1)
    return d.argmin(-1)


def ideal_mask(shape: str, cx: float, cy: float, r: float, h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    x = x - cx
    y = y - cy
    if shape == "circle":
        return x * x + y * y <= r * r
    if shape == "square":
        return np.maximum(np.abs(x), np.abs(y)) <= r
    # apex up triangle, base 2r, height 2r
    return (y <= r) & (2 * np.abs(x) <= y + r)


def classify_shape(mask: np.ndarray) -> tuple[str, dict[str, float]]:
    """Best-fitting ideal shape (by IoU) for a boolean mask."""
    h, w = mask.shape
    area = float(mask.sum())
    scores = {}
    if area < 4:
        return "none", {s: 0.0 for s in SHAPES}
    ys, xs = np.nonzero(mask)
    mx, my = xs.mean() + 0.5, ys.mean() + 0.5
    for shape in SHAPES:
        if shape == "circle":
            r0, cx0, cy0 = math.sqrt(area / math.pi), mx, my
        elif shape == "square":
            r0, cx0, cy0 = math.sqrt(area) / 2, mx, my
        else:
            r0 = math.sqrt(area / 2)
            cx0, cy0 = mx, my - r0 / 3
        best = 0.0
        for dr in (-1.0, 0.0, 1.0):
            for dx in (-1.0, 0.0, 1.0):
                for dy in (-1.0, 0.0, 1.0):
                    m = ideal_mask(shape, cx0 + dx, cy0 + dy, r0 + dr, h, w)
                    inter = float((m & mask).sum())
                    union = float((m | mask).sum())
                    best = max(best, inter / union if union else 0.0)
        scores[shape] = best
    return max(scores, key=scores.get), scores


def analyse(img: np.ndarray) -> dict:
    """Background colour, foreground colour and shape of an (H, W, 3) uint8 image."""
    _h, _w, _ = img.shape
    lab = nearest_palette(img)
    border = np.concatenate([lab[:2].ravel(), lab[-2:].ravel(), lab[:, :2].ravel(), lab[:, -2:].ravel()])
    bg = int(np.bincount(border, minlength=len(COLOURS)).argmax())
    counts = np.bincount(lab.ravel(), minlength=len(COLOURS))
    counts[bg] = 0
    fg = int(counts.argmax()) if counts.sum() > 0 else -1
    shape = "none"
    if fg >= 0:
        b, f = PAL[bg], PAL[fg]
        v = f - b
        alpha = ((img.astype(np.float32) - b) @ v) / float(v @ v)
        shape, _ = classify_shape(alpha > 0.5)
    return {"bg": COLOURS[bg], "fg": COLOURS[fg] if fg >= 0 else "none", "shape": shape}


def components(img: np.ndarray, min_pixels: int = 8) -> int:
    """Separate foreground blobs (8-connected, at least `min_pixels` px): 1 = one shape, more = tiles."""
    from scipy import ndimage

    found = analyse(img)
    if found["fg"] == "none":
        return 0
    b, f = PAL[COLOURS.index(found["bg"])], PAL[COLOURS.index(found["fg"])]
    v = f - b
    alpha = ((img.astype(np.float32) - b) @ v) / float(v @ v)
    labels, _ = ndimage.label(alpha > 0.5, structure=np.ones((3, 3)))
    return int((np.bincount(labels.ravel())[1:] >= min_pixels).sum())


def adherence(images: list[np.ndarray], fg: str | None, shape: str, bg: str | None) -> dict[str, float]:
    """Fractions right; a colour the prompt leaves out (None) counts as right whatever it is."""
    res = [analyse(im) for im in images]
    n = len(res)
    return {
        "bg": sum(bg is None or r["bg"] == bg for r in res) / n,
        "fg": sum(fg is None or r["fg"] == fg for r in res) / n,
        "shape": sum(r["shape"] == shape for r in res) / n,
        "one": sum(components(im) == 1 for im in images) / n,
    }


DEFAULT_PROMPTS = [
    ("red", "circle", "blue"),
    ("yellow", "square", "black"),
    ("white", "triangle", "green"),
    ("blue", "triangle", "yellow"),
    ("green", "circle", "white"),
    ("black", "square", "red"),
]
# The short forms people type first; None: the prompt names no such colour (any is right).
SHORT_PROMPTS = [
    ("a red circle", "red", "circle", None),
    ("red circle", "red", "circle", None),
    ("a circle on a blue background", None, "circle", "blue"),
    ("a yellow square", "yellow", "square", None),
    ("white triangle", "white", "triangle", None),
    ("a triangle on a black background", None, "triangle", "black"),
]


def full_prompts(combos=DEFAULT_PROMPTS) -> list[tuple[str, str | None, str, str | None]]:
    return [(f"a {fg} {shape} on a {bg} background", fg, shape, bg) for fg, shape, bg in combos]


def run_pipeline(pipe, prompt: str, seeds: list[int], steps: int, guidance: float, size: int = 64) -> list[np.ndarray]:
    import torch

    gens = [torch.Generator().manual_seed(s) for s in seeds]
    out = pipe(
        [prompt] * len(seeds),
        generator=gens,
        num_inference_steps=steps,
        guidance_scale=guidance,
        output_type="np",
        width=size,
        height=size,
    )
    return [(im * 255).round().clip(0, 255).astype(np.uint8) for im in out.images]


def evaluate_pipeline(
    pipe,
    prompts=None,
    n_seeds: int = 20,
    steps: int = 20,
    guidance: float = 4.0,
    verbose: bool = True,
    size: int = 64,
) -> dict:
    """Adherence per prompt: `prompts` are (prompt, fg, shape, bg) (default: the six full-form prompts)."""
    table = {}
    for p, fg, shape, bg in prompts or full_prompts():
        ims = run_pipeline(pipe, p, list(range(n_seeds)), steps, guidance, size)
        table[p] = adherence(ims, fg, shape, bg)
        if fg is None or bg is None:  # the colour left out should vary
            key = "fg" if fg is None else "bg"
            table[p][f"{key}_colours"] = len({analyse(im)[key] for im in ims})
        if verbose:
            a = table[p]
            extra = "".join(f" {k} {v}" for k, v in a.items() if k.endswith("_colours"))
            print(
                f"  {p:45s} bg {a['bg']:.0%} fg {a['fg']:.0%} shape {a['shape']:.0%} one shape {a['one']:.0%}{extra}",
                flush=True,
            )
    overall = {k: float(np.mean([v[k] for v in table.values()])) for k in ("bg", "fg", "shape", "one")}
    if verbose:
        print(
            f"  overall: bg {overall['bg']:.1%} fg {overall['fg']:.1%} shape {overall['shape']:.1%} "
            f"one shape {overall['one']:.1%}"
        )
    return {"per_prompt": table, "overall": overall}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "src/sdserver/assets/demo"))
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, nargs="+", default=[4.0])
    ap.add_argument("--scheduler", default=None, help="override: ddim, euler, dpm")
    ap.add_argument("--all-prompts", action="store_true", help="all 90 colour/shape/background combinations")
    ap.add_argument("--short", action="store_true", help="the short prompt forms (a red circle, ...)")
    ap.add_argument("--size", type=int, default=64, help="image size in px (the demo is trained at 64 and 128)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    import torch
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(args.threads)
    pipe = StableDiffusionPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    if args.scheduler:
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

        cls = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpm": DPMSolverMultistepScheduler}
        pipe.scheduler = cls[args.scheduler].from_config(pipe.scheduler.config)
    prompts = full_prompts()
    if args.all_prompts:
        prompts = full_prompts([(f, s, b) for f in COLOURS for s in SHAPES for b in COLOURS if f != b])
    if args.short:
        prompts = SHORT_PROMPTS
    for g in args.guidance:
        t = time.time()
        print(f"guidance {g}, {args.steps} steps, {args.size} px, {type(pipe.scheduler).__name__}:")
        evaluate_pipeline(pipe, prompts, args.seeds, args.steps, g, size=args.size)
        print(f"  ({time.time() - t:.1f} s)")


if __name__ == "__main__":
    main()
