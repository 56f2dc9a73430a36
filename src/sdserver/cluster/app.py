"""The Ray Serve application: deployments and their sizes from the settings.

`build_app` is the import path for Ray's own tools and KubeRay (`serve run sdserver.cluster.app:build_app
model=/models/sd15 replicas=2`, or a RayService's serveConfigV2, docs/kuberay.md); `sdserver serve
--ray` calls `build` (launch.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdserver.core.errors import ConfigError
from sdserver.settings import Settings, load_settings

from .ingress import Ingress
from .replica import EngineReplica, Resident, replica_queue

INGRESS_MAX_ONGOING = 1000  # waiting clients and event streams: the board's queue limit is the real one


@dataclass(frozen=True)
class Plan:
    """How many engine replicas, on what."""

    gpus_per_replica: float
    replicas: int | None  # fixed; None: autoscaling
    min_replicas: int = 0
    max_replicas: int = 0
    target_queue: float = 0.0

    def describe(self) -> str:
        device = f"{self.gpus_per_replica:g} GPU" if self.gpus_per_replica else "CPU"
        if self.replicas is not None:
            return f"{self.replicas} engine replica{'s' if self.replicas != 1 else ''} ({device} each)"
        span = f"{self.min_replicas}-{self.max_replicas}"
        return f"{span} engine replicas ({device} each), scaling at {self.target_queue:g} requests per replica"


def plan(settings: Settings, gpus_visible: float) -> Plan:
    """The sizes: fixed --replicas, or autoscaling between --min/--max-replicas; by default one replica
    per visible GPU (or one on CPUs)."""
    gpus = settings.gpus_per_replica if settings.gpus_per_replica is not None else (1.0 if gpus_visible else 0.0)
    if gpus > 0 and not gpus_visible:
        raise ConfigError(f"--gpus-per-replica {gpus:g}: Ray sees no GPU in this cluster (use 0 on CPUs)")
    autoscale = settings.min_replicas is not None or settings.max_replicas is not None
    if autoscale and settings.replicas is not None:
        raise ConfigError("give either --replicas (a fixed number) or --min-replicas/--max-replicas (autoscaling)")
    if not autoscale:
        fixed = settings.replicas or (max(1, math.floor(gpus_visible / gpus)) if gpus else 1)
        return Plan(gpus, fixed)
    least = settings.min_replicas if settings.min_replicas is not None else 1
    most = settings.max_replicas if settings.max_replicas is not None else max(least, 1)
    if least > most:
        raise ConfigError(f"--min-replicas {least} is more than --max-replicas {most}")
    target = settings.target_queue or float(settings.max_batch_size)
    return Plan(gpus, None, least, most, target)


def build(settings: Settings, gpus_visible: float | None = None) -> Any:
    """The application: an ingress deployment bound to an engine deployment."""
    from ray import serve

    if gpus_visible is None:
        import ray

        gpus_visible = float(ray.cluster_resources().get("GPU", 0))
    sizes = plan(settings, gpus_visible)
    budget = settings.models_per_replica or settings.max_loaded_models

    class MultiplexedEngineReplica(EngineReplica):
        @serve.multiplexed(max_num_models_per_replica=budget)
        async def resident(self, name: str) -> Resident:
            return await self._load_resident(name)

    scaling: dict[str, Any] = (
        {"num_replicas": sizes.replicas}
        if sizes.replicas is not None
        else {
            "autoscaling_config": {
                "min_replicas": sizes.min_replicas,
                "max_replicas": sizes.max_replicas,
                "target_ongoing_requests": sizes.target_queue,
            }
        }
    )
    engine = serve.deployment(
        name="EngineReplica",
        ray_actor_options={"num_cpus": settings.cpus_per_replica, "num_gpus": sizes.gpus_per_replica},
        max_ongoing_requests=replica_queue(settings),
        graceful_shutdown_timeout_s=settings.drain_timeout + 5,
        **scaling,
    )(MultiplexedEngineReplica)
    ingress = serve.deployment(
        name="Ingress",
        num_replicas=settings.ingress_replicas,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=INGRESS_MAX_ONGOING,
        graceful_shutdown_timeout_s=settings.drain_timeout + 5,
    )(serve.ingress()(Ingress))
    return ingress.bind(settings, engine.bind(settings))


def build_app(args: dict[str, Any]) -> Any:
    """Ray Serve's application builder: `args` are settings by name (as in config.json); `config` names a
    config.json. Use absolute paths: the builder runs somewhere in the cluster."""
    values = dict(args)
    config = values.pop("config", None)
    return build(load_settings(Path(config) if config else None, **values))
