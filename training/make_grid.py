#!/usr/bin/env python
"""Draw a grid of demo-model samples: rows = prompts, columns = seeds.

python training/make_grid.py --model src/sdserver/assets/demo --out docs/demo-grid.png
python training/make_grid.py --size 128 --scale 1 --out docs/demo-grid-128.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

PROMPTS = [
    "a red circle on a blue background",
    "a yellow square on a black background",
    "a white triangle on a green background",
    "a blue triangle on a yellow background",
    "a green circle on a white background",
    "a black square on a red background",
    "a red triangle on a white background",
    "a yellow circle on a green background",
    "a red circle",
    "yellow square",
    "a triangle on a blue background",
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "src/sdserver/assets/demo"))
    ap.add_argument("--out", default=str(ROOT / "docs/demo-grid.png"))
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--size", type=int, default=64, help="image size in px (64: native; 128 also trained)")
    ap.add_argument("--scale", type=int, default=2, help="nearest-neighbour upscale of each cell")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import torch
    from diffusers import StableDiffusionPipeline
    from PIL import Image, ImageDraw

    torch.set_num_threads(args.threads)
    pipe = StableDiffusionPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for p in PROMPTS:
        gens = [torch.Generator().manual_seed(s) for s in range(args.seeds)]
        out = pipe(
            [p] * args.seeds,
            generator=gens,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            output_type="np",
            width=args.size,
            height=args.size,
        )
        rows.append([(im * 255).round().clip(0, 255).astype(np.uint8) for im in out.images])

    cell = args.size * args.scale
    pad = 4
    label_w = 300
    head_h = 22
    w = label_w + args.seeds * (cell + pad) + pad
    h = head_h + len(PROMPTS) * (cell + pad) + pad
    grid = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for j in range(args.seeds):
        draw.text((label_w + pad + j * (cell + pad) + cell // 2 - 20, 5), f"seed {j}", fill=(0, 0, 0))
    for i, (p, ims) in enumerate(zip(PROMPTS, rows, strict=True)):
        y = head_h + pad + i * (cell + pad)
        draw.text((6, y + cell // 2 - 6), p, fill=(0, 0, 0))
        for j, im in enumerate(ims):
            tile = Image.fromarray(im).resize((cell, cell), Image.NEAREST)
            grid.paste(tile, (label_w + pad + j * (cell + pad), y))
    foot = (
        f"{args.steps} steps, guidance {args.guidance}, {type(pipe.scheduler).__name__}, "
        f"{args.size}x{args.size} px (shown x{args.scale})"
    )
    canvas = Image.new("RGB", (w, h + 20), (255, 255, 255))
    canvas.paste(grid, (0, 0))
    ImageDraw.Draw(canvas).text((6, h + 3), foot, fill=(80, 80, 80))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(args.out, optimize=True)
    print(f"wrote {args.out} ({canvas.size[0]}x{canvas.size[1]})")


if __name__ == "__main__":
    main()
