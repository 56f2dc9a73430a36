"""FastAPI dependencies: the app's shared objects, typed."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from sdserver.engine import Engine
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


SettingsDep = Annotated[Settings, Depends(_settings)]
SchedulerDep = Annotated[Scheduler, Depends(_scheduler)]
EngineDep = Annotated[Engine, Depends(_engine)]
