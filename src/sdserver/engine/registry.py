"""Which models exist, by name, and their loaded pipelines.

Requests name models only by registry name (never by path): the base model answers to `None` and to
its own name; custom models answer to their `url_path`; models found in `models_dir` answer to their
folder's name.

The base model is loaded before serving and never unloaded; the others load on first use (one load
per model at a time: a per-model lock), and at most `max_loaded` models stay loaded: the least
recently used one that no batch is running on is unloaded first.
"""

from __future__ import annotations

import gc
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from sdserver.core.errors import ConfigError, InvalidRequest, ModelLoadError, NotFound, Unavailable
from sdserver.engine.device import free_device_memory
from sdserver.engine.loaders import LoadedPipelines, load_pipelines
from sdserver.settings import DEFAULT_MODEL, DEMO_MODEL, Settings, is_url_safe

log = logging.getLogger(__name__)

Origin = Literal["base", "custom_models", "models_dir"]
_KINDS = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str
    label: str
    requires_safety_checker: bool = True
    is_base: bool = False
    origin: Origin = "custom_models"


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
    return path.name if path.is_dir() else source


def specs_from_settings(settings: Settings) -> list[ModelSpec]:
    source = settings.base_model
    base = ModelSpec(name=base_model_name(source), source=source, label="Stable Diffusion", is_base=True, origin="base")
    specs = [base]
    for custom in settings.custom_models:
        if custom.url_path == base.name:
            raise ConfigError(f"custom model url_path {custom.url_path!r} clashes with the base model's name")
        specs.append(
            ModelSpec(
                name=custom.url_path,
                source=custom.model_path,
                label=custom.ui_label,
                requires_safety_checker=custom.requires_safety_checker,
            )
        )
    if settings.models_dir is not None:
        folder = Path(settings.models_dir).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"models_dir {settings.models_dir!r} is not a folder")
    return specs


def scan_models_dir(folder: Path, taken: set[str]) -> list[ModelSpec]:
    """Every diffusers folder (one with a model_index.json) directly in `folder`, named by its folder
    name; a folder that is unusable is skipped with a warning."""
    if not folder.is_dir():
        log.warning("models_dir %s is not a folder: no models found there", folder)
        return []
    specs = []
    for sub in sorted(folder.iterdir()):
        index = sub / "model_index.json"
        if not sub.is_dir() or not index.is_file():
            continue
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise ValueError(f"it holds a JSON {type(data).__name__}, not an object")
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            log.warning("skipping %s in models_dir: unreadable model_index.json (%s)", sub.name, exc)
            continue
        if not is_url_safe(sub.name):
            log.warning("skipping %s in models_dir: a model name uses only letters, digits, '.', '_', '~', '-'", sub)
            continue
        if sub.name in taken:
            log.warning("skipping %s in models_dir: the name %r is already a configured model", sub, sub.name)
            continue
        specs.append(ModelSpec(name=sub.name, source=str(sub), label=sub.name, origin="models_dir"))
    return specs


def kind_of(unet_config: dict[str, Any]) -> tuple[str, bool | None]:
    """(sd1/sd2/sdxl/unknown, is it an inpainting UNet) from a UNet config."""
    dim = unet_config.get("cross_attention_dim")
    channels = unet_config.get("in_channels")
    return _KINDS.get(dim, "unknown") if isinstance(dim, int) else "unknown", (
        channels == 9 if isinstance(channels, int) else None
    )


class Registry:
    """Thread-safe: `_lock` guards the dictionaries; a per-model lock serialises each model's loading."""

    def __init__(
        self,
        specs: list[ModelSpec],
        *,
        device: torch.device,
        dtype: torch.dtype,
        token: str | None,
        max_loaded: int = 3,
        models_dir: str | None = None,
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
        self._kinds: dict[str, tuple[str, bool | None]] = {}
        self.max_loaded = max_loaded
        self.load_count = 0
        self.unload_count = 0
        self.device, self.dtype, self._token = device, dtype, token
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
                log.info("model %r is gone from models_dir", name)
                if name in self._loaded and not self._in_use.get(name):
                    self._drop(name)
            self._specs = specs
            return list(specs)

    def info(self, name: str | None) -> ModelInfo:
        spec = self.spec(name)
        with self._lock:
            loaded = spec.name in self._loaded
            known = self._kinds.get(spec.name)  # recorded at every load, so always set once loaded
        kind, inpainting = known if known is not None else _kind_on_disk(spec.source)
        return ModelInfo(spec.name, spec.label, spec.origin, kind, inpainting, loaded)

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
                self._evict(room_for=1, keep=spec.name)  # unload first: peak memory stays within the budget
            pipelines = self._load(spec)
            with self._lock:
                self._loaded[spec.name] = pipelines
                self._evict(room_for=0, keep=spec.name)  # others may have loaded meanwhile
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

    def preload(self, *, fall_back_to_demo: bool = False) -> None:
        """Load the base model now (before serving); the others load on first use."""
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

    def _replace_base(self, spec: ModelSpec) -> None:
        with self._lock:
            self._configured = [spec] + [old for old in self._configured if not old.is_base]
            self._base = spec.name
        self.refresh()

    def _evict(self, *, room_for: int, keep: str) -> None:
        """Unload least recently used models until `room_for` more fit (caller holds `_lock`)."""
        while len(self._loaded) + room_for > self.max_loaded:
            victim = next(
                (name for name in self._loaded if name != keep and name != self._base and not self._in_use.get(name)),
                None,
            )
            if victim is None:
                log.info(
                    "%d models loaded, over the budget of %d: the others are in use",
                    len(self._loaded) + room_for,
                    self.max_loaded,
                )
                return
            log.info("unloading model %r (least recently used; budget %d models)", victim, self.max_loaded)
            self._drop(victim)

    def _drop(self, name: str) -> None:
        """Forget a loaded model's pipelines (caller holds `_lock`; then call `_after_unload`)."""
        del self._loaded[name]
        self.unload_count += 1

    def _after_unload(self) -> None:
        """Return dropped pipelines' memory: the three pipelines share components, collect them all."""
        gc.collect()
        free_device_memory(self.device)

    def _load(self, spec: ModelSpec) -> LoadedPipelines:
        self._after_unload()  # what _evict dropped
        started = time.perf_counter()
        log.info("loading model %r from %s onto %s (%s)", spec.name, spec.source, self.device, self.dtype)
        borrow = None
        if spec.requires_safety_checker and not spec.is_base:
            borrow = self.get(None)
        pipelines = load_pipelines(
            spec.source, device=self.device, dtype=self.dtype, token=self._token, safety_checker_from=borrow
        )
        with self._lock:
            self.load_count += 1
            self._hashes[spec.name] = pipelines.weights_hash
            self._kinds[spec.name] = kind_of(dict(pipelines.txt2img.unet.config))
        checker = "with" if pipelines.safety_checker is not None else "without"
        log.info("loaded model %r %s safety checker in %.1fs", spec.name, checker, time.perf_counter() - started)
        return pipelines


def _kind_on_disk(source: str) -> tuple[str, bool | None]:
    """A local model's kind from its unet/config.json, without loading it."""
    path = Path(source).expanduser() / "unet" / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return "unknown", None
    return kind_of(data) if isinstance(data, dict) else ("unknown", None)
