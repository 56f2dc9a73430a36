"""AUTOMATIC1111's sampler names → diffusers schedulers, built from the model's own scheduler config.

The names themselves (and their aliases) live in `core.types.SAMPLER_NAMES`, so validation needs no
torch; this module knows which diffusers class and options each name means. "DPM++ SDE" needs
`torchsde` and "LMS" needs `scipy` (both are dependencies of sdserver).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import diffusers


@dataclass(frozen=True)
class SamplerSpec:
    scheduler: str  # a diffusers scheduler class name
    options: dict[str, Any] = field(default_factory=dict)
    flow: bool = False  # a multistep solver run on a flow-matching model's sigmas (SD3, FLUX)


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


# Flow-matching families (SD3, FLUX): their own Euler, and the solvers diffusers runs on flow sigmas.
FLOW_SAMPLERS: dict[str, SamplerSpec] = {
    "Euler": SamplerSpec("FlowMatchEulerDiscreteScheduler"),
    "Euler a": SamplerSpec("FlowMatchEulerDiscreteScheduler", {"stochastic_sampling": True}),
    "DPM++ 2M": SamplerSpec("DPMSolverMultistepScheduler", flow=True),
    "UniPC": SamplerSpec("UniPCMultistepScheduler", flow=True),
}


def make_scheduler(name: str, config: Any, table: dict[str, SamplerSpec] | None = None) -> Any:
    """A fresh diffusers scheduler for sampler `name` (from `table`, SD's by default), from a model's config."""
    spec = (table or SAMPLERS)[name]
    cls = getattr(diffusers, spec.scheduler)
    options = dict(spec.options)
    if spec.flow:  # the flow model's shift, carried over to the solver's flow sigmas
        options.update(
            use_flow_sigmas=True,
            prediction_type="flow_prediction",
            flow_shift=float(config.get("shift", 1.0)),
            use_dynamic_shifting=bool(config.get("use_dynamic_shifting", False)),
            time_shift_type=config.get("time_shift_type", "exponential"),
        )
    scheduler = cls.from_config(config, **options)
    if spec.flow and not hasattr(scheduler, "scale_noise"):
        # diffusers' flow-model img2img and inpaint pipelines noise the image with FlowMatch's
        # scale_noise(sample, t, noise); on flow sigmas the solvers' add_noise computes the same mix.
        scheduler.scale_noise = lambda sample, timestep, noise: scheduler.add_noise(sample, noise, timestep)
    return scheduler


def scheduler_for(name: str | None, scheduler: Any, table: dict[str, SamplerSpec] | None = None) -> Any:
    """A fresh scheduler instance for one request: sampler `name`, or (None) the model's own scheduler.
    Schedulers keep per-run state (step index, multistep history), so requests never share one."""
    if name is None:
        return type(scheduler).from_config(scheduler.config)
    return make_scheduler(name, scheduler.config, table)


def sampler_label(name: str | None, scheduler: Any, table: dict[str, SamplerSpec] | None = None) -> str:
    """The A1111 name to report: the requested one, else the name matching the model's own scheduler."""
    if name is not None:
        return name
    karras = bool(getattr(scheduler.config, "use_karras_sigmas", False))
    algorithm = getattr(scheduler.config, "algorithm_type", None)
    for label, spec in (table or SAMPLERS).items():
        if spec.scheduler != type(scheduler).__name__:
            continue
        if bool(spec.options.get("use_karras_sigmas")) == karras and spec.options.get("algorithm_type") in (
            None,
            algorithm,
        ):
            return label
    return type(scheduler).__name__
