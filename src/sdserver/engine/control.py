"""ControlNet in the denoising loop: each state's units (a loaded ControlNet and its control image at the
request's size), and one step's residuals over the stacked rows of many states, weighted per row.

Requests share a running set only with the same ControlNets in the same order (service.running's group
key), so unit k of every state uses one model and runs as ONE ControlNet forward over all rows; each row
gets its own control image, weight, guidance window and control mode. As in the sd-webui-controlnet
extension, "prompt" and "controlnet" modes scale the residuals down towards the shallow blocks
(0.825 ** depth), and "controlnet" applies them to the conditional rows only (no control on the
unconditional half of classifier-free guidance).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from sdserver import preprocessors
from sdserver.core.errors import InvalidRequest
from sdserver.core.types import PreparedRequest
from sdserver.engine.controlnets import ControlNetLibrary, active, prepare_image, residuals, stack_images

if TYPE_CHECKING:
    from sdserver.engine.families.base import State
    from sdserver.engine.loaders import LoadedPipelines

SOFT_BASE = 0.825
Residuals = tuple[list[torch.Tensor], torch.Tensor]
Run = Callable[[Any, torch.Tensor], list[torch.Tensor]]


@dataclass(eq=False)
class ActiveUnit:
    controlnet: Any  # diffusers.ControlNetModel, on the model's device
    image: torch.Tensor  # one row: the control image fitted to the request, as the family takes it
    weight: float
    start: float
    end: float
    mode: str  # balanced | prompt | controlnet


FAMILIES = ("sd", "sdxl", "sd3", "flux")  # the families whose denoiser takes ControlNet residuals


def control_images(
    library: ControlNetLibrary, request: PreparedRequest, family: str, kind: str
) -> tuple[Image.Image, ...]:
    """Check each unit against the model (its ControlNet exists and is for this base) and run its
    preprocessor on its image (img2img and inpainting: the init image where the unit has none)."""
    if not request.controlnets:
        return ()
    if family not in FAMILIES:
        raise InvalidRequest(f"controlnets: ControlNet is not supported for {kind} models yet", field="controlnets")
    maps = []
    for index, unit in enumerate(request.controlnets):
        field = f"controlnets[{index}]"
        library.check_fits(unit.name, request.model, kind, field=f"{field}.model")
        image = unit.image if unit.image is not None else request.init_image
        if image is None:
            raise InvalidRequest(f"{field}.image: is required for txt2img (img2img uses the init image)", field=field)
        res = unit.processor_res
        if unit.pixel_perfect:
            res = preprocessors.pixel_perfect_resolution(image.size, (request.width, request.height), unit.resize_mode)
        params = preprocessors.resolve(unit.module, res, unit.threshold_a, unit.threshold_b)
        maps.append(preprocessors.apply(params, image))
    return tuple(maps)


def attach(state: State, library: Any, model: LoadedPipelines, dtype: torch.dtype) -> None:
    """Load the request's ControlNets and fit its control images (already preprocessed) to its size, as
    the family's ControlNets take them (`Family.control_condition`: pixels, or encoded latents)."""
    request = state.request
    units = []
    for index, (unit, image) in enumerate(zip(request.controlnets, request.control_images, strict=True)):
        controlnet = library.get(unit.name, model.device, dtype, field=f"controlnets[{index}].model")
        pixels = prepare_image(image, request.width, request.height, unit.resize_mode)
        units.append(
            ActiveUnit(
                controlnet=controlnet,
                image=model.family.control_condition(model, pixels.to(model.device, dtype), controlnet),
                weight=unit.weight,
                start=unit.guidance_start,
                end=unit.guidance_end,
                mode=unit.control_mode,
            )
        )
    if units:
        state.extra["controls"] = units


def step_residuals(
    states: Sequence[State],
    inputs: torch.Tensor,
    timesteps: torch.Tensor,
    hidden: torch.Tensor,
    added: dict[str, torch.Tensor] | None = None,
) -> Residuals | None:
    """A UNet's summed residuals of every unit for one step over the stacked rows (None: no ControlNet)."""

    def run(controlnet: Any, conditions: torch.Tensor) -> list[torch.Tensor]:
        latents = inputs[:, : controlnet.config.in_channels]  # an inpainting UNet's extra channels are not its
        down, mid = residuals(controlnet, latents, timesteps, hidden, conditions, 1.0, added)
        return [*down, mid]

    total = summed_outputs(states, run)
    return None if total is None else (total[:-1], total[-1])


def summed_outputs(states: Sequence[State], run: Run) -> list[torch.Tensor] | None:
    """Every unit's ControlNet outputs for one step (`run(controlnet, conditions)`: one forward over the
    stacked rows, each output a row per denoiser row), weighted per row and summed over the units."""
    first: list[ActiveUnit] | None = states[0].extra.get("controls")
    if not first:
        return None
    total: list[torch.Tensor] | None = None
    for k, unit in enumerate(first):
        weights, soft = _row_weights(states, k)
        if not any(weights):
            continue
        images = stack_images([state.extra["controls"][k].image for state in states], [s.denoiser_rows for s in states])
        scaled = _weighted(run(unit.controlnet, images), weights, soft)
        total = scaled if total is None else [a + b for a, b in zip(total, scaled, strict=True)]
    return total


def _row_weights(states: Sequence[State], k: int) -> tuple[list[float], list[bool]]:
    """Unit k's weight for every denoiser row (0 outside its guidance window, and on the unconditional
    rows in "controlnet" mode), and whether the row takes the soft (depth-scaled) residuals."""
    weights: list[float] = []
    soft: list[bool] = []
    for state in states:
        unit: ActiveUnit = state.extra["controls"][k]
        weight = unit.weight if active(unit.start, unit.end, state.index, state.total) else 0.0
        rows = state.denoiser_rows
        if state.conditioning.cfg and unit.mode == "controlnet":
            weights += [0.0] * (rows // 2) + [weight] * (rows // 2)
        else:
            weights += [weight] * rows
        soft += [unit.mode != "balanced"] * rows
    return weights, soft


def _weighted(outputs: list[torch.Tensor], weights: list[float], soft: list[bool]) -> list[torch.Tensor]:
    last = len(outputs) - 1
    reference = outputs[0]
    weight = torch.tensor(weights, device=reference.device, dtype=reference.dtype)
    softened = torch.tensor(soft, device=reference.device)
    scaled = []
    for depth, output in enumerate(outputs):
        factor = torch.where(softened, SOFT_BASE ** float(last - depth), 1.0).to(reference.dtype) * weight
        scaled.append(output * factor.view(-1, *([1] * (output.dim() - 1))))
    return scaled
