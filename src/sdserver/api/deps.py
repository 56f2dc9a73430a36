"""FastAPI dependencies: the app's shared objects, typed."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from sdserver.api.security import principal_of
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
    """Whose jobs and history this request may see: None for everyone's (no auth, or the admin key),
    else the name of its API key ("" for an anonymous caller on an open route: nobody's)."""
    principal = principal_of(request.scope)
    return None if principal.admin else (principal.name or "")


SettingsDep = Annotated[Settings, Depends(_settings)]
SchedulerDep = Annotated[Scheduler, Depends(_scheduler)]
EngineDep = Annotated[Engine, Depends(_engine)]
HistoryDep = Annotated[History, Depends(_history)]
OwnerDep = Annotated[str | None, Depends(_owner)]
