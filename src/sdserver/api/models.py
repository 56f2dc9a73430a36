"""Model management: list every selectable model, load and unload them, rescan models_dir."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from sdserver.api.deps import EngineDep
from sdserver.api.fields import GuardedRoute
from sdserver.api.security import PrincipalDep
from sdserver.engine import Engine

router = APIRouter(tags=["models"], route_class=GuardedRoute)
_ADMIN: dict[int | str, dict[str, Any]] = {403: {"description": "not the admin key (on a server with keys)"}}


class ModelOut(BaseModel):
    name: str  # what requests name it by
    label: str
    source: Literal["base", "custom_models", "models_dir"]  # where it was configured
    kind: str  # sd1, sd2, sdxl, or unknown (from the UNet's cross-attention width)
    inpainting: bool | None  # a 9-channel inpainting UNet; null when unknown
    loaded: bool
    native_size: int | None  # the side (px) it draws best at, by default; null until it has loaded
    samplers: list[str]  # the `sampler` names valid for it


def _describe(engine: Engine, name: str) -> ModelOut:
    info = engine.registry.info(name)
    return ModelOut(
        name=info.name,
        label=info.label,
        source=info.origin,
        kind=info.kind,
        inpainting=info.inpainting,
        loaded=info.loaded,
        native_size=engine.native_size(name),
        samplers=engine.samplers(name),
    )


def _describe_all(engine: Engine) -> list[ModelOut]:
    return [_describe(engine, name) for name in engine.registry.names()]


@router.get("/models")
async def list_models(engine: EngineDep) -> list[ModelOut]:
    """Every selectable model: the base model, custom_models, and the folders in models_dir."""
    return await run_in_threadpool(_describe_all, engine)


@router.post("/models/refresh", responses=_ADMIN)
async def refresh_models(engine: EngineDep, principal: PrincipalDep) -> list[ModelOut]:
    """Rescan models_dir without a restart: new folders become models, removed ones go (admin key)."""
    principal.require_admin("rescan the models")
    await run_in_threadpool(engine.registry.refresh)
    return await run_in_threadpool(_describe_all, engine)


@router.post(
    "/models/{name}/load",
    responses={404: {"description": "no such model"}, 503: {"description": "load failed"}, **_ADMIN},
)
async def load_model(name: str, engine: EngineDep, principal: PrincipalDep) -> ModelOut:
    """Load a model now (it may unload the least recently used one to stay within the budget; admin key)."""
    principal.require_admin("load models")
    await run_in_threadpool(engine.registry.get, name)
    return await run_in_threadpool(_describe, engine, name)


@router.post(
    "/models/{name}/unload",
    responses={
        400: {"description": "the base model"},
        404: {"description": "no such model"},
        503: {"description": "in use"},
        **_ADMIN,
    },
)
async def unload_model(name: str, engine: EngineDep, principal: PrincipalDep) -> ModelOut:
    """Unload a model and return its memory; it loads again on its next use. The base model stays (admin key)."""
    principal.require_admin("unload models")
    await run_in_threadpool(engine.registry.unload, name)
    return await run_in_threadpool(_describe, engine, name)
