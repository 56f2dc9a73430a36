"""Waiting for a job on behalf of a synchronous HTTP client, shared by every protocol."""

from __future__ import annotations

import asyncio

from fastapi import Request

from sdserver.core.errors import Cancelled
from sdserver.core.types import GenerationRequest, GenerationResult
from sdserver.service.scheduler import Scheduler

DISCONNECT_POLL_S = 0.25


async def generate(request: Request, scheduler: Scheduler, generation: GenerationRequest) -> GenerationResult:
    """Queue `generation` and wait for it; if the client hangs up meanwhile, cancel the job
    (out of the queue, or stopped at its next denoising step)."""
    job = scheduler.submit(generation)
    waiter = asyncio.ensure_future(job.wait_async())
    try:
        while True:
            done, _ = await asyncio.wait({waiter}, timeout=DISCONNECT_POLL_S)
            if done:
                return waiter.result()
            if await request.is_disconnected():
                scheduler.cancel(job.id)
                raise Cancelled("the client disconnected")
    finally:
        if not waiter.done():
            waiter.cancel()
        if not job.done:
            scheduler.cancel(job.id)
