"""The sd-webui-controlnet extension's routes (`/controlnet/*`), as A1111 clients call them.

The models are the ControlNets of `controlnet_dir` (the engine's library, listed as the extension lists
them, "name [hash]"); the modules are sdserver's preprocessors (sdserver.preprocessors), which need no
model files. `/controlnet/detect` runs a module on pictures, for clients that show the control image
before generating.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from sdserver import preprocessors
from sdserver.api.deps import EngineDep
from sdserver.api.fields import GuardedRoute
from sdserver.core.control import MAX_UNITS
from sdserver.core.errors import FieldError, InvalidRequest
from sdserver.core.images import decode_field, open_field
from sdserver.core.limits import Limits
from sdserver.imaging import png_base64

API_VERSION = 2  # the extension's API version, which clients check
router = APIRouter(tags=["ControlNet (sd-webui-controlnet)"], route_class=GuardedRoute)
_DETECT_NAMES = {
    "module": "controlnet_module",
    "processor_res": "controlnet_processor_res",
    "threshold_a": "controlnet_threshold_a",
    "threshold_b": "controlnet_threshold_b",
}


class DetectBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    controlnet_module: str = Field(default="none", description="A module of /controlnet/module_list (name or alias)")
    controlnet_input_images: list[str] = Field(default=[], description="base64 images (data URLs allowed)")
    controlnet_images: list[str] = Field(default=[], description="The older name of controlnet_input_images")
    controlnet_processor_res: float = Field(default=-1, description="Short side to process at; -1: the module's")
    controlnet_threshold_a: float = Field(default=-1, description="The module's first slider; -1: its default")
    controlnet_threshold_b: float = Field(default=-1, description="The module's second slider; -1: its default")


class DetectOut(BaseModel):
    images: list[str] = Field(description="The control images, base64 PNG")
    info: str = "Success"


@router.get("/controlnet/version")
async def version() -> dict[str, int]:
    return {"version": API_VERSION}


@router.get("/controlnet/model_list")
async def model_list(engine: EngineDep, update: Annotated[bool, Query()] = True) -> dict[str, list[str]]:
    """The ControlNets of controlnet_dir as "name [hash]" (A1111's short hash of the weights file),
    rescanned on every call; a unit's `model` may name one with or without the hash."""
    result: dict[str, list[str]] = await run_in_threadpool(engine.controlnets.model_list)
    return result


@router.get("/controlnet/module_list")
async def module_list(alias_names: Annotated[bool, Query()] = False) -> dict[str, Any]:
    """The preprocessors sdserver runs (none needs a model file), by name or by the extension's alias
    names, with their sliders: processor_res, threshold_a, threshold_b."""
    return {
        "module_list": preprocessors.modules(alias_names),
        "module_detail": preprocessors.module_details(alias_names),
    }


@router.get("/controlnet/settings")
async def settings() -> dict[str, int]:
    """`control_net_unit_count`: how many ControlNet units one request may use."""
    return {"control_net_unit_count": MAX_UNITS}


def _detect(body: DetectBody, limits: Limits) -> DetectOut:
    try:
        params = preprocessors.resolve(
            body.controlnet_module,
            body.controlnet_processor_res,
            body.controlnet_threshold_a,
            body.controlnet_threshold_b,
        )
    except FieldError as exc:
        raise exc.invalid(_DETECT_NAMES) from None
    # webuiapi sends the extension's older name for the images
    field = (
        "controlnet_input_images" if body.controlnet_input_images or not body.controlnet_images else "controlnet_images"
    )
    images = body.controlnet_input_images or body.controlnet_images
    if not images:
        raise InvalidRequest("controlnet_input_images: no image given", field="controlnet_input_images")
    if len(images) > limits.max_images:
        reason = f"{len(images)} images, over the limit of {limits.max_images}"
        raise InvalidRequest(f"{field}: {reason}", field=field)
    try:
        opened = [open_field(image, f"{field}[{i}]", limits.max_input_pixels) for i, image in enumerate(images)]
        decoded = [decode_field(image, f"{field}[{i}]") for i, image in enumerate(opened)]  # headers checked first
    except FieldError as exc:
        raise exc.invalid() from None
    return DetectOut(images=[png_base64(preprocessors.apply(params, image)) for image in decoded])


@router.post("/controlnet/detect", response_model=DetectOut)
async def detect(body: DetectBody, request: Request) -> DetectOut:
    """Run a module on each of `controlnet_input_images`: the control images a ControlNet would get.
    Modules that need a model file (openpose, depth, ...) are refused by name."""
    limits: Limits = request.app.state.settings.limits
    return await run_in_threadpool(_detect, body, limits)
