"""Waiting for a job on behalf of a synchronous HTTP client, shared by every protocol."""

from __future__ import annotations

import asyncio
from functools import partial

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from sdserver.api.middleware import note
from sdserver.core.errors import Cancelled
from sdserver.core.types import GenerationRequest, GenerationResult
from sdserver.service.scheduler import Scheduler

DISCONNECT_POLL_S = 0.25


async def generate(
    request: Request, scheduler: Scheduler, generation: GenerationRequest, *, save: bool = False
) -> GenerationResult:
    """Queue `generation` and wait for it; if the client hangs up meanwhile, cancel the job
    (out of the queue, or stopped at its next denoising step). `save`: the client asked for the
    images to be kept in the history."""
    # submit prepares the request (resizes its images): off the event loop
    job = await run_in_threadpool(partial(scheduler.submit, generation, save=save))
    r = job.request
    note(model=r.model, task=r.task.value, size=f"{r.width}x{r.height}", steps=r.steps, images=r.num_images)
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
