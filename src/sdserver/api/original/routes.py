"""Routes of the original API: parse the form, hand one GenerationRequest to the scheduler."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from sdserver.api import waiting
from sdserver.api.deps import SchedulerDep, SettingsDep
from sdserver.api.fields import read_fields
from sdserver.api.original.protocol import (
    CustomModelOut,
    FailureResponse,
    SuccessResponse,
    form_schema,
    to_generation_request,
    to_response,
)
from sdserver.core.errors import NotFound
from sdserver.core.types import Task
from sdserver.service.scheduler import Scheduler
from sdserver.settings import Settings

router = APIRouter(tags=["original API"])
_FAILURES: dict[int | str, dict[str, object]] = {
    code: {"model": FailureResponse} for code in (400, 404, 429, 500, 503, 504)
}


@router.get("/ping", responses={503: {"model": FailureResponse}})
async def ping(scheduler: SchedulerDep) -> dict[str, str]:
    """Answers once the models are loaded (503 while they load)."""
    return {"status": "success"}


@router.get("/custom_models", response_model=list[CustomModelOut])
async def custom_models(settings: SettingsDep) -> list[CustomModelOut]:
    return [CustomModelOut(**custom.model_dump()) for custom in settings.custom_models]


async def _generate(request: Request, scheduler: Scheduler, task: Task, model: str | None = None) -> SuccessResponse:
    fields = await read_fields(request)
    limits = request.app.state.settings.limits
    generation = await run_in_threadpool(to_generation_request, fields, task, model, limits)
    result = await waiting.generate(request, scheduler, generation)
    return await run_in_threadpool(to_response, result)


def _custom(settings: Settings, url_path: str) -> str:
    if not any(custom.url_path == url_path for custom in settings.custom_models):
        raise NotFound(f"url_path: no custom model {url_path!r} is configured")
    return url_path


@router.post("/txt2img", responses=_FAILURES, openapi_extra=form_schema(Task.TXT2IMG))
async def txt2img(request: Request, scheduler: SchedulerDep) -> SuccessResponse:
    """Text to image. Form fields: prompt, seed, num_outputs, width, height, num_inference_steps, guidance_scale."""
    return await _generate(request, scheduler, Task.TXT2IMG)


@router.post("/img2img", responses=_FAILURES, openapi_extra=form_schema(Task.IMG2IMG))
async def img2img(request: Request, scheduler: SchedulerDep) -> SuccessResponse:
    """Image to image: init_image (base64) and strength (0..1, higher changes more)."""
    return await _generate(request, scheduler, Task.IMG2IMG)


@router.post("/masking", responses=_FAILURES, openapi_extra=form_schema(Task.INPAINT))
async def masking(request: Request, scheduler: SchedulerDep) -> SuccessResponse:
    """Inpainting: init_image and mask_image (white = repaint, black = keep)."""
    return await _generate(request, scheduler, Task.INPAINT)


@router.post("/custom/{url_path}", responses=_FAILURES, openapi_extra=form_schema(Task.TXT2IMG))
async def custom_txt2img(
    url_path: str, request: Request, scheduler: SchedulerDep, settings: SettingsDep
) -> SuccessResponse:
    """txt2img on a custom model from config.json's custom_models."""
    return await _generate(request, scheduler, Task.TXT2IMG, _custom(settings, url_path))


@router.post("/custom/{url_path}/img2img", responses=_FAILURES, openapi_extra=form_schema(Task.IMG2IMG))
async def custom_img2img(
    url_path: str, request: Request, scheduler: SchedulerDep, settings: SettingsDep
) -> SuccessResponse:
    return await _generate(request, scheduler, Task.IMG2IMG, _custom(settings, url_path))


@router.post("/custom/{url_path}/masking", responses=_FAILURES, openapi_extra=form_schema(Task.INPAINT))
async def custom_masking(
    url_path: str, request: Request, scheduler: SchedulerDep, settings: SettingsDep
) -> SuccessResponse:
    return await _generate(request, scheduler, Task.INPAINT, _custom(settings, url_path))
