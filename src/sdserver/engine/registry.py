"""Which models exist, by name, and their loaded pipelines.

Requests name models only by registry name (never by path): the base model answers to `None` and to
its own name; custom models answer to their `url_path`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sdserver.core.errors import ConfigError, ModelLoadError, NotFound
from sdserver.engine.loaders import LoadedPipelines, load_pipelines
from sdserver.settings import DEFAULT_MODEL, DEMO_MODEL, Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str
    label: str
    requires_safety_checker: bool = True
    is_base: bool = False


def base_model_name(source: str) -> str:
    path = Path(source).expanduser()
    return path.name if path.is_dir() else source


def specs_from_settings(settings: Settings) -> list[ModelSpec]:
    source = settings.base_model
    base = ModelSpec(name=base_model_name(source), source=source, label="Stable Diffusion", is_base=True)
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
    return specs


class Registry:
    def __init__(self, specs: list[ModelSpec], *, device: torch.device, dtype: torch.dtype, token: str | None):
        self._specs = {spec.name: spec for spec in specs}
        self._base = next(spec.name for spec in specs if spec.is_base)
        self._loaded: dict[str, LoadedPipelines] = {}
        self.load_count = 0
        self.device, self.dtype, self._token = device, dtype, token

    @property
    def base_name(self) -> str:
        return self._base

    def names(self) -> list[str]:
        return list(self._specs)

    def loaded_names(self) -> list[str]:
        return list(self._loaded)

    def spec(self, name: str | None) -> ModelSpec:
        key = self._base if name is None else name
        try:
            return self._specs[key]
        except KeyError:
            known = ", ".join(sorted(self._specs))
            raise NotFound(f"model {name!r} not found; available: {known}", field="model") from None

    def get(self, name: str | None) -> LoadedPipelines:
        spec = self.spec(name)
        if spec.name not in self._loaded:
            self._load(spec)
        return self._loaded[spec.name]

    def load_all(self, *, fall_back_to_demo: bool = False) -> None:
        """Load every model now (base first: custom models may borrow its safety checker)."""
        base = self._specs[self._base]
        try:
            self._load(base)
        except ModelLoadError as exc:
            if not (fall_back_to_demo and base.source == DEFAULT_MODEL):
                raise
            log.warning("%s", exc.message)
            log.warning("no model configured and %s is unavailable: serving the bundled demo model", DEFAULT_MODEL)
            self._replace_base(ModelSpec(name=DEMO_MODEL, source=DEMO_MODEL, label="Demo (bundled)", is_base=True))
            self._load(self._specs[self._base])
        for spec in self._specs.values():
            if spec.name not in self._loaded:
                self._load(spec)

    def _replace_base(self, spec: ModelSpec) -> None:
        del self._specs[self._base]
        self._specs = {spec.name: spec, **self._specs}
        self._base = spec.name

    def _load(self, spec: ModelSpec) -> None:
        started = time.perf_counter()
        log.info("loading model %r from %s onto %s (%s)", spec.name, spec.source, self.device, self.dtype)
        borrow = None
        if spec.requires_safety_checker and not spec.is_base:
            borrow = self.get(None)
        self._loaded[spec.name] = load_pipelines(
            spec.source, device=self.device, dtype=self.dtype, token=self._token, safety_checker_from=borrow
        )
        self.load_count += 1
        checker = "with" if self._loaded[spec.name].safety_checker is not None else "without"
        log.info("loaded model %r %s safety checker in %.1fs", spec.name, checker, time.perf_counter() - started)
