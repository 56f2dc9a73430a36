"""What every protocol adapter shares, in one place: the thread hop, submitting and waiting (a client
that hangs up cancels its job), rendering, seeds, image fields and links.

An adapter's route reads its dialect's fields, then calls `serve(request, build, render)`: `build`
makes the one GenerationRequest (validation and image decoding, off the event loop), and `render`
turns the finished job into the dialect's response (encoding, off the event loop too).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from fastapi import Request
from PIL import Image
from starlette.concurrency import run_in_threadpool

from sdserver.api.middleware import note
from sdserver.api.security import principal_of
from sdserver.core.errors import Cancelled, FieldError
from sdserver.core.images import ImageMode, decode_field, fit, open_field
from sdserver.core.limits import Limits
from sdserver.core.sizing import output_size
from sdserver.core.types import GenerationRequest, GenerationResult
from sdserver.service.jobs import Job
from sdserver.service.scheduler import Scheduler

DISCONNECT_POLL_S = 0.25
R = TypeVar("R")
Render = Callable[[GenerationRequest, GenerationResult | None], R]


async def serve(
    request: Request,
    build: Callable[[], GenerationRequest],
    render: Render[R],
    *,
    answer_when_cancelled: bool = False,
    save: bool = False,
) -> R:
    """Build the request, queue it, wait for it, render the result.

    `render` gets the request as it ran (model, size and seed filled in). With
    `answer_when_cancelled`, a job stopped by a cancel (A1111's /interrupt) is rendered with no
    result instead of failing. `save`: the client asked for the images to be kept in the history."""
    generation = await run_in_threadpool(build)
    job = await submit(request, generation, save=save)
    try:
        result: GenerationResult | None = await wait(request, job)
    except Cancelled:
        if not answer_when_cancelled:
            raise
        result = None
    return await run_in_threadpool(render, job.request, result)


async def submit(request: Request, generation: GenerationRequest, **options: Any) -> Job:
    """Queue `generation` for the calling key (it owns the job). Off the event loop: submitting
    prepares the request (checks it against its model, resizes its images)."""
    scheduler: Scheduler = request.app.state.scheduler
    owner = principal_of(request.scope).name
    job = await run_in_threadpool(lambda: scheduler.submit(generation, owner=owner, **options))
    r = job.request
    note(model=r.model, task=r.task.value, size=f"{r.width}x{r.height}", steps=r.steps, images=r.num_images)
    if owner is not None:
        note(owner=owner)
    return job


async def wait(request: Request, job: Job) -> GenerationResult:
    """Wait for `job` on behalf of a synchronous HTTP client; if the client hangs up meanwhile, cancel
    the job (out of the queue, or stopped at its next denoising step)."""
    scheduler: Scheduler = request.app.state.scheduler
    waiter = asyncio.ensure_future(job.wait_async())
    try:
        while True:
            done, _ = await asyncio.wait({waiter}, timeout=DISCONNECT_POLL_S)
            if done:
                if job.started_at is not None and job.finished_at is not None:
                    note(
                        queue_wait_s=round(job.started_at - job.created_at, 4),
                        run_s=round(job.finished_at - job.started_at, 4),
                    )
                return waiter.result()
            if await request.is_disconnected():
                scheduler.cancel(job.id)
                raise Cancelled("the client disconnected")
    finally:
        if not waiter.done():
            waiter.cancel()
        if not job.done:
            scheduler.cancel(job.id)


def public_base_url(request: Request) -> str:
    """Where links to this server point: `public_url` if set, else the address this connection
    reached (the socket's own address, never the client's Host header, which anyone can forge)."""
    public_url: str | None = request.app.state.settings.public_url
    if public_url:
        return public_url
    server = request.scope.get("server")
    root = request.scope.get("root_path", "").rstrip("/")
    if not server:  # a UNIX socket: nothing better than what the client says (the Host check ran)
        return str(request.base_url).rstrip("/")
    host, port = server[0], server[1]
    host = f"[{host}]" if ":" in host else host
    scheme = request.scope.get("scheme", "http")
    default = (scheme == "http" and port == 80) or (scheme == "https" and port == 443)
    return f"{scheme}://{host}{'' if default or port is None else f':{port}'}{root}"


def random_seed(value: Any) -> Any:
    """The original API's, OpenAI's and A1111's "no seed": 0 or -1 (or nothing) asks for a random seed,
    which the core then picks once and reports. Any other value goes to the core as it is (the jobs
    API sends seeds to the core unchanged: there, 0 is a seed like any other)."""
    if isinstance(value, bool):
        return value
    text = value.strip() if isinstance(value, str) else value
    if text in (None, "", 0, -1, "0", "-1", "0.0", "-1.0"):
        return None
    return value


def ignored(fields: Mapping[str, Any], known: set[str], *, what: str = "ignored_fields") -> list[str]:
    """Fields a client sent that this route does not take: never dropped without a word (they go
    into the request's log line)."""
    unknown = sorted(name for name in fields if name not in known)
    if unknown:
        note(**{what: unknown})
    return unknown


def open_header(value: str | bytes | Image.Image, field: str, limits: Limits, names: Mapping[str, str]) -> Image.Image:
    """An image field's header (format, size, the input limit), nothing decoded: a 400 naming the field."""
    try:
        return open_field(value, field, limits.max_input_pixels)
    except FieldError as exc:
        raise exc.invalid(names) from None


def fitted_images(
    init: str | bytes | Image.Image,
    mask: str | bytes | Image.Image | None,
    width: int | None,
    height: int | None,
    limits: Limits,
    names: Mapping[str, str],
    *,
    keep_alpha: bool = False,
) -> tuple[Image.Image, Image.Image | None]:
    """An init image and its mask decoded at the size that will be generated, for adapters that edit
    the pixels before the core sees them (A1111's mask blur, OpenAI's alpha masks). Headers first
    (the input limit), then the size (core.sizing's one rule, the output limits), then the pixels.

    Both come back RGB, the mask as 8-bit grey (white = repaint); with `keep_alpha`, both RGBA."""
    mode: ImageMode = "RGBA" if keep_alpha else "RGB"
    try:
        opened = open_field(init, "init_image", limits.max_input_pixels)
        opened_mask = None if mask is None else open_field(mask, "mask_image", limits.max_input_pixels)
        size = output_size(width, height, opened.size, limits)
        assert size is not None  # an init image always gives a size
        image = fit(decode_field(opened, "init_image", mode), size)
        if opened_mask is None:
            return image, None
        return image, fit(decode_field(opened_mask, "mask_image", mode), size, mask=not keep_alpha)
    except FieldError as exc:
        raise exc.invalid(names) from None
