"""The ingress's model catalogue: every model the replicas can serve (they share the settings), with
what is loaded where taken from the replicas' heartbeats. Nothing is ever loaded in the ingress."""

from __future__ import annotations

from typing import cast

from sdserver.core.errors import InvalidRequest
from sdserver.core.types import GenerationRequest, PreparedRequest
from sdserver.engine import Engine
from sdserver.engine.controlnets import ControlNetLibrary
from sdserver.engine.device import pick_device, pick_dtype
from sdserver.engine.loaders import LoadedPipelines
from sdserver.engine.loras import LoraLibrary
from sdserver.engine.registry import ModelInfo, ModelSpec, Registry, specs_from_settings
from sdserver.settings import DEMO_MODEL, Settings

from .state import Cluster


class ClusterRegistry(Registry):
    """Registry's names, specs and descriptions; loading, unloading and rescanning go to the replicas."""

    def __init__(self, settings: Settings, cluster: Cluster) -> None:
        self._cluster: Cluster | None = None  # Registry.__init__ rescans: nothing to tell anyone yet
        device = pick_device("cpu")
        super().__init__(
            specs_from_settings(settings),
            device=device,
            dtype=pick_dtype("float32", device),
            token=settings.hf_token,
            encoders=settings.encoders,
            models_dir=settings.models_dir,
        )
        self._cluster = cluster

    def adopt_base(self, name: str) -> None:
        """The replicas serve the bundled demo model as the base (the default one could not be loaded)."""
        if name == DEMO_MODEL and self.base_name != DEMO_MODEL:
            self._replace_base(
                ModelSpec(name=DEMO_MODEL, source=DEMO_MODEL, label="Demo (bundled)", is_base=True, origin="base")
            )

    def rescan(self) -> list[str]:
        """This catalogue only (a "refresh" command from another ingress)."""
        return super().refresh()

    def refresh(self) -> list[str]:
        names = self.rescan()
        if self._cluster is not None:
            self._cluster.broadcast("refresh")
        return names

    def get(self, name: str | None) -> LoadedPipelines:
        """Load the model on one engine replica (POST /models/{name}/load). Its pipelines stay there:
        the value returned here is no model, and the API never uses it."""
        spec = self.spec(name)
        assert self._cluster is not None
        self._cluster.load(spec.name)
        return cast(LoadedPipelines, None)

    def unload(self, name: str) -> bool:
        """Unload it on every replica (it loads again on its next use); the base model stays."""
        spec = self.spec(name)
        if spec.is_base:
            raise InvalidRequest(f"model {spec.name!r} is the base model: it stays loaded", field="model")
        assert self._cluster is not None
        loaded = self.is_loaded(spec.name)
        self._cluster.broadcast("unload", spec.name)
        return loaded

    def loaded_names(self) -> list[str]:
        assert self._cluster is not None
        return list(self._cluster.loaded_models())

    def is_loaded(self, name: str | None) -> bool:
        return self.spec(name).name in self.loaded_names()

    def loaded(self, name: str | None) -> LoadedPipelines | None:
        return None  # pipelines live on the replicas

    def info(self, name: str | None) -> ModelInfo:
        info = super().info(name)
        return ModelInfo(info.name, info.label, info.origin, info.kind, info.inpainting, self.is_loaded(info.name))

    def weights_hash(self, name: str | None) -> str | None:
        spec = self.spec(name)
        assert self._cluster is not None
        hashes = (member.hashes.get(spec.name) for member in self._cluster.snapshot.engines)
        return next((value for value in hashes if value), None)


class ClusterEngine(Engine):
    """Engine's catalogue methods for the API; generation itself runs on the replicas."""

    def __init__(self, settings: Settings, cluster: Cluster) -> None:
        self.cluster = cluster
        self.catalogue = ClusterRegistry(settings, cluster)
        super().__init__(
            self.catalogue,
            loras=LoraLibrary(settings.loras_dir),
            limits=settings.limits,
            controlnets=ControlNetLibrary(settings.controlnet_dir),  # listed here; run by the replicas
        )

    def load(self) -> None:
        """The replicas load their models."""

    def native_size(self, name: str | None) -> int | None:
        spec = self.registry.spec(name)
        sizes = (member.native_sizes.get(spec.name) for member in self.cluster.snapshot.engines)
        return next((size for size in sizes if size), None)

    def stats(self) -> dict[str, dict[str, float]]:
        return {"models": {"loaded": len(self.registry.loaded_names())}, "device_memory_bytes": {}}

    def prepare(self, request: GenerationRequest) -> PreparedRequest:
        raise NotImplementedError("requests are prepared by the engine replica that runs them")

    def check(self, request: GenerationRequest) -> str:
        """What the ingress can check without the model (the replica checks the rest): the model and
        LoRAs exist, the sampler fits the model's family. Returns the model's name."""
        spec = self.registry.spec(request.model)
        self.loras.check(request.loras)
        samplers = self.samplers(spec.name)
        if request.sampler is not None and request.sampler not in samplers:
            kind = self.registry.info(spec.name).kind
            valid = ", ".join(samplers)
            raise InvalidRequest(
                f"sampler: {request.sampler!r} does not apply to {kind} models; valid: {valid}", field="sampler"
            )
        return spec.name
