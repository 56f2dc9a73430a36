"""Routes of the jobs API: thin wrappers over the scheduler's jobs."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from sdserver.api import adapter
from sdserver.api.deps import HistoryDep, SchedulerDep, SettingsDep
from sdserver.api.fields import GuardedRoute, read_json
from sdserver.api.jobs.protocol import (
    JobCreated,
    JobOut,
    QueueOut,
    job_out,
    parse_submission,
    progress_out,
    request_body_schema,
)
from sdserver.api.jobs.webhooks import WebhookSender
from sdserver.api.security import Principal, PrincipalDep
from sdserver.core.errors import InvalidRequest
from sdserver.imaging import encode_png, png_base64
from sdserver.service.history import History
from sdserver.service.jobs import Job, JobStatus
from sdserver.service.scheduler import Scheduler

router = APIRouter(prefix="/v1", tags=["jobs"], route_class=GuardedRoute)
KEEPALIVE_S = 15.0
HISTORY_WAIT_S = 30.0  # the final event waits this long at most for the images to be saved


@router.post(
    "/jobs",
    status_code=202,
    response_model=JobCreated,
    openapi_extra={
        "requestBody": {"required": True, "content": {"application/json": {"schema": request_body_schema()}}}
    },
)
async def submit_job(
    request: Request,
    settings: SettingsDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JobCreated:
    """Queue a generation (any task, any model). A repeated `Idempotency-Key` with the same body
    returns the same job; with another body it is a 422."""
    body = await read_json(request)
    generation, options = await run_in_threadpool(parse_submission, body, settings.limits)
    sender: WebhookSender | None = None
    if options.webhook_url is not None:
        if not settings.allow_webhooks:
            raise InvalidRequest("webhook_url: webhooks are disabled on this server (--allow-webhooks)")
        sender = WebhookSender.from_settings(settings)
        await run_in_threadpool(sender.check_target, str(options.webhook_url))
    job = await adapter.submit(
        request,
        generation,
        idempotency_key=idempotency_key,
        preview_every=options.preview_every,
        save=options.save,
        fingerprint=_fingerprint(body),
    )
    if sender is not None and options.webhook_url is not None:
        _send_when_done(job, sender, str(options.webhook_url))
    scheduler: Scheduler = request.app.state.scheduler
    return JobCreated(id=job.id, status=job.status.value, queue_position=scheduler.queue_position(job))


def _fingerprint(body: dict[str, Any]) -> str:
    """Of the request as sent (the same JSON in any key order or spacing is the same request)."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _send_when_done(job: Job, sender: WebhookSender, url: str) -> None:
    def on_change(changed: Job) -> None:
        if changed.done:
            changed.remove_listener(on_change)
            sender.deliver_in_background(url, job_out(changed, None).model_dump_json())

    job.add_listener(on_change)


def _mine(principal: Principal) -> Callable[[str | None], bool]:
    return principal.owns


@router.get("/jobs/{job_id}", response_model=JobOut)
async def get_job(job_id: str, scheduler: SchedulerDep, principal: PrincipalDep) -> JobOut:
    """Status, progress (step/total, percent, ETA), queue position, timings, and the images when done.
    Another key's job is a 404 (the admin key sees every job)."""
    job = scheduler.get(job_id, _mine(principal))
    return await run_in_threadpool(job_out, job, scheduler.queue_position(job))


@router.delete("/jobs/{job_id}", response_model=JobOut)
async def cancel_job(job_id: str, scheduler: SchedulerDep, principal: PrincipalDep) -> JobOut:
    """Cancel: a queued job at once, a running one at its next denoising step."""
    job = scheduler.cancel(job_id, _mine(principal))
    return job_out(job, scheduler.queue_position(job), with_images=False)


@router.get("/jobs/{job_id}/images/{index}", response_class=Response)
async def get_image(job_id: str, index: int, scheduler: SchedulerDep, principal: PrincipalDep) -> Response:
    """One finished image as a PNG file."""
    job = scheduler.get(job_id, _mine(principal))
    if job.result is None or not 0 <= index < len(job.result.images):
        raise InvalidRequest(f"index: job {job_id} has no image {index} (status {job.status.value})", field="index")
    return Response(await run_in_threadpool(encode_png, job.result.images[index].image), media_type="image/png")


@router.get("/jobs/{job_id}/events", response_class=StreamingResponse)
async def job_events(
    job_id: str, scheduler: SchedulerDep, history: HistoryDep, principal: PrincipalDep
) -> StreamingResponse:
    """Server-Sent Events: `progress` events (with a base64 PNG `preview` when asked for), then one
    final event named after the outcome (`succeeded` with the images, `failed`, `cancelled`), sent once
    the images are in the history (each image's `history_id`) or failed to be saved (`warnings`)."""
    job = scheduler.get(job_id, _mine(principal))
    return StreamingResponse(
        _event_stream(job, scheduler, history),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _event_stream(job: Job, scheduler: Scheduler, history: History) -> AsyncIterator[str]:
    loop = asyncio.get_running_loop()
    changed = asyncio.Event()

    def on_change(_: Job) -> None:
        loop.call_soon_threadsafe(changed.set)

    job.add_listener(on_change)
    try:
        last_preview = None
        yield _sse("status", {"status": job.status.value, "queue_position": scheduler.queue_position(job)})
        while not job.done:
            try:
                await asyncio.wait_for(changed.wait(), KEEPALIVE_S)
            except TimeoutError:
                yield ": keep-alive\n\n"
                continue
            changed.clear()
            if job.done:
                break
            event: dict[str, Any] = {"status": job.status.value, "queue_position": scheduler.queue_position(job)}
            progress = progress_out(job)
            if progress is not None:
                event["progress"] = progress.model_dump()
            if job.preview is not None and job.preview is not last_preview:
                last_preview = job.preview
                event["preview"] = png_base64(job.preview)
            yield _sse("progress", event)
        await run_in_threadpool(history.wait, job, HISTORY_WAIT_S)
        final = await run_in_threadpool(job_out, job, None)
        yield _sse(job.status.value, final.model_dump(mode="json"))
    finally:
        job.remove_listener(on_change)


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


@router.get("/queue", response_model=QueueOut)
async def list_queue(scheduler: SchedulerDep, principal: PrincipalDep) -> QueueOut:
    """The caller's jobs the server still remembers (finished ones for --job-ttl seconds), oldest
    first; the admin key sees every job."""
    jobs = scheduler.jobs.all(_mine(principal))
    return QueueOut(
        queued=sum(job.status is JobStatus.QUEUED for job in jobs),
        running=sum(job.status is JobStatus.RUNNING for job in jobs),
        jobs=[job_out(job, scheduler.queue_position(job), with_images=False) for job in jobs],
    )
