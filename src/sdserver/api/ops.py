"""Operational routes: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from sdserver.api.fields import GuardedRoute

router = APIRouter(tags=["operations"], route_class=GuardedRoute)


@router.get("/health")
async def health() -> dict[str, str]:
    """The process is alive and answering."""
    return {"status": "ok"}


@router.get("/ready", responses={503: {"description": "loading, draining, or the worker died"}})
async def ready(request: Request) -> Response:
    """Models loaded and the worker alive and accepting work; 503 otherwise."""
    cluster = getattr(request.app.state, "cluster", None)
    if cluster is not None:  # on Ray Serve: the engine replicas' readiness (sdserver.cluster)
        response: Response = await cluster.ready()
        return response
    scheduler = getattr(request.app.state, "scheduler", None)
    if scheduler is None:
        return JSONResponse({"status": "loading"}, status_code=503)
    if not scheduler.alive:
        return JSONResponse({"status": "worker stopped"}, status_code=503)
    if not scheduler.accepting:
        return JSONResponse({"status": "draining"}, status_code=503)
    names = request.app.state.engine.registry.names()
    return JSONResponse({"status": "ready", "models": names, "queue_depth": scheduler.queue_depth})


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    return Response(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4")
