"""Server-side caps on what one request may ask for (configurable in Settings as `limits`)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class Limits(BaseModel):
    max_images: int = Field(default=8, ge=1)
    max_steps: int = Field(default=150, ge=1)
    max_side: int = Field(default=2048, ge=8)
    max_pixels: int = Field(default=2048 * 2048, ge=64)
    max_prompt_chars: int = Field(default=4000, ge=1)
    max_guidance: float = Field(default=30.0, ge=0)
    max_loras: int = Field(default=8, ge=0)
    # An input image is read from its header first: past this many pixels it is refused undecoded.
    # It may be larger than an output (it is resized to the size generated), not without bound.
    max_input_pixels: int = Field(default=4096 * 4096, ge=64)
