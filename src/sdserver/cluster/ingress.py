"""The HTTP ingress on Ray Serve: the single server's FastAPI app (`create_app`: every protocol, the
studio, the docs), with a backend that sends generation to the engine replicas."""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from fastapi import FastAPI
from prometheus_client import generate_latest
from starlette.concurrency import run_in_threadpool

from sdserver.api.app import create_app
from sdserver.service.metrics import Metrics
from sdserver.settings import Settings

from . import routes
from .board import board_handle
from .catalog import ClusterEngine
from .history import RemoteHistory
from .metrics import cluster_registry
from .scheduler import ClusterScheduler
from .state import Cluster

log = logging.getLogger(__name__)


class ClusterBackend:
    """create_app's Backend on Ray Serve (see sdserver.api.app.Backend)."""

    def __init__(self, settings: Settings, engines: Any) -> None:
        self.settings = settings
        self.cluster = Cluster(settings, board_handle(settings), engines)
        self.engine = ClusterEngine(settings, self.cluster)
        self.history = RemoteHistory(settings, self.cluster)
        self.routers = [routes.router]
        self.cluster.model_names = self.engine.registry.names
        self.scheduler: ClusterScheduler | None = None

    async def start(self, app: FastAPI, metrics: Metrics) -> ClusterScheduler:
        self.cluster.ingress_id = _member_id()
        own = metrics.registry
        metrics.registry = cluster_registry(self.cluster, own, lambda: self.cluster.ingress_id)
        await self.cluster.board.reconfigure.remote(self.settings)
        self.scheduler = ClusterScheduler(self.cluster, self.engine, self.settings, lambda: generate_latest(own))
        await self.scheduler.start()
        app.state.cluster = self.cluster
        log.info("ingress %s ready: serving %s", self.cluster.ingress_id, ", ".join(self.engine.registry.names()))
        return self.scheduler

    async def stop(self) -> None:
        if self.scheduler is not None:
            await run_in_threadpool(self.scheduler.drain, self.settings.drain_timeout)
            await self.scheduler.stop()
        self.history.close()


def _member_id() -> str:
    """This Serve replica's id; outside Serve (an ingress in another Ray driver): host and process."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        return str(serve.get_replica_context().replica_id.unique_id)
    except RayServeException:
        return f"{socket.gethostname()}-{os.getpid()}"


class Ingress:
    """The deployment's class (app.py wraps it with serve.ingress): the app is built on the replica."""

    def __init__(self, settings: Settings, engines: Any) -> None:
        self.settings, self.engines = settings, engines

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self.settings, backend=ClusterBackend(self.settings, self.engines))
