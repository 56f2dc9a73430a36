"""Routes of the original API: parse the form, hand one GenerationRequest to the scheduler."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request

from sdserver.api import adapter
from sdserver.api.deps import SettingsDep
from sdserver.api.fields import GuardedRoute, read_fields
from sdserver.api.original.protocol import (
    CustomModelOut,
    FailureResponse,
    SuccessResponse,
    form_schema,
    to_generation_request,
    to_response,
)
from sdserver.api.security import PrincipalDep
from sdserver.core.errors import NotFound
from sdserver.core.types import Task
from sdserver.settings import Settings, is_hub_id

router = APIRouter(tags=["original API"], route_class=GuardedRoute)
_FAILURES: dict[int | str, dict[str, object]] = {
    code: {"model": FailureResponse} for code in (400, 404, 429, 500, 503, 504)
}


@router.get("/ping")
async def ping() -> dict[str, str]:
    """Answers once the models are loaded."""
    return {"status": "success"}


@router.get("/custom_models", response_model=list[CustomModelOut])
async def custom_models(settings: SettingsDep, principal: PrincipalDep) -> list[CustomModelOut]:
    """As configured. On a server with keys, only the admin sees where a model lives on disk (others
    get its file or folder name)."""
    out = []
    for custom in settings.custom_models:
        shown = custom.model_dump()
        if settings.auth_enabled and not principal.admin and not is_hub_id(custom.model_path):
            shown["model_path"] = Path(custom.model_path).name
        out.append(CustomModelOut(**shown))
    return out


async def _generate(request: Request, task: Task, model: str | None = None) -> SuccessResponse:
    fields = await read_fields(request)
    limits = request.app.state.settings.limits
    return await adapter.serve(
        request, lambda: to_generation_request(fields, task, model, limits), lambda _, result: to_response(result)
    )


def _custom(settings: Settings, url_path: str) -> str:
    if not any(custom.url_path == url_path for custom in settings.custom_models):
        raise NotFound(f"url_path: no custom model {url_path!r} is configured")
    return url_path


@router.post("/txt2img", responses=_FAILURES, openapi_extra=form_schema(Task.TXT2IMG))
async def txt2img(request: Request) -> SuccessResponse:
    """Text to image. Form fields: prompt, seed, num_outputs, width, height, num_inference_steps, guidance_scale."""
    return await _generate(request, Task.TXT2IMG)


@router.post("/img2img", responses=_FAILURES, openapi_extra=form_schema(Task.IMG2IMG))
async def img2img(request: Request) -> SuccessResponse:
    """Image to image: init_image (base64) and strength (0..1, higher changes more)."""
    return await _generate(request, Task.IMG2IMG)


@router.post("/masking", responses=_FAILURES, openapi_extra=form_schema(Task.INPAINT))
async def masking(request: Request) -> SuccessResponse:
    """Inpainting: init_image and mask_image (white = repaint, black = keep)."""
    return await _generate(request, Task.INPAINT)


@router.post("/custom/{url_path}", responses=_FAILURES, openapi_extra=form_schema(Task.TXT2IMG))
async def custom_txt2img(url_path: str, request: Request, settings: SettingsDep) -> SuccessResponse:
    """txt2img on a custom model from config.json's custom_models."""
    return await _generate(request, Task.TXT2IMG, _custom(settings, url_path))


@router.post("/custom/{url_path}/img2img", responses=_FAILURES, openapi_extra=form_schema(Task.IMG2IMG))
async def custom_img2img(url_path: str, request: Request, settings: SettingsDep) -> SuccessResponse:
    return await _generate(request, Task.IMG2IMG, _custom(settings, url_path))


@router.post("/custom/{url_path}/masking", responses=_FAILURES, openapi_extra=form_schema(Task.INPAINT))
async def custom_masking(url_path: str, request: Request, settings: SettingsDep) -> SuccessResponse:
    return await _generate(request, Task.INPAINT, _custom(settings, url_path))
