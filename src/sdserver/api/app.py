"""The FastAPI application: wires settings, engine and scheduler to every protocol's router."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Protocol

from fastapi import APIRouter, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool

from sdserver import __version__
from sdserver.api import a1111, errors, history, models, openai, ops, studio
from sdserver.api.jobs import router as jobs_router
from sdserver.api.middleware import BodySizeLimit, PagePolicy, RequestLog
from sdserver.api.original import router as original_router
from sdserver.api.security import ApiKeyAuth, HostCheck, is_loopback
from sdserver.core.errors import ConfigError, ModelLoadError
from sdserver.service.history import History
from sdserver.service.jobs import JobStore
from sdserver.service.metrics import Metrics
from sdserver.service.scheduler import Scheduler
from sdserver.settings import Settings

if TYPE_CHECKING:
    from sdserver.engine import Engine

log = logging.getLogger(__name__)
# Swagger UI and ReDoc run inline scripts and styles; everything else they need comes from this server.
DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


class Backend(Protocol):
    """Generation somewhere else than in this process (sdserver.cluster: engine replicas on Ray Serve).

    It lends the app its model catalogue (`engine`), its history and extra routes, and at start-up
    gives the scheduler that the routes submit to (same methods as service.scheduler.Scheduler)."""

    @property
    def engine(self) -> Engine: ...

    @property
    def history(self) -> History: ...

    @property
    def routers(self) -> Sequence[APIRouter]: ...

    async def start(self, app: FastAPI, metrics: Metrics) -> Any: ...

    async def stop(self) -> None: ...


def add_engine_gauges(metrics: Metrics, scheduler: Scheduler, engine: Engine) -> None:
    """The gauges read at scrape time: the queue, the loaded models, the device's memory."""
    metrics.add_gauges(
        "sdserver_queue",
        "Jobs waiting (depth), and images in the running batch (running_rows)",
        lambda: {"depth": scheduler.queue_depth, "running_rows": scheduler.running_rows},
    )
    metrics.add_gauges(
        "sdserver_models",
        "Models loaded, loads and unloads so far, bytes of loaded weights",
        lambda: engine.stats()["models"],
    )
    metrics.add_gauges(
        "sdserver_device_memory_bytes", "Accelerator memory", lambda: engine.stats()["device_memory_bytes"]
    )


def create_app(
    settings: Settings,
    engine: Engine | None = None,
    *,
    loaded: bool = False,
    on_fatal: Callable[[], None] | None = None,
    wait_for_models: bool = True,
    on_load_error: Callable[[], None] | None = None,
    backend: Backend | None = None,
) -> FastAPI:
    """Build the app. The engine's models load during start-up unless `loaded` says they already are.

    With `wait_for_models` (tests, embedding) start-up returns once they are loaded; without it (the
    CLI) they load in a thread while the server already answers: /health 200, /ready and every route
    that needs a model 503 "loading". A failed load is logged as one "cannot start" line and
    `on_load_error` is called. `on_fatal` is called if the worker thread dies.
    With a `backend`, requests run there instead (no engine, scheduler or history in this process).
    """
    metrics = Metrics()

    def start_up() -> None:
        """Build the engine (importing torch), load its models, start the worker."""
        if app.state.engine is None:
            from sdserver.engine import Engine

            app.state.engine = Engine.from_settings(settings)
        if not loaded:
            app.state.engine.load()
        scheduler = Scheduler(
            app.state.engine,
            max_queue=settings.max_queue,
            max_batch_size=settings.max_batch_size,
            batch_window_s=settings.batch_window_ms / 1000,
            queue_timeout_s=settings.queue_timeout,
            jobs=JobStore(ttl_s=settings.job_ttl, max_kept=settings.max_jobs_kept),
            metrics=metrics,
            on_worker_death=on_fatal,
            batching=settings.batching,
            switch_after_steps=settings.switch_after_steps,
            history=app.state.history,
        )
        add_engine_gauges(metrics, scheduler, app.state.engine)
        scheduler.start()
        app.state.scheduler = scheduler  # from now on the routes that need a model answer
        log.info("ready: serving %s", ", ".join(app.state.engine.registry.names()))

    def start_up_in_background() -> None:
        try:
            start_up()
        except (ConfigError, ModelLoadError) as exc:
            log.error("cannot start: %s", exc.message)
        except Exception:
            log.exception("cannot start: loading the models failed")
        else:
            return
        if on_load_error is not None:
            on_load_error()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if backend is not None:
            app.state.scheduler = await backend.start(app, metrics)
            try:
                yield
            finally:
                await backend.stop()
            return
        _log_history(app.state.history)
        if wait_for_models:
            await run_in_threadpool(start_up)
        else:
            threading.Thread(target=start_up_in_background, name="sdserver-loader", daemon=True).start()
        try:
            yield
        finally:
            scheduler: Scheduler | None = getattr(app.state, "scheduler", None)
            if scheduler is not None:
                await run_in_threadpool(_finish, scheduler, settings.drain_timeout)
            await run_in_threadpool(app.state.history.close)  # finish the writes under way

    # Swagger UI and ReDoc from files in the fastapi-offline package: /docs works with no network.
    app = FastAPIOffline(
        title="sdserver",
        version=__version__,
        description="A local Stable Diffusion server: the original Stable Diffusion API Server's API, "
        "a jobs API, and more, over one queue.",
        lifespan=lifespan,
        swagger_ui_parameters={"validatorUrl": None},  # no badge fetched from swagger.io
    )
    _document_auth(app, settings)
    app.state.settings = settings
    app.state.history = backend.history if backend is not None else History.from_settings(settings)
    app.state.engine = backend.engine if backend is not None else engine
    app.state.scheduler = None
    app.state.metrics = metrics
    errors.install(app)
    for router in (
        *(backend.routers if backend is not None else ()),
        ops.router,
        models.router,
        original_router,
        jobs_router,
        history.router,
        openai.router,
        a1111.router,
    ):
        app.include_router(router)
    studio.install(app)
    errors.register_renderer("/v1/", errors.render_v1)
    errors.register_renderer("/sdapi/", a1111.render_error)
    errors.register_renderer("/controlnet/", a1111.render_error)
    # The last added runs first: log → Host check (beyond localhost) → CORS (so even a 401 or 413 is
    # readable by an allowed page) → the pages' content security policy → body size limit → auth → routes.
    app.add_middleware(ApiKeyAuth, settings=settings)
    app.add_middleware(BodySizeLimit, max_bytes=int(settings.max_body_mb * 1e6))
    app.add_middleware(PagePolicy, policies={"/": studio.CSP, "/docs": DOCS_CSP, "/redoc": DOCS_CSP})
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"], allow_headers=["*"]
        )
    if not is_loopback(settings.host):
        app.add_middleware(HostCheck, allowed=HostCheck.names_for(settings))
    app.add_middleware(RequestLog, metrics=metrics)
    return app


def _finish(scheduler: Scheduler, drain_timeout: float) -> None:
    """At shutdown: finish the queued and running work (a drain usually did already), then stop."""
    if scheduler.stopping:
        return  # stopped at once (a second Ctrl-C): no waiting for the worker's current step
    if not scheduler.drain(drain_timeout):
        log.warning("drain timeout (%gs) reached: failing what is left", drain_timeout)
    scheduler.stop()


def _log_history(kept: History) -> None:
    if not kept.enabled:
        log.info("history: off (nothing is saved)")
        return
    budget = "" if kept.max_bytes is None else f", at most {kept.max_bytes / 1e9:g} GB"
    log.info(
        "history: saving %s images to %s%s",
        "all" if kept.mode == "all" else "the studio's and jobs API's",
        kept.folder,
        budget,
    )


def _document_auth(app: FastAPI, settings: Settings) -> None:
    """Declare the API keys in the OpenAPI document, so /docs can send one ("Authorize")."""
    if not settings.auth_enabled:
        return
    plain = app.openapi

    def openapi() -> dict[str, Any]:
        schema = plain()
        schemes = {"bearer": {"type": "http", "scheme": "bearer"}} if settings.api_keys else {}
        if settings.api_auth:
            schemes["basic"] = {"type": "http", "scheme": "basic"}
        schema.setdefault("components", {})["securitySchemes"] = schemes
        schema["security"] = [{name: []} for name in schemes]
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
