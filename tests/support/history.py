"""Generated images as the engine hands them over (parameters attached), without running a model."""

from __future__ import annotations

from PIL import Image

from sdserver import metadata
from sdserver.core.types import GeneratedImage, GenerationRequest


def generated(prompt: str = "a red circle", seed: int = 1, model: str = "tiny", size: int = 16) -> GeneratedImage:
    request = GenerationRequest(prompt=prompt, seed=seed, steps=3)
    image = Image.new("RGB", (size, size), (seed % 256, 40, 90))
    params = metadata.parameters_for(
        request, seed=seed, width=size, height=size, model=model, model_hash="abc", sampler="DDIM"
    )
    metadata.attach(image, params)
    return GeneratedImage(image=image, seed=seed, nsfw=False)
