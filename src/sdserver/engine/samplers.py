"""AUTOMATIC1111's sampler names → diffusers schedulers, built from the model's own scheduler config.

The names themselves (and their aliases) live in `core.types.SAMPLER_NAMES`, so validation needs no
torch; this module knows which diffusers class and options each name means. "DPM++ SDE" needs
`torchsde` and "LMS" needs `scipy` (both are dependencies of sdserver).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import diffusers


@dataclass(frozen=True)
class SamplerSpec:
    scheduler: str  # a diffusers scheduler class name
    options: dict[str, Any] = field(default_factory=dict)


_KARRAS = {"use_karras_sigmas": True}
SAMPLERS: dict[str, SamplerSpec] = {
    "Euler": SamplerSpec("EulerDiscreteScheduler"),
    "Euler a": SamplerSpec("EulerAncestralDiscreteScheduler"),
    "Heun": SamplerSpec("HeunDiscreteScheduler"),
    "DPM2": SamplerSpec("KDPM2DiscreteScheduler"),
    "DPM2 Karras": SamplerSpec("KDPM2DiscreteScheduler", _KARRAS),
    "DPM2 a": SamplerSpec("KDPM2AncestralDiscreteScheduler"),
    "DPM2 a Karras": SamplerSpec("KDPM2AncestralDiscreteScheduler", _KARRAS),
    "DPM++ 2M": SamplerSpec("DPMSolverMultistepScheduler"),
    "DPM++ 2M Karras": SamplerSpec("DPMSolverMultistepScheduler", _KARRAS),
    "DPM++ 2M SDE": SamplerSpec("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "DPM++ 2M SDE Karras": SamplerSpec("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", **_KARRAS}),
    "DPM++ SDE": SamplerSpec("DPMSolverSDEScheduler"),
    "DPM++ SDE Karras": SamplerSpec("DPMSolverSDEScheduler", _KARRAS),
    "LMS": SamplerSpec("LMSDiscreteScheduler"),
    "LMS Karras": SamplerSpec("LMSDiscreteScheduler", _KARRAS),
    "DDIM": SamplerSpec("DDIMScheduler"),
    "PNDM": SamplerSpec("PNDMScheduler"),
    "UniPC": SamplerSpec("UniPCMultistepScheduler"),
    "DEIS": SamplerSpec("DEISMultistepScheduler"),
    "LCM": SamplerSpec("LCMScheduler"),
}


def make_scheduler(name: str, config: Any) -> Any:
    """A fresh diffusers scheduler for sampler `name`, from a model's scheduler config."""
    spec = SAMPLERS[name]
    cls = getattr(diffusers, spec.scheduler)
    return cls.from_config(config, **spec.options)


def sampler_label(name: str | None, scheduler: Any) -> str:
    """The A1111 name to report: the requested one, else the name matching the model's own scheduler."""
    if name is not None:
        return name
    karras = bool(getattr(scheduler.config, "use_karras_sigmas", False))
    algorithm = getattr(scheduler.config, "algorithm_type", None)
    for label, spec in SAMPLERS.items():
        if spec.scheduler != type(scheduler).__name__:
            continue
        if bool(spec.options.get("use_karras_sigmas")) == karras and spec.options.get("algorithm_type") in (
            None,
            algorithm,
        ):
            return label
    return type(scheduler).__name__


@contextmanager
def using_sampler(pipe: Any, name: str | None) -> Iterator[None]:
    """Run `pipe` with sampler `name` (None: its own scheduler), then put its own scheduler back.

    Only the worker thread calls pipelines, so swapping the attribute for one call is safe; the
    model's pristine scheduler (and config) is never modified.
    """
    if name is None:
        yield
        return
    original = pipe.scheduler
    pipe.scheduler = make_scheduler(name, original.config)
    try:
        yield
    finally:
        pipe.scheduler = original
