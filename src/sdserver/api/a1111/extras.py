"""AUTOMATIC1111's extras: upscaling one image or a batch (`/sdapi/v1/extra-single-image`,
`/sdapi/v1/extra-batch-images`), and the lists of upscalers (`/sdapi/v1/upscalers`,
`/sdapi/v1/realesrgan-models`).

Honoured: resize_mode (0: by `upscaling_resize`, each side rounded down to a multiple of 8 as A1111
does; 1: to `upscaling_resize_w` x `upscaling_resize_h`, center-cropped with `upscaling_crop`),
upscaler_1, upscaler_2 with extras_upscaler_2_visibility (the two results blended). upscaler_1 "None"
returns the image as sent, as in A1111. Face restoration (GFPGAN, CodeFormer) is not available: asked
for, it is named in `html_info` and `notes`. The sizes are checked against the server's limits from the
images' headers, before any pixel is decoded; the upscaling runs on the worker thread, between the
denoising steps of generations.
"""

from __future__ import annotations

import asyncio
import html
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, Request
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from sdserver.api import adapter
from sdserver.api.deps import EngineDep, SchedulerDep, SettingsDep
from sdserver.api.fields import GuardedRoute
from sdserver.api.middleware import note
from sdserver.api.security import Principal, PrincipalDep
from sdserver.core.errors import FieldError, InvalidRequest
from sdserver.core.images import decode_field
from sdserver.core.limits import Limits
from sdserver.imaging import png_base64
from sdserver.service.scheduler import Scheduler

if TYPE_CHECKING:
    from sdserver.engine import Engine

log = logging.getLogger(__name__)

router = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111 API"], route_class=GuardedRoute)

MULTIPLE = 8  # A1111 rounds a scaled-by size down to a multiple of 8
UNSUPPORTED = {
    "gfpgan_visibility": "face restoration (GFPGAN)",
    "codeformer_visibility": "face restoration (CodeFormer)",
}


class ExtrasBody(BaseModel):
    """A1111's ExtrasBaseRequest: its field names, defaults and bounds."""

    model_config = ConfigDict(extra="allow")

    resize_mode: Literal[0, 1] = Field(default=0, description="0: by upscaling_resize; 1: to w x h")
    show_extras_results: bool = Field(default=True, description="Accepted; the images are always returned")
    gfpgan_visibility: float = Field(default=0, ge=0, le=1, allow_inf_nan=False, description="Not supported")
    codeformer_visibility: float = Field(default=0, ge=0, le=1, allow_inf_nan=False, description="Not supported")
    codeformer_weight: float = Field(default=0, ge=0, le=1, allow_inf_nan=False, description="Not supported")
    upscaling_resize: float = Field(default=2, ge=1, le=8, allow_inf_nan=False, description="Factor (resize_mode 0)")
    upscaling_resize_w: int = Field(default=512, ge=1, description="Target width (resize_mode 1)")
    upscaling_resize_h: int = Field(default=512, ge=1, description="Target height (resize_mode 1)")
    upscaling_crop: bool = Field(default=True, description="resize_mode 1: crop to exactly w x h")
    upscaler_1: str = Field(default="None", description="GET /sdapi/v1/upscalers")
    upscaler_2: str = Field(default="None", description="Blended over upscaler_1's result")
    extras_upscaler_2_visibility: float = Field(default=0, ge=0, le=1, allow_inf_nan=False)
    upscale_first: bool = Field(default=False, description="Accepted (no face restoration to order it with)")


class SingleImageBody(ExtrasBody):
    image: str = Field(default="", description="base64 PNG, JPEG or WebP")


class FileData(BaseModel):
    data: str = Field(description="base64 PNG, JPEG or WebP")
    name: str = ""


class BatchImagesBody(ExtrasBody):
    imageList: list[FileData] = Field(description="The images, each {data, name}")


@dataclass(frozen=True)
class Plan:
    """What a request asks of each image: the upscalers (resolved names; none: the image as sent)."""

    first: str | None
    second: str | None
    visibility: float
    notes: list[str]


@dataclass(frozen=True)
class Sizes:
    scaled: tuple[int, int]  # what the upscaler produces
    final: tuple[int, int]  # after the crop


def plan_of(body: ExtrasBody, engine: Engine) -> Plan:
    """The upscalers by their listed names (a 422 naming the field for an unknown one), and notes on
    what is asked for and not done."""
    first = engine.upscalers.resolve(body.upscaler_1, "upscaler_1")
    second = engine.upscalers.resolve(body.upscaler_2, "upscaler_2")
    notes = [f"{what} is not supported: {name} ignored" for name, what in UNSUPPORTED.items() if getattr(body, name)]
    if body.model_extra:
        notes.append(f"fields not supported, ignored: {', '.join(adapter.ignored(body.model_extra, set()))}")
    if first == "None":
        notes.append('upscaler_1 is "None": the image is returned as sent (as A1111 does)')
        return Plan(None, None, 0.0, notes)
    blend = second != "None" and body.extras_upscaler_2_visibility > 0
    return Plan(first, second if blend else None, body.extras_upscaler_2_visibility, notes)


def sizes_of(body: ExtrasBody, size: tuple[int, int], limits: Limits) -> Sizes:
    """The sizes for an image of `size`, checked against the limits (FieldError naming the field)."""
    width, height = size
    if body.resize_mode == 0:
        factor, field = body.upscaling_resize, "upscaling_resize"
        scaled = (_floor(width * factor), _floor(height * factor))
        final = scaled
    else:
        target, field = (body.upscaling_resize_w, body.upscaling_resize_h), "upscaling_resize_w"
        factor = max(target[0] / width, target[1] / height)
        # the side that decides the factor is exactly its target; the other covers its own
        scaled = (max(target[0], round(width * factor)), max(target[1], round(height * factor)))
        final = target if body.upscaling_crop else scaled
    for shown in (final, scaled):  # what was asked first, then what the upscaler must make to get it
        if max(shown) > limits.max_side or shown[0] * shown[1] > limits.max_pixels:
            if field != "upscaling_resize" and shown[1] > limits.max_side >= shown[0]:
                field = "upscaling_resize_h"  # the side over the limit
            what = f"a {width}x{height} image upscaled to {shown[0]}x{shown[1]}"
            limit = f"{limits.max_side} px per side and {limits.max_pixels} pixels"
            raise FieldError(field, getattr(body, field), f"{what} is over the limit of {limit}")
    return Sizes(scaled, final)


def _floor(side: float) -> int:
    return max(MULTIPLE, int(side // MULTIPLE * MULTIPLE))


def read_images(body: ExtrasBody, fields: list[tuple[str, str]], limits: Limits) -> list[tuple[Image.Image, Sizes]]:
    """Each (field, base64) image: headers and sizes checked first, then the pixels decoded (RGB)."""
    opened = [(field, adapter.open_header(value, field, limits, {})) for field, value in fields]
    try:
        sizes = [sizes_of(body, image.size, limits) for _, image in opened]
        return [(decode_field(image, field), size) for (field, image), size in zip(opened, sizes, strict=True)]
    except FieldError as exc:
        raise exc.invalid() from None


async def upscale(
    request: Request, body: ExtrasBody, fields: list[tuple[str, str]], engine: Engine, scheduler: Scheduler
) -> tuple[list[str], str, list[str]]:
    """The images upscaled as `body` asks: (base64 PNGs, A1111's html_info, notes)."""
    plan = plan_of(body, engine)
    limits: Limits = request.app.state.settings.limits
    images = await run_in_threadpool(read_images, body, fields, limits)
    if plan.notes:
        note(extras_notes=plan.notes)
        log.info("extras: %s", "; ".join(plan.notes))
    if plan.first is None:
        as_sent = await run_in_threadpool(lambda: [png_base64(image) for image, _ in images])
        return as_sent, _info(body, plan), plan.notes
    if not hasattr(scheduler, "call"):  # the Ray ingress: its replicas only generate
        raise InvalidRequest("upscaling is not available on a server running on Ray (--ray)")
    note(upscaler=plan.first, images=len(images))
    first, second = plan.first, plan.second

    def work() -> list[tuple[Image.Image, Image.Image | None]]:  # on the worker thread: the device's
        done = []
        for image, sizes in images:
            by_first = engine.upscale([image], first, *sizes.scaled)[0]
            by_second = engine.upscale([image], second, *sizes.scaled)[0] if second is not None else None
            done.append((by_first, by_second))
        return done

    results = await asyncio.wrap_future(scheduler.call(work))
    finals = [sizes.final for _, sizes in images]
    pairs = zip(results, finals, strict=True)
    encoded = await run_in_threadpool(lambda: [_finish(*pair, plan.visibility, final) for pair, final in pairs])
    return encoded, _info(body, plan), plan.notes


def _finish(first: Image.Image, second: Image.Image | None, visibility: float, final: tuple[int, int]) -> str:
    """Blend the second upscaler's result over the first's, center-crop to the final size, encode."""
    image = Image.blend(first, second, visibility) if second is not None else first
    if image.size != final:
        left, top = (image.width - final[0]) // 2, (image.height - final[1]) // 2
        image = image.crop((left, top, left + final[0], top + final[1]))
    return png_base64(image)


def _info(body: ExtrasBody, plan: Plan) -> str:
    """A1111's html_info: its postprocessing infotext as a paragraph, then our notes."""
    items: list[str] = []
    if plan.first is not None:
        if body.resize_mode == 0:
            items.append(f"Postprocess upscale by: {body.upscaling_resize:g}")
        else:
            items.append(f"Postprocess upscale to: {body.upscaling_resize_w}x{body.upscaling_resize_h}")
        items.append(f"Postprocess upscaler: {plan.first}")
        if plan.second is not None:
            items.append(f"Postprocess upscaler 2: {plan.second}")
    paragraphs = [", ".join(items), *(f"Note: {text}" for text in plan.notes)]
    return "".join(f"<p>{html.escape(text)}</p>" for text in paragraphs if text)


@router.post("/extra-single-image")
async def extra_single_image(
    body: SingleImageBody, request: Request, engine: EngineDep, scheduler: SchedulerDep
) -> dict[str, Any]:
    """Upscale one image (`image`, base64) with `upscaler_1` (GET /sdapi/v1/upscalers), optionally
    blended with `upscaler_2`. Answer: `image` (base64 PNG), `html_info`, `notes` (what was not done)."""
    images, info, notes = await upscale(request, body, [("image", body.image)], engine, scheduler)
    return {"html_info": info, "image": images[0], "notes": notes}


@router.post("/extra-batch-images")
async def extra_batch_images(
    body: BatchImagesBody, request: Request, engine: EngineDep, scheduler: SchedulerDep, settings: SettingsDep
) -> dict[str, Any]:
    """Upscale each of `imageList` ({data, name}; at most max_images) as extra-single-image does.
    Answer: `images` (base64 PNGs, in order), `html_info`, `notes`."""
    if len(body.imageList) > settings.limits.max_images:
        reason = f"{len(body.imageList)} images, over the limit of {settings.limits.max_images} per request"
        raise InvalidRequest(f"imageList: {reason}", field="imageList")
    fields = [(f"imageList.{index}.data", item.data) for index, item in enumerate(body.imageList)]
    images, info, notes = await upscale(request, body, fields, engine, scheduler)
    return {"html_info": info, "images": images, "notes": notes}


def _shown_path(path: str | None, principal: Principal) -> str | None:
    """Where a file lives only to the admin key; others get the file's name."""
    if path is None or (principal.admin and principal.authenticated):
        return path
    return Path(path).name


@router.get("/upscalers")
async def upscalers(engine: EngineDep, principal: PrincipalDep) -> list[dict[str, Any]]:
    """The built-in upscalers ("None", "Lanczos", "Nearest"), then the model files in upscalers_dir by
    name (`model_path`: the file's name, its full path for the admin key). A model's `scale` is read
    when it loads; until then it is guessed from its name (4x-..., ..._x2), else 4."""
    items = await run_in_threadpool(engine.upscalers.describe)
    return [{**item, "model_path": _shown_path(item["model_path"], principal)} for item in items]


@router.get("/realesrgan-models")
async def realesrgan_models(engine: EngineDep, principal: PrincipalDep) -> list[dict[str, Any]]:
    """The model upscalers whose name contains "esrgan" (A1111's Real-ESRGAN list)."""
    items = await run_in_threadpool(engine.upscalers.describe)
    return [
        {"name": item["name"], "path": _shown_path(item["model_path"], principal), "scale": item["scale"]}
        for item in items
        if item["model_path"] is not None and "esrgan" in item["name"].lower()
    ]
