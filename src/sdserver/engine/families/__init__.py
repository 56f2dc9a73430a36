"""Model families as plug-ins: one module each, looked up here instead of compared as strings.

Adding a family means one module that defines a `Family` subclass and a module-level `FAMILY`, plus
its assets (architecture configs for single files), and its name in `_MODULES` below.
"""

from __future__ import annotations

import importlib
from functools import cache
from typing import Any

from sdserver.engine.families.base import Conditioning, Family, Options, State, denoise

# Detection order for single files: the flow families claim their files by distinctive keys first; SD's
# detection, which names what any other checkpoint is, comes last.
_MODULES = ("sd3", "flux", "sd", "sdxl")


@cache
def all_families() -> tuple[Family, ...]:
    found = []
    for module in _MODULES:
        found.append(importlib.import_module(f"{__name__}.{module}").FAMILY)
    return tuple(found)


def for_pipeline_class(class_name: str) -> Family | None:
    """The family serving diffusers pipeline class `class_name` (from model_index.json), if any."""
    return next((family for family in all_families() if class_name in family.pipeline_classes), None)


def for_pipeline(pipe: Any) -> Family | None:
    return for_pipeline_class(type(pipe).__name__)


def for_kind(kind: str) -> Family | None:
    return next((family for family in all_families() if kind in family.kinds), None)


def served_names() -> str:
    """A human list of what we serve, for refusals."""
    return "Stable Diffusion 1.x, 2.x, XL, 3/3.5 and FLUX.1"


__all__ = [
    "Conditioning",
    "Family",
    "Options",
    "State",
    "all_families",
    "denoise",
    "for_kind",
    "for_pipeline",
    "for_pipeline_class",
    "served_names",
]
