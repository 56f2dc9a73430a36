"""The content safety checker, run by us after generation rather than inside each pipeline.

SDXL pipelines have no checker slot, and a model without a checker of its own may borrow the base
model's, so the checker lives beside the pipelines and runs once per batch for every architecture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image


@dataclass
class SafetyChecker:
    model: Any  # diffusers' StableDiffusionSafetyChecker
    feature_extractor: Any  # transformers' CLIPImageProcessor

    @classmethod
    def of(cls, pipe: Any) -> SafetyChecker | None:
        """The pipeline's own checker, if it has one."""
        model = getattr(pipe, "safety_checker", None)
        extractor = getattr(pipe, "feature_extractor", None)
        return cls(model, extractor) if model is not None and extractor is not None else None

    def check(self, images: list[Image.Image]) -> tuple[list[Image.Image], list[bool]]:
        """(images with flagged ones blacked out, one flag per image)."""
        parameter = next(self.model.parameters())
        inputs = self.feature_extractor(images, return_tensors="pt").pixel_values
        pixels = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0 for image in images])
        with torch.no_grad():
            _, flags = self.model(images=pixels, clip_input=inputs.to(parameter.device, parameter.dtype))
        flags = [bool(flag) for flag in flags]
        checked = [Image.new("RGB", image.size) if flag else image for image, flag in zip(images, flags, strict=True)]
        return checked, flags
