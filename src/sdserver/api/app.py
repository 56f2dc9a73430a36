"""The FastAPI application: wires settings, engine and scheduler to every protocol's router."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from sdserver import __version__
from sdserver.api import a1111, errors, openai
from sdserver.api.jobs import router as jobs_router
from sdserver.api.original import router as original_router
from sdserver.engine import Engine
from sdserver.service.jobs import JobStore
from sdserver.service.scheduler import Scheduler
from sdserver.settings import Settings

log = logging.getLogger(__name__)


def create_app(settings: Settings, engine: Engine | None = None, *, loaded: bool = False) -> FastAPI:
    """Build the app. The engine's models load during start-up unless `loaded` says they already are."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not loaded:
            await run_in_threadpool(app.state.engine.load)
        scheduler = Scheduler(
            app.state.engine,
            max_queue=settings.max_queue,
            max_batch_size=settings.max_batch_size,
            batch_window_s=settings.batch_window_ms / 1000,
            queue_timeout_s=settings.queue_timeout,
            jobs=JobStore(ttl_s=settings.job_ttl, max_kept=settings.max_jobs_kept),
        )
        scheduler.start()
        app.state.scheduler = scheduler
        log.info("ready: serving %s", ", ".join(app.state.engine.registry.names()))
        try:
            yield
        finally:
            await run_in_threadpool(scheduler.stop)

    app = FastAPI(
        title="sdserver",
        version=__version__,
        description="A local Stable Diffusion server speaking the original Stable Diffusion API Server's API.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine or Engine.from_settings(settings)
    errors.install(app)
    app.include_router(original_router)
    app.include_router(jobs_router)
    app.include_router(openai.router)
    app.include_router(a1111.router)
    errors.register_renderer("/v1/", errors.render_v1)
    errors.register_renderer("/sdapi/", a1111.render_error)
    return app
