"""A1111's listing and utility routes that clients call at start-up (a missing route breaks some of
them): real content where sdserver has it, an honest empty list where it has not (no hypernetworks,
face restorers, prompt styles or extensions here)."""

from __future__ import annotations

from typing import Any

import psutil
from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from sdserver.api.deps import EngineDep, SettingsDep
from sdserver.api.fields import GuardedRoute
from sdserver.api.security import PrincipalDep

listings = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111 API"], route_class=GuardedRoute)

SECRET = frozenset({"hf_token", "api_keys", "admin_keys", "webhook_secret"})
# A1111's command-line flags that have an sdserver setting of the same meaning.
FLAGS = {
    "ckpt_dir": "models_dir", "lora_dir": "loras_dir", "embeddings_dir": "embeddings_dir",
    "esrgan_models_path": "upscalers_dir", "controlnet_dir": "controlnet_dir", "port": "port",
    "outdir_samples": "outputs_dir", "device_id": "device", "cors_allow_origins": "cors_origins",
}  # fmt: skip


@listings.get("/cmd-flags")
async def cmd_flags(settings: SettingsDep, principal: PrincipalDep) -> dict[str, Any]:
    """A1111's flags where sdserver has the setting (`sdserver` holds every setting but the secrets);
    folders and the model are shown to the admin key only."""
    own = settings.model_dump(mode="json", exclude=set(SECRET))
    if not principal.admin:
        own = {name: value for name, value in own.items() if not _is_path(name)}
    flags: dict[str, Any] = {flag: own.get(name) for flag, name in FLAGS.items() if name in own}
    return {**flags, "api": True, "nowebui": True, "listen": settings.host != "127.0.0.1", "sdserver": own}


def _is_path(name: str) -> bool:
    return name in {"model", "custom_models", "outputs_dir", "encoders"} or name.endswith("_dir")


@listings.get("/hypernetworks")
async def hypernetworks() -> list[dict[str, Any]]:
    return []


@listings.get("/face-restorers")
async def face_restorers() -> list[dict[str, Any]]:
    """None: restore_faces is reported in info.notes and not applied."""
    return []


@listings.get("/prompt-styles")
async def prompt_styles() -> list[dict[str, Any]]:
    return []


@listings.get("/scripts")
async def scripts() -> dict[str, list[str]]:
    """No selectable scripts (script_name is reported in info.notes and not run)."""
    return {"txt2img": [], "img2img": []}


@listings.get("/script-info")
async def script_info() -> list[dict[str, Any]]:
    return []


@listings.get("/extensions")
async def extensions() -> list[dict[str, Any]]:
    return []


@listings.get("/memory")
async def memory(engine: EngineDep) -> dict[str, Any]:
    """A1111's shape: the process's RAM, and the accelerator's memory (or an `error` on a CPU)."""
    process = psutil.Process()
    ram = psutil.virtual_memory()
    stats = await run_in_threadpool(engine.stats)
    device = stats["device_memory_bytes"]
    cuda: dict[str, Any] = {"error": "no accelerator memory to report on this device"}
    if device:
        allocated, reserved = int(device["allocated"]), int(device["reserved"])
        cuda = {"system": {"used": reserved}, "active": {"current": allocated}, "allocated": {"current": allocated},
                "reserved": {"current": reserved}}  # fmt: skip
    return {
        "ram": {"free": ram.available, "used": process.memory_info().rss, "total": ram.total},
        "cuda": cuda,
    }
