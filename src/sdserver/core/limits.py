"""Server-side caps on what one request may ask for (configurable in Settings as `limits`)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class Limits(BaseModel):
    max_images: int = Field(default=8, ge=1, description="Images per request at most")
    max_steps: int = Field(default=150, ge=1, description="Denoising steps per request at most")
    max_side: int = Field(default=2048, ge=8, description="Width or height in pixels at most")
    max_pixels: int = Field(default=2048 * 2048, ge=64, description="Width x height at most")
    max_prompt_chars: int = Field(default=4000, ge=1, description="Characters of a prompt (or negative prompt) at most")
    max_guidance: float = Field(default=30.0, ge=0, description="guidance_scale at most")
    max_loras: int = Field(default=8, ge=0, description="LoRAs per request at most")
    # An input image is read from its header first: past this many pixels it is refused undecoded.
    # It may be larger than an output (it is resized to the size generated), not without bound.
    max_input_pixels: int = Field(
        default=4096 * 4096, ge=64, description="Pixels of an input image at most (read from its header)"
    )
