"""The ingress's handle on the cluster: the job board, the engine replicas, their latest heartbeats."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sdserver.core.errors import SDServerError, Unavailable
from sdserver.settings import Settings

from .board import STALE_S
from .views import Member

log = logging.getLogger(__name__)
BOARD_TIMEOUT_S = 10.0


@dataclass
class Snapshot:
    """The board's view of the members, as of `now` (the board's clock)."""

    now: float = 0.0
    members: list[Member] = field(default_factory=list)
    jobs: dict[str, int] = field(default_factory=dict)  # queued, running
    taken_at: float = 0.0  # local time.monotonic() when fetched

    def up(self, member: Member) -> bool:
        return self.now - member.at < STALE_S

    @property
    def engines(self) -> list[Member]:
        return [member for member in self.members if member.kind == "engine"]

    @property
    def engines_up(self) -> list[Member]:
        return [member for member in self.engines if self.up(member) and member.accepting]

    def replicas_with(self, model: str) -> list[str]:
        return [member.id for member in self.engines_up if model in member.models]


class Cluster:
    """Shared by the ingress's scheduler, model catalogue, history and routes."""

    def __init__(self, settings: Settings, board: Any, engines: Any) -> None:
        self.settings, self.board, self.engines = settings, board, engines
        self.ingress_id = "ingress"
        self.snapshot = Snapshot()
        self.draining = False
        self.model_names: Callable[[], list[str]] = list  # the catalogue's names (set by the backend)

    def call(self, ref: Any, timeout: float = BOARD_TIMEOUT_S) -> Any:
        """Wait for a board call from a plain thread (or briefly on the event loop: the board answers
        in milliseconds); its SDServerError answer is raised; an unreachable board is a 503."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        try:
            result = ray.get(ref, timeout=timeout)
        except GetTimeoutError:
            raise Unavailable(f"the cluster's job board did not answer within {timeout:g}s") from None
        except RayActorError as exc:
            raise Unavailable(f"the cluster's job board is unreachable ({type(exc).__name__})") from None
        if isinstance(result, SDServerError):
            raise result
        return result

    async def refresh(self) -> Snapshot:
        now, members, jobs = await self.board.members.remote()
        self.snapshot = Snapshot(now, members, jobs, time.monotonic())
        return self.snapshot

    def load(self, name: str, timeout: float = 600.0) -> None:
        """Load a model on one engine replica (one that has it already, if any: a no-op there)."""
        self.engines.options(multiplexed_model_id=name).load.remote(name).result(timeout_s=timeout)

    def broadcast(self, kind: str, argument: str | None = None) -> None:
        """A command every member obeys at its next heartbeat (within about a second)."""
        self.call(self.board.command.remote(kind, argument))

    def loaded_models(self) -> dict[str, list[str]]:
        """Model name -> the replicas (up) that have it loaded."""
        where: dict[str, list[str]] = {}
        for member in self.snapshot.engines_up:
            for name in member.models:
                where.setdefault(name, []).append(member.id)
        return where

    async def ready(self) -> Any:
        """GET /ready on Ray Serve: 200 while at least one engine replica is up and accepting."""
        from fastapi.responses import JSONResponse

        try:
            snapshot = await self.refresh()
        except Exception as exc:
            return JSONResponse({"status": f"the job board is unreachable ({type(exc).__name__})"}, status_code=503)
        replicas = {"up": len(snapshot.engines_up), "total": len(snapshot.engines)}
        if self.draining:
            return JSONResponse({"status": "draining", "replicas": replicas}, status_code=503)
        if not snapshot.engines_up and self.settings.min_replicas != 0:
            return JSONResponse({"status": "no engine replica is up", "replicas": replicas}, status_code=503)
        # (Autoscaling from zero: requests wait while the first replica starts.)
        body = {"status": "ready", "models": self.model_names(), "queue_depth": snapshot.jobs.get("queued", 0)}
        return JSONResponse({**body, "replicas": replicas})
