"""Routes of the OpenAI Images API: `/v1/images/{generations,edits,variations}`, `/v1/models`.

Errors come out in OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`), rendered for
every `/v1/` path by `api.errors.render_v1`.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, Response, UploadFile

from sdserver.api import adapter
from sdserver.api.deps import EngineDep, SettingsDep
from sdserver.api.fields import GuardedRoute
from sdserver.api.openai.protocol import (
    IGNORED,
    VARIATION_PROMPT,
    Extensions,
    GenerationsBody,
    ImageData,
    ImagesResponse,
    ModelList,
    ModelOut,
    OutputFormat,
    ResponseFormat,
    created_now,
    edit_request,
    generation_request,
    image_bytes,
)
from sdserver.api.openai.urls import ImageUrlStore
from sdserver.core.errors import InvalidRequest
from sdserver.core.types import GenerationRequest, GenerationResult
from sdserver.imaging import MEDIA_TYPES

router = APIRouter(prefix="/v1", tags=["OpenAI Images API"], route_class=GuardedRoute)
_ERRORS: dict[int | str, dict[str, object]] = {
    code: {"description": 'OpenAI\'s error shape: {"error": {"message", "type", "param", "code"}}'}
    for code in (400, 404, 429, 500, 503, 504)
}


def _url_store(request: Request) -> ImageUrlStore:
    store: ImageUrlStore | None = getattr(request.app.state, "openai_image_urls", None)
    if store is None:
        settings = request.app.state.settings
        store = ImageUrlStore(ttl_s=settings.image_url_ttl, max_bytes=int(settings.image_url_max_mb * 2**20))
        request.app.state.openai_image_urls = store
    return store


UrlStoreDep = Annotated[ImageUrlStore, Depends(_url_store)]


@dataclass(frozen=True)
class _Encoded:
    seeds: list[int]
    files: list[bytes]
    size: str | None


def _encoder(output_format: OutputFormat, compression: int | None) -> Callable[..., _Encoded]:
    """Encodes a finished job's images (in a worker thread)."""

    def encode(_: GenerationRequest, result: GenerationResult | None) -> _Encoded:
        assert result is not None  # only A1111 answers a cancelled request
        first = result.images[0].image if result.images else None
        size = f"{first.width}x{first.height}" if first is not None else None
        return _Encoded([out.seed for out in result.images], image_bytes(result, output_format, compression), size)

    return encode


def _respond(
    request: Request, store: ImageUrlStore, encoded: _Encoded, response_format: str | None, output_format: OutputFormat
) -> ImagesResponse:
    data = []
    for seed, raw in zip(encoded.seeds, encoded.files, strict=True):
        if response_format == "url":  # a link on the server's own address (or --public-url), never the Host sent
            token = store.put(raw, MEDIA_TYPES[output_format])
            url = adapter.public_base_url(request) + request.app.url_path_for("openai_image_file", token=token)
            data.append(ImageData(url=url, seed=seed))
        else:
            data.append(ImageData(b64_json=base64.b64encode(raw).decode("ascii"), seed=seed))
    return ImagesResponse(created=created_now(), data=data, output_format=output_format, size=encoded.size)


@router.post("/images/generations", response_model=ImagesResponse, response_model_exclude_none=True, responses=_ERRORS)
async def create_image(
    body: GenerationsBody, request: Request, settings: SettingsDep, store: UrlStoreDep
) -> ImagesResponse:
    """Text to image (OpenAI's `images.generate`), plus the extensions `negative_prompt`, `seed`, `steps`,
    `guidance_scale`, `sampler`, `clip_skip`."""
    build = partial(generation_request, body, settings.limits)
    encoded = await adapter.serve(request, build, _encoder(body.output_format, body.output_compression))
    return _respond(request, store, encoded, body.response_format, body.output_format)


async def _upload(files: list[UploadFile | None], field: str, required: bool) -> bytes | None:
    for upload in files:
        if upload is not None:
            return await upload.read()
    if required:
        raise InvalidRequest(f"{field}: an image file is required", field=field)
    return None


async def _note_unused_fields(request: Request) -> None:
    """Form fields this route does not take, or takes and ignores: named in the request's log line."""
    dependant = getattr(request.scope.get("route"), "dependant", None)
    taken = {param.alias for param in getattr(dependant, "body_params", [])}
    form = await request.form()  # already parsed for the route: this is the cached copy
    adapter.ignored(dict(form), taken)
    adapter.ignored({name: form[name] for name in IGNORED if name in form}, set(), what="ignored_openai")


FormStr = Annotated[str | None, Form()]
FormInt = Annotated[int | None, Form()]
FormFloat = Annotated[float | None, Form()]


@router.post("/images/edits", response_model=ImagesResponse, response_model_exclude_none=True, responses=_ERRORS)
async def edit_image(
    request: Request,
    settings: SettingsDep,
    store: UrlStoreDep,
    prompt: Annotated[str, Form(description="What the edited image should show", examples=["a yellow circle"])],
    image: Annotated[UploadFile | None, File(description="The picture (PNG/JPEG/WebP)")] = None,
    image_list: Annotated[list[UploadFile] | None, File(alias="image[]", description="Same, as a list")] = None,
    mask: Annotated[
        UploadFile | None, File(description="PNG with alpha: transparent pixels are repainted, opaque kept")
    ] = None,
    model: FormStr = None,
    n: Annotated[int, Form()] = 1,
    size: FormStr = None,
    response_format: Annotated[ResponseFormat | None, Form()] = None,
    output_format: Annotated[OutputFormat, Form()] = "png",
    output_compression: Annotated[int | None, Form(ge=0, le=100)] = None,
    negative_prompt: FormStr = None,
    seed: FormInt = None,
    steps: FormInt = None,
    guidance_scale: FormFloat = None,
    sampler: FormStr = None,
    clip_skip: FormInt = None,
    strength: Annotated[float | None, Form(description="How much to change (default 1 with a mask, else 0.7)")] = None,
    quality: FormStr = None,
    user: FormStr = None,
) -> ImagesResponse:
    """Edit an image (OpenAI's `images.edit`): inpainting where `mask` (or, without one, the image itself)
    is transparent; an image without any transparency is reworked as a whole (img2img, `strength`)."""
    await _note_unused_fields(request)
    raw = await _upload([image, *(image_list or [])], "image", required=True)
    assert raw is not None
    mask_raw = await _upload([mask], "mask", required=False)
    ext = Extensions(
        negative_prompt=negative_prompt, seed=seed, steps=steps, guidance_scale=guidance_scale, sampler=sampler,
        clip_skip=clip_skip,
    )  # fmt: skip
    build = partial(
        edit_request, image=raw, mask=mask_raw, prompt=prompt, model=model, n=n, size=size, ext=ext,
        strength=strength, limits=settings.limits,
    )  # fmt: skip
    encoded = await adapter.serve(request, build, _encoder(output_format, output_compression))
    return _respond(request, store, encoded, response_format, output_format)


@router.post("/images/variations", response_model=ImagesResponse, response_model_exclude_none=True, responses=_ERRORS)
async def create_variation(
    request: Request,
    settings: SettingsDep,
    store: UrlStoreDep,
    image: Annotated[UploadFile, File(description="The picture to vary (PNG/JPEG/WebP)")],
    model: FormStr = None,
    n: Annotated[int, Form()] = 1,
    size: FormStr = None,
    response_format: Annotated[ResponseFormat | None, Form()] = None,
    output_format: Annotated[OutputFormat, Form()] = "png",
    output_compression: Annotated[int | None, Form(ge=0, le=100)] = None,
    prompt: Annotated[
        str | None, Form(description="Extension: steer the variation (default: a neutral prompt)")
    ] = None,
    strength: Annotated[float | None, Form(description="Extension: how far from the original (default 0.6)")] = None,
    negative_prompt: FormStr = None,
    seed: FormInt = None,
    steps: FormInt = None,
    guidance_scale: FormFloat = None,
    sampler: FormStr = None,
    clip_skip: FormInt = None,
    user: FormStr = None,
) -> ImagesResponse:
    """Variations of an image (OpenAI's `images.create_variation`): img2img of the whole picture (its
    transparency is not a mask here)."""
    await _note_unused_fields(request)
    raw = await image.read()
    ext = Extensions(
        negative_prompt=negative_prompt, seed=seed, steps=steps, guidance_scale=guidance_scale, sampler=sampler,
        clip_skip=clip_skip,
    )  # fmt: skip
    build = partial(
        edit_request, image=raw, mask=None, prompt=prompt or VARIATION_PROMPT, model=model, n=n, size=size, ext=ext,
        strength=0.6 if strength is None else strength, limits=settings.limits, transparency_is_mask=False,
    )  # fmt: skip
    encoded = await adapter.serve(request, build, _encoder(output_format, output_compression))
    return _respond(request, store, encoded, response_format, output_format)


@router.get(
    "/images/files/{token}",
    name="openai_image_file",
    response_class=Response,
    responses={200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}}, 404: _ERRORS[404]},
)
async def image_file(token: str, store: UrlStoreDep) -> Response:
    """An image returned as a URL (`response_format=url`); it expires after `image_url_ttl` seconds."""
    stored = store.get(token)
    return Response(stored.data, media_type=stored.media_type, headers={"Cache-Control": "private, no-store"})


@router.get("/models", response_model=ModelList)
async def list_models(engine: EngineDep) -> ModelList:
    """The models this server serves (the base model first); use an `id` as `model`."""
    return ModelList(data=[ModelOut(id=spec.name) for spec in engine.models()])


@router.get("/models/{model_id}", response_model=ModelOut, responses={404: _ERRORS[404]})
async def get_model(model_id: str, engine: EngineDep) -> ModelOut:
    return ModelOut(id=engine.registry.spec(model_id).name)
