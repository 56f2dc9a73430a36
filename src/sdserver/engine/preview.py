"""Cheap progress previews: latents → RGB by a fixed linear map, no VAE decode.

The factors are the widely used least-squares fit of Stable Diffusion 1.x/2.x latents to RGB; for
other latent spaces the colours are only approximate, which is fine for a preview.
"""

from __future__ import annotations

import torch
from PIL import Image

_SD_LATENT_RGB = torch.tensor(
    [
        [0.298, 0.207, 0.208],
        [0.187, 0.286, 0.173],
        [-0.158, 0.189, 0.264],
        [-0.184, -0.271, -0.473],
    ]
)


def latents_to_previews(latents: torch.Tensor) -> list[Image.Image]:
    """One small RGB image per latent in the batch, at latent resolution (1/8 of the image)."""
    latents = latents.detach().float().cpu()
    if latents.shape[1] != _SD_LATENT_RGB.shape[0]:
        latents = latents[:, : _SD_LATENT_RGB.shape[0]]
    rgb = torch.einsum("bchw,cr->bhwr", latents, _SD_LATENT_RGB)
    pixels = ((rgb + 1) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
    return [Image.fromarray(array, mode="RGB") for array in pixels]
