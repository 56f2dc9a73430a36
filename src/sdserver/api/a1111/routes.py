"""Routes of the AUTOMATIC1111 API (`/sdapi/v1/*`), plus the protocol-neutral `POST /png-info`.

State that A1111 keeps globally (the selected checkpoint, CLIP skip, preview interval) lives in
`app.state.a1111_options` (a typed table of A1111's options: options.py) and applies to A1111
requests only; only the admin key may change it. Progress and interrupt see the caller's own jobs.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Body, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from sdserver.api import adapter
from sdserver.api.a1111 import controlnet, extras
from sdserver.api.a1111 import options as a1111_options
from sdserver.api.a1111.listings import listings
from sdserver.api.a1111.protocol import (
    ImagesOut,
    Img2ImgBody,
    PngInfoBody,
    PngInfoOut,
    Txt2ImgBody,
    generation_request,
    resolve_checkpoint,
    response,
    samplers,
    schedulers,
    title,
)
from sdserver.api.deps import EngineDep, SchedulerDep
from sdserver.api.fields import GuardedRoute
from sdserver.api.middleware import note
from sdserver.api.security import Principal, PrincipalDep
from sdserver.core.errors import InvalidRequest, SDServerError
from sdserver.core.types import Task
from sdserver.imaging import b64decode, png_base64
from sdserver.metadata import JSON_KEY, parse_infotext, read_info
from sdserver.service.jobs import Job, JobStatus
from sdserver.service.scheduler import Scheduler
from sdserver.settings import is_hub_id

if TYPE_CHECKING:
    from sdserver.engine import Engine

sdapi = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111 API"], route_class=GuardedRoute)
router = APIRouter(route_class=GuardedRoute)  # sdapi's routes and /png-info (included at the end of this module)


def render_error(error: SDServerError, status: int) -> Response:
    """AUTOMATIC1111's error shapes: FastAPI's 422 `{"detail": [{"loc", "msg", "type"}]}` for bad
    input, else its API's `{"error", "detail", "body", "errors"}`."""
    if isinstance(error, InvalidRequest) and status == 400:
        loc = ["body", error.field] if error.field else ["body"]
        return JSONResponse({"detail": [{"loc": loc, "msg": error.message, "type": "value_error"}]}, status_code=422)
    body = {"error": type(error).__name__, "detail": error.message, "body": "", "errors": f"{status}: {error.message}"}
    return JSONResponse(body, status_code=status)


class Options:
    """A1111's global options: the selected model, and the typed table of A1111's options."""

    def __init__(self, engine: Engine) -> None:
        self.model: str = engine.registry.base_name
        self.values: dict[str, Any] = dict(a1111_options.DEFAULTS)


def _options(request: Request, engine: EngineDep) -> Options:
    options: Options | None = getattr(request.app.state, "a1111_options", None)
    if options is None:
        options = Options(engine)
        request.app.state.a1111_options = options
    return options


OptionsDep = Annotated[Options, Depends(_options)]


def _titles(engine: Engine) -> dict[str, str]:
    return {name: title(name, engine.model_hash(name)) for name in engine.registry.names()}


async def _generate(request: Request, body: Txt2ImgBody, task: Task, engine: Engine, options: Options) -> ImagesOut:
    overrides = a1111_options.check(body.override_settings or {}, "override_settings.")
    model = options.model
    if overrides.get("sd_model_checkpoint"):
        titles = await run_in_threadpool(_titles, engine)
        model = resolve_checkpoint(overrides["sd_model_checkpoint"], titles)
    clip_skip = overrides.get("CLIP_stop_at_last_layers", options.values["CLIP_stop_at_last_layers"])
    limits = request.app.state.settings.limits
    unused = a1111_options.unhonoured(overrides)

    def render(generation: Any, result: Any) -> ImagesOut:
        model_hash, embedding_notes = engine.model_hash(generation.model), engine.embedding_notes(generation)
        return response(body, generation, result, model_hash, unused, embedding_notes)

    build = lambda: generation_request(body, task, model, clip_skip, limits)  # noqa: E731
    # /interrupt and /skip: A1111 answers normally, here with no images
    return await adapter.serve(request, build, render, answer_when_cancelled=True, save=body.save_images)


@sdapi.post("/txt2img", response_model=ImagesOut)
async def txt2img(body: Txt2ImgBody, request: Request, engine: EngineDep, options: OptionsDep) -> ImagesOut:
    """Text to image. `batch_size` x `n_iter` images run as one batched call; `seed` -1 is random."""
    return await _generate(request, body, Task.TXT2IMG, engine, options)


@sdapi.post("/img2img", response_model=ImagesOut)
async def img2img(body: Img2ImgBody, request: Request, engine: EngineDep, options: OptionsDep) -> ImagesOut:
    """Image to image (`init_images`, `denoising_strength`), inpainting with a `mask` (white = repaint,
    or black with `inpainting_mask_invert` 1; softened by `mask_blur` px). The output has `width` x `height`
    (`resize_mode` says how a picture of another aspect gets there), except with `inpaint_full_res` (A1111's
    default): the mask's box is worked at `width` x `height` and pasted back onto the picture at its own size."""
    return await _generate(request, body, Task.IMG2IMG, engine, options)


@sdapi.get("/progress")
async def progress(
    scheduler: SchedulerDep,
    options: OptionsDep,
    principal: PrincipalDep,
    skip_current_image: Annotated[bool, Query()] = False,
) -> dict[str, Any]:
    """The caller's running job's progress (0..1), ETA in seconds, and a preview as `current_image`.

    Previews are decoded only once a client asks for them (every `show_progress_every_n_steps`)."""
    jobs = scheduler.jobs.all(principal.owns)
    running = [job for job in jobs if job.status is JobStatus.RUNNING]
    queued = sum(job.status is JobStatus.QUEUED for job in jobs)
    state: dict[str, Any] = {
        "skipped": False,
        "interrupted": False,
        "stopping_generation": False,
        "job": "",
        "job_count": len(running) + queued,
        "job_timestamp": "0",
        "job_no": 0,
        "sampling_step": 0,
        "sampling_steps": 0,
    }
    if not running:
        return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None}
    job = running[0]
    step, total = (job.progress.step, job.progress.total) if job.progress is not None else (0, 0)
    state.update(job=f"job {job.id}", interrupted=job.cancel_requested, sampling_step=step, sampling_steps=total)
    current_image = None
    if not skip_current_image:
        if job.preview_every == 0:
            every: int = options.values["show_progress_every_n_steps"]  # an int: the table is typed
            job.preview_every = every if every > 0 else 1
        if job.preview is not None:
            current_image = await run_in_threadpool(png_base64, job.preview)
    return {
        "progress": round(step / total, 4) if total else 0.0,
        "eta_relative": round(job.eta_s or 0.0, 3),
        "state": state,
        "current_image": current_image,
        "textinfo": f"step {step} of {total}" if total else "starting",
    }


def _stop_running(scheduler: Scheduler, principal: Principal) -> None:
    running: list[Job] = [job for job in scheduler.jobs.all(principal.owns) if job.status is JobStatus.RUNNING]
    for job in running:
        scheduler.cancel(job.id)


@sdapi.post("/interrupt")
async def interrupt(scheduler: SchedulerDep, principal: PrincipalDep) -> None:
    """Stop the caller's running generation at its next step (its request answers with no images)."""
    _stop_running(scheduler, principal)


@sdapi.post("/skip")
async def skip(scheduler: SchedulerDep, principal: PrincipalDep) -> None:
    """As /interrupt: sdserver runs a request's images as one batch, so there is no next one to go on to."""
    _stop_running(scheduler, principal)


def _shown_path(source: str, principal: Principal) -> str:
    """Where a file lives only to the admin key; others get the file name (item: no path disclosure)."""
    if (principal.admin and principal.authenticated) or is_hub_id(source):
        return source
    return Path(source).name


@sdapi.get("/sd-models")
async def sd_models(engine: EngineDep, principal: PrincipalDep) -> list[dict[str, Any]]:
    """The configured models; `title` (or `model_name`) selects one in options or override_settings.
    `filename` is the file's name (its full path for the admin key)."""
    titles = await run_in_threadpool(_titles, engine)
    out = []
    for spec in engine.models():
        full = await run_in_threadpool(engine.model_hash, spec.name)
        out.append(
            {
                "title": titles[spec.name],
                "model_name": spec.name,
                "hash": full[:10] if full else None,
                "sha256": full,
                "filename": _shown_path(spec.source, principal),
                "config": None,
            }
        )
    return out


@sdapi.post("/refresh-checkpoints")
async def refresh_checkpoints(engine: EngineDep, principal: PrincipalDep) -> None:
    """Rescan models_dir: new checkpoints become selectable, removed ones go (the admin key only)."""
    principal.require_admin("rescan the models")
    await run_in_threadpool(engine.registry.refresh)


@sdapi.get("/samplers")
async def list_samplers() -> list[dict[str, Any]]:
    return samplers()


@sdapi.get("/schedulers")
async def list_schedulers() -> list[dict[str, Any]]:
    return schedulers()


@sdapi.get("/loras")
async def loras(engine: EngineDep, principal: PrincipalDep) -> list[dict[str, Any]]:
    """The LoRAs in loras_dir; use one with <lora:name:weight> in a prompt. `path` is the file's name
    (its full path for the admin key)."""
    names = await run_in_threadpool(engine.loras.refresh)
    return [
        {"name": name, "alias": name, "path": _shown_path(str(engine.loras.path(name)), principal), "metadata": {}}
        for name in names
    ]


@sdapi.post("/refresh-loras")
async def refresh_loras(engine: EngineDep) -> None:
    await run_in_threadpool(engine.loras.refresh)


@sdapi.get("/options")
async def get_options(engine: EngineDep, options: OptionsDep) -> dict[str, Any]:
    full = await run_in_threadpool(engine.model_hash, options.model)
    return {
        **options.values,
        "sd_model_checkpoint": title(options.model, full),
        "sd_checkpoint_hash": full,
        "samples_format": "png",
    }


@sdapi.post("/options")
async def set_options(
    engine: EngineDep,
    options: OptionsDep,
    principal: PrincipalDep,
    values: Annotated[
        dict[str, Any],
        Body(examples=[{"sd_model_checkpoint": "my-model", "CLIP_stop_at_last_layers": 2}]),
    ],
) -> None:
    """Set A1111 options (the admin key only; A1111's own names and types, a 400 naming anything
    else): `sd_model_checkpoint` selects the model of later A1111 requests, `CLIP_stop_at_last_layers`
    (1-12) their CLIP skip, `show_progress_every_n_steps` the preview interval. The others are kept
    and echoed, with no effect."""
    principal.require_admin("change AUTOMATIC1111's options")
    updates = a1111_options.check(values)
    model = options.model
    if updates.get("sd_model_checkpoint"):
        titles = await run_in_threadpool(_titles, engine)
        model = resolve_checkpoint(updates.pop("sd_model_checkpoint"), titles)
        await run_in_threadpool(engine.registry.get, model)  # as in A1111, switching loads the checkpoint
    updates.pop("sd_model_checkpoint", None)
    if unused := a1111_options.unhonoured(updates):
        note(options_without_effect=unused)
    options.model = model
    options.values.update(updates)


def _png_info(body: PngInfoBody) -> PngInfoOut:
    """Header chunks only: no pixel is decoded; any text in them parses or is kept as written."""
    try:
        text, structured, others = read_info(b64decode(body.image))
    except ValueError as exc:
        raise InvalidRequest(f"image: {exc}", field="image") from None
    items: dict[str, Any] = dict(others)
    if structured is not None:
        items = {**items, JSON_KEY: structured}
    return PngInfoOut(
        info=text or "", items=items, parameters=parse_infotext(text) if text else {}, parameters_json=structured
    )


@sdapi.post("/png-info", response_model=PngInfoOut)
async def sdapi_png_info(body: PngInfoBody) -> PngInfoOut:
    """The generation parameters inside a PNG: `info` (the A1111 text), `parameters` (parsed)."""
    return await run_in_threadpool(_png_info, body)


@sdapi.get("/embeddings")
async def embeddings(engine: EngineDep, options: OptionsDep) -> dict[str, Any]:
    """The textual-inversion embeddings (embeddings_dir) of the selected checkpoint: `loaded` ones a prompt
    uses by name, and `skipped` ones (another architecture, unreadable), each with its `reason`."""
    return await run_in_threadpool(engine.embeddings, options.model)


@sdapi.post("/refresh-embeddings")
async def refresh_embeddings(engine: EngineDep, scheduler: SchedulerDep) -> None:
    """Register the files added to embeddings_dir with the loaded models (on the worker, between steps)."""
    await asyncio.wrap_future(scheduler.call(engine.refresh_embeddings))


router.include_router(sdapi)
router.include_router(listings)
router.include_router(controlnet.router)  # the sd-webui-controlnet extension's /controlnet/* routes
router.include_router(extras.router)  # /sdapi/v1 upscaling (extras.py)


@router.post("/png-info", response_model=PngInfoOut, tags=["images"])
async def png_info(body: PngInfoBody) -> PngInfoOut:
    """The generation parameters inside a PNG (any sdserver or AUTOMATIC1111 image): `info` (the A1111
    text), `parameters` (parsed), `parameters_json` (sdserver's structured copy)."""
    return await run_in_threadpool(_png_info, body)
