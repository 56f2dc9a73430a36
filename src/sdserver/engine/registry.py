"""Which models exist, by name, and their loaded pipelines.

Requests name models only by registry name (never by path): the base model answers to `None` and to
its own name; custom models answer to their `url_path`; models found in `models_dir` answer to their
folder's name.

The base model is loaded before serving and never unloaded; the others load on first use (one load
per model at a time: a per-model lock). At most `max_loaded` models stay loaded, and with a memory
budget their weights stay within `max_memory_bytes`: the least recently used model that no batch is
running on is unloaded first.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch

from sdserver.core.errors import (
    ConfigError,
    InvalidRequest,
    ModelLoadError,
    NotFound,
    SDServerError,
    Unavailable,
)
from sdserver.engine.architectures import Prediction
from sdserver.engine.device import free_device_memory, release_host_memory
from sdserver.engine.loaders import Description, LoadedPipelines, describe_source, load_pipelines, resolve_source
from sdserver.engine.speed import Tuning
from sdserver.settings import DEFAULT_MODEL, DEMO_MODEL, Settings, is_single_file, is_url_safe

log = logging.getLogger(__name__)

Origin = Literal["base", "custom_models", "models_dir"]
_UNKNOWN = Description("unknown", None)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str
    label: str
    requires_safety_checker: bool = True
    is_base: bool = False
    origin: Origin = "custom_models"
    prediction_type: Prediction | None = None  # overrides the model's own (or, for single files, the guess)
    encoders: str | None = None  # SD3/FLUX single files: where the parts they lack come from
    description: Description | None = None  # read from disk when configured; None: not yet known


@dataclass(frozen=True)
class ModelInfo:
    """What the models listing says about one model."""

    name: str
    label: str
    origin: Origin
    kind: str  # sd1, sd2, sdxl, or "unknown" (not loaded and no local UNet config to read)
    inpainting: bool | None  # a 9-channel inpainting UNet; None when unknown
    loaded: bool


def base_model_name(source: str) -> str:
    path = Path(source).expanduser()
    if path.is_dir():
        return path.name
    return path.stem if path.is_file() else source


def specs_from_settings(settings: Settings) -> list[ModelSpec]:
    """The configured models; a local one of a kind we cannot serve stops start-up, named."""
    source = settings.base_model
    name = base_model_name(source)
    base = _checked(ModelSpec(name=name, source=source, label="Stable Diffusion", is_base=True, origin="base"))
    specs = [base]
    for custom in settings.custom_models:
        if custom.url_path == base.name:
            raise ConfigError(f"custom model url_path {custom.url_path!r} clashes with the base model's name")
        spec = ModelSpec(
            name=custom.url_path,
            source=custom.model_path,
            label=custom.ui_label,
            requires_safety_checker=custom.requires_safety_checker,
            prediction_type=custom.prediction_type,
            encoders=custom.encoders,
        )
        specs.append(_checked(spec))
    if settings.models_dir is not None:
        folder = Path(settings.models_dir).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"models_dir {settings.models_dir!r} is not a folder")
    return specs


def _checked(spec: ModelSpec) -> ModelSpec:
    """`spec` with its description read from disk (hub models: later, when loaded)."""
    try:
        resolve_source(spec.source)
    except ModelLoadError:
        return spec  # a missing model fails when loaded, with the loader's advice (or the demo fallback)
    try:
        return replace(spec, description=_describe(spec.source, spec.prediction_type))
    except ModelLoadError as exc:  # UnsupportedModel included: a kind we cannot serve
        raise ConfigError(f"model {spec.name!r}: {exc.message}") from None


def _describe(source: str, prediction_type: Prediction | None) -> Description | None:
    """What the model is, without loading weights; None when that means reading a whole .ckpt."""
    if Path(source).suffix.lower() == ".ckpt":
        return None
    return describe_source(source, prediction_type)


def scan_models_dir(folder: Path, taken: set[str]) -> list[ModelSpec]:
    """Every diffusers folder (one with a model_index.json) and single-file checkpoint directly in
    `folder`, named by its folder or file name (without suffix); an unusable one is skipped with a warning."""
    if not folder.is_dir():
        log.warning("models_dir %s is not a folder: no models found there", folder)
        return []
    specs = []
    for entry in sorted(folder.iterdir()):
        is_model_folder = entry.is_dir() and (entry / "model_index.json").is_file()
        is_file = is_single_file(entry)
        if not (is_model_folder or is_file):
            continue
        name = entry.name if is_model_folder else entry.stem
        if not is_url_safe(name):
            log.warning("skipping %s in models_dir: a model name uses only letters, digits, '.', '_', '~', '-'", entry)
            continue
        if name in taken:
            log.warning("skipping %s in models_dir: the name %r is already a model", entry, name)
            continue
        try:
            description = _describe(str(entry), None)
        except SDServerError as exc:
            log.warning("skipping %s in models_dir: %s", entry.name, exc.message)
            continue
        taken.add(name)
        specs.append(ModelSpec(name=name, source=str(entry), label=name, origin="models_dir", description=description))
    return specs


class Registry:
    """Thread-safe: `_lock` guards the dictionaries; a per-model lock serialises each model's loading."""

    def __init__(
        self,
        specs: list[ModelSpec],
        *,
        device: torch.device,
        dtype: torch.dtype,
        token: str | None,
        encoders: dict[str, str] | None = None,
        max_loaded: int = 3,
        max_memory_bytes: int | None = None,
        models_dir: str | None = None,
        tuning: Tuning | None = None,
        embeddings_dir: str | None = None,
    ):
        self._lock = threading.RLock()
        self._configured = list(specs)
        self._base = next(spec.name for spec in specs if spec.is_base)
        self._models_dir = Path(models_dir).expanduser() if models_dir is not None else None
        self._specs: dict[str, ModelSpec] = {}
        self._loaded: OrderedDict[str, LoadedPipelines] = OrderedDict()  # least recently used first
        self._load_locks: dict[str, threading.Lock] = {}
        self._in_use: dict[str, int] = {}
        self._hashes: dict[str, str] = {}  # kept after unloading: listings need not reload
        self._descriptions: dict[str, Description] = {}  # what each load found
        self._sizes: dict[str, int] = {}  # bytes of weights measured at each load
        self.max_loaded = max_loaded
        self.max_memory_bytes = max_memory_bytes
        self.load_count = 0
        self.unload_count = 0
        self._uncollected = False  # dropped pipelines not yet garbage-collected
        self.device, self.dtype, self._token = device, dtype, token
        self.tuning = tuning  # speed switches and memory modes applied to each model as it loads
        self._encoders = dict(encoders or {})  # per family: what SD3/FLUX single files may borrow
        self.embeddings_dir = embeddings_dir  # textual-inversion embeddings, registered with each model as it loads
        self.refresh()

    @property
    def base_name(self) -> str:
        return self._base

    def names(self) -> list[str]:
        with self._lock:
            return list(self._specs)

    def loaded_names(self) -> list[str]:
        """Loaded models, least recently used first."""
        with self._lock:
            return list(self._loaded)

    def is_loaded(self, name: str | None) -> bool:
        spec = self.spec(name)
        with self._lock:
            return spec.name in self._loaded

    def loaded(self, name: str | None) -> LoadedPipelines | None:
        """The model's pipelines if it is loaded, else None (never loads it)."""
        spec = self.spec(name)
        with self._lock:
            return self._loaded.get(spec.name)

    def spec(self, name: str | None) -> ModelSpec:
        with self._lock:
            key = self._base if name is None else name
            try:
                return self._specs[key]
            except KeyError:
                known = ", ".join(sorted(self._specs))
                raise NotFound(f"model {name!r} not found; available: {known}", field="model") from None

    def refresh(self) -> list[str]:
        """Rescan models_dir (new folders appear, removed ones go); returns the model names."""
        with self._lock:
            specs = {spec.name: spec for spec in self._configured}
            if self._models_dir is not None:
                for spec in scan_models_dir(self._models_dir, set(specs)):
                    specs[spec.name] = spec
            for name in set(self._specs) - set(specs):
                if self._specs[name].origin == "models_dir":  # (not a base model replaced by the demo)
                    log.info("model %r is gone from models_dir", name)
                if name in self._loaded and not self._in_use.get(name):
                    self._drop(name)
            self._specs = specs
            return list(specs)

    def info(self, name: str | None) -> ModelInfo:
        spec = self.spec(name)
        with self._lock:
            loaded = spec.name in self._loaded
            known = self._descriptions.get(spec.name) or spec.description or _UNKNOWN
        return ModelInfo(spec.name, spec.label, spec.origin, known.kind, known.inpainting, loaded)

    def loaded_bytes(self) -> int:
        """Weights of the loaded models, as measured when each loaded."""
        with self._lock:
            return sum(self._sizes.get(name, 0) for name in self._loaded)

    def get(self, name: str | None) -> LoadedPipelines:
        """The model's pipelines, loading it first if need be (slow: not on the event loop)."""
        spec = self.spec(name)
        with self._lock:
            if spec.name in self._loaded:
                self._loaded.move_to_end(spec.name)
                return self._loaded[spec.name]
            load_lock = self._load_locks.setdefault(spec.name, threading.Lock())
        with load_lock:
            with self._lock:  # another thread may have loaded it while this one waited
                if spec.name in self._loaded:
                    self._loaded.move_to_end(spec.name)
                    return self._loaded[spec.name]
                # Unload first, so peak memory stays within the budget (size known from an earlier load, or
                # estimated from the files).
                incoming = self._sizes.get(spec.name) or _size_on_disk(spec.source)
                self._evict(room_for=1, incoming_bytes=incoming, keep=spec.name)
            pipelines = self._load(spec)
            with self._lock:
                self._loaded[spec.name] = pipelines
                self._evict(room_for=0, incoming_bytes=0, keep=spec.name)  # others may have loaded meanwhile
            self._after_unload()
            return pipelines

    @contextmanager
    def use(self, name: str | None) -> Iterator[LoadedPipelines]:
        """The model's pipelines, not to be unloaded until the block ends (a batch runs on them)."""
        spec = self.spec(name)
        with self._lock:
            self._in_use[spec.name] = self._in_use.get(spec.name, 0) + 1
        try:
            yield self.get(spec.name)
        finally:
            dropped = False
            with self._lock:
                self._in_use[spec.name] -= 1
                if not self._in_use[spec.name]:
                    del self._in_use[spec.name]
                    if spec.name not in self._specs and spec.name in self._loaded:
                        self._drop(spec.name)  # removed by a refresh while it ran
                        dropped = True
            if dropped:
                self._after_unload()

    def weights_hash(self, name: str | None) -> str | None:
        """The UNet weights' sha256 if the model was ever loaded; None otherwise (listing never loads)."""
        spec = self.spec(name)
        with self._lock:
            return self._hashes.get(spec.name)

    def unload(self, name: str) -> bool:
        """Unload a model now (False if it was not loaded); the base model and models in use stay."""
        spec = self.spec(name)
        if spec.is_base:
            raise InvalidRequest(f"model {spec.name!r} is the base model: it stays loaded", field="model")
        with self._lock:
            if spec.name not in self._loaded:
                return False
            if self._in_use.get(spec.name):
                raise Unavailable(f"model {spec.name!r} is in use; try again when its work is done")
            self._drop(spec.name)
        self._after_unload()
        return True

    def preload(self, names: list[str] | None = None, *, fall_back_to_demo: bool = False) -> None:
        """Load the base model now (before serving), then `names` (["all"]: every model); the others
        load on first use."""
        base = self.spec(None)
        try:
            self.get(None)
        except ModelLoadError as exc:
            if not (fall_back_to_demo and base.source == DEFAULT_MODEL):
                raise
            log.warning("%s", exc.message)
            log.warning("no model configured and %s is unavailable: serving the bundled demo model", DEFAULT_MODEL)
            self._replace_base(
                ModelSpec(name=DEMO_MODEL, source=DEMO_MODEL, label="Demo (bundled)", is_base=True, origin="base")
            )
            self.get(None)
        wanted = self.names() if names == ["all"] else [self.spec(name).name for name in names or []]
        for name in wanted:
            self.get(name)

    def _replace_base(self, spec: ModelSpec) -> None:
        with self._lock:
            self._configured = [spec] + [old for old in self._configured if not old.is_base]
            self._base = spec.name
        self.refresh()

    def _evict(self, *, room_for: int, incoming_bytes: int, keep: str) -> None:
        """Unload least recently used models until `room_for` more models of `incoming_bytes` fit both
        budgets (caller holds `_lock`)."""
        while self._over_budget(room_for, incoming_bytes):
            victim = next(
                (name for name in self._loaded if name != keep and name != self._base and not self._in_use.get(name)),
                None,
            )
            if victim is None:
                log.info("over the model budget, but every other loaded model is the base or in use")
                return
            log.info("unloading model %r (least recently used; over the model budget)", victim)
            self._drop(victim)

    def _over_budget(self, room_for: int, incoming_bytes: int) -> bool:
        if len(self._loaded) + room_for > self.max_loaded:
            return True
        if self.max_memory_bytes is None:
            return False
        return self.loaded_bytes() + incoming_bytes > self.max_memory_bytes

    def _drop(self, name: str) -> None:
        """Forget a loaded model's pipelines (caller holds `_lock`; then call `_after_unload`)."""
        del self._loaded[name]
        self.unload_count += 1
        self._uncollected = True

    def _after_unload(self) -> None:
        """Return dropped pipelines' memory: the three pipelines share components, collect them all. Only
        after a drop: a full collection of a big process takes seconds."""
        with self._lock:
            if not self._uncollected:
                return
            self._uncollected = False
        gc.collect()
        free_device_memory(self.device)
        release_host_memory()

    def _load(self, spec: ModelSpec) -> LoadedPipelines:
        self._after_unload()  # what _evict dropped
        started = time.perf_counter()
        log.info("loading model %r from %s onto %s (%s)", spec.name, spec.source, self.device, self.dtype)
        borrow = None
        if spec.requires_safety_checker and not spec.is_base:
            borrow = self.get(None)
        pipelines = load_pipelines(
            spec.source,
            device=self.device,
            dtype=self.dtype,
            token=self._token,
            checker_from=borrow,
            prediction_type=spec.prediction_type,
            tuning=self.tuning,
            encoders=spec.encoders,
            family_encoders=self._encoders,
            embeddings_dir=self.embeddings_dir,
        )
        with self._lock:
            self.load_count += 1
            self._hashes[spec.name] = pipelines.weights_hash
            self._descriptions[spec.name] = pipelines.description
            self._sizes[spec.name] = pipelines.memory_bytes
        checker = "with" if pipelines.checker is not None else "without"
        log.info(
            "loaded model %r (%s, %.2f GB) %s safety checker in %.1fs",
            spec.name,
            pipelines.description.kind,
            pipelines.memory_bytes / 1e9,
            checker,
            time.perf_counter() - started,
        )
        return pipelines


def _size_on_disk(source: str) -> int:
    """The weights' bytes on disk: a first guess at a model's memory before it is ever loaded."""
    path = Path(source).expanduser()
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        return 0  # a hub model: measured once loaded
    weights = [file for file in path.glob("*/*") if file.suffix in (".safetensors", ".bin")]
    plain = [file for file in weights if ".fp16." not in file.name] or weights  # variants are alternatives
    return sum(file.stat().st_size for file in plain)
