"""FastAPI dependencies: the app's shared objects, typed.

The engine and the scheduler exist once the models have loaded (the socket opens before that): until
then a route that needs them answers 503 "loading".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Request

from sdserver.api.security import principal_of
from sdserver.core.errors import Unavailable
from sdserver.service.history import History
from sdserver.service.scheduler import Scheduler
from sdserver.settings import Settings

LOADING = "the server is loading its models; try again shortly"


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def scheduler_of(request: Request) -> Scheduler:
    """The scheduler, or 503 "loading" until the models have loaded."""
    scheduler: Scheduler | None = getattr(request.app.state, "scheduler", None)
    if scheduler is None:
        raise Unavailable(LOADING)
    return scheduler


def _engine(request: Request) -> Any:
    if getattr(request.app.state, "scheduler", None) is None:  # set once the engine has loaded
        raise Unavailable(LOADING)
    return request.app.state.engine


def _history(request: Request) -> History:
    history: History = request.app.state.history
    return history


def _owner(request: Request) -> str | None:
    """Whose jobs and history this request may see: None for everyone's (no auth, or the admin key),
    else the name of its API key ("" for an anonymous caller on an open route: nobody's)."""
    principal = principal_of(request.scope)
    return None if principal.admin else (principal.name or "")


SettingsDep = Annotated[Settings, Depends(_settings)]
SchedulerDep = Annotated[Scheduler, Depends(scheduler_of)]
HistoryDep = Annotated[History, Depends(_history)]
OwnerDep = Annotated[str | None, Depends(_owner)]
if TYPE_CHECKING:
    from sdserver.engine import Engine

    EngineDep = Annotated[Engine, Depends(_engine)]
else:  # only the engine imports torch, and only when the models load
    EngineDep = Annotated[Any, Depends(_engine)]
