"""FastAPI dependencies: the app's shared objects, typed."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from sdserver.engine import Engine
from sdserver.service.history import History
from sdserver.service.scheduler import Scheduler
from sdserver.settings import Settings


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _scheduler(request: Request) -> Scheduler:
    scheduler: Scheduler = request.app.state.scheduler
    return scheduler


def _engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


def _history(request: Request) -> History:
    history: History = request.app.state.history
    return history


def _owner(request: Request) -> str | None:
    """Whose jobs and history this request may see: the name of its API key, or None for everyone's
    (no auth, or an admin key). The auth middleware sets `request.state.owner` when keys have names."""
    owner = getattr(request.state, "owner", None)
    return owner if isinstance(owner, str) else None


SettingsDep = Annotated[Settings, Depends(_settings)]
SchedulerDep = Annotated[Scheduler, Depends(_scheduler)]
EngineDep = Annotated[Engine, Depends(_engine)]
HistoryDep = Annotated[History, Depends(_history)]
OwnerDep = Annotated[str | None, Depends(_owner)]
