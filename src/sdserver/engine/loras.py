"""LoRA adapters from `loras_dir`, applied to one batch and switched off after it.

diffusers (with peft) loads an adapter into the model's UNet and text encoders once; each batch turns
on the adapters it names at their weights and turns every adapter off when it ends, so the next
request runs the untouched model (peft's disabled adapters return the base layer's output as is).
Only the worker thread runs batches, so switching adapters on a shared model is safe.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sdserver.core.errors import InvalidRequest
from sdserver.core.types import LoraRef
from sdserver.engine.loaders import LoadedPipelines

log = logging.getLogger(__name__)

MAX_ADAPTERS_PER_MODEL = 16  # past this, a model's least recently used adapters are deleted


class LoraLibrary:
    """The .safetensors files of `folder`, by file name without suffix (rescanned when a name is missing)."""

    def __init__(self, folder: str | None) -> None:
        self.folder = Path(folder).expanduser() if folder is not None else None
        self._files: dict[str, Path] = {}  # replaced whole by refresh(), never mutated: reads need no lock
        self.refresh()

    def refresh(self) -> list[str]:
        files = {}
        if self.folder is not None and self.folder.is_dir():
            files = {path.stem: path for path in sorted(self.folder.glob("*.safetensors"))}
        self._files = files
        return list(files)

    def names(self) -> list[str]:
        return list(self._files)

    def path(self, name: str) -> Path:
        found = self._files.get(name) or self._files_after_refresh().get(name)  # a file added since the scan
        if found is not None:
            return found
        if self.folder is None:
            raise InvalidRequest(f"loras: no loras_dir is configured, so LoRA {name!r} is unknown", field="loras")
        known = ", ".join(self.names()) or "none"
        raise InvalidRequest(f"loras: no LoRA named {name!r} in loras_dir; available: {known}", field="loras")

    def _files_after_refresh(self) -> dict[str, Path]:
        self.refresh()
        return self._files

    def check(self, refs: Sequence[LoraRef]) -> None:
        """Raise InvalidRequest naming the first LoRA that does not exist."""
        for ref in refs:
            self.path(ref.name)


@contextmanager
def applied(library: LoraLibrary, model: LoadedPipelines, refs: Sequence[LoraRef]) -> Iterator[None]:
    """Run the block with `refs` active on `model`; afterwards every adapter is off."""
    if not refs:
        yield
        return
    pipe = model.txt2img  # img2img and inpaint share its UNet and text encoders
    for ref in refs:
        _ensure_loaded(pipe, ref.name, library.path(ref.name))
    pipe.enable_lora()
    pipe.set_adapters([ref.name for ref in refs], adapter_weights=[ref.weight for ref in refs])
    try:
        yield
    finally:
        pipe.disable_lora()


def _ensure_loaded(pipe: Any, name: str, path: Path) -> None:
    loaded: list[str] = list(getattr(pipe, "_sdserver_adapters", []))
    if name in loaded:
        loaded.remove(name)
    else:
        if len(loaded) >= MAX_ADAPTERS_PER_MODEL:
            pipe.delete_adapters(loaded.pop(0))
        try:
            pipe.load_lora_weights(str(path), adapter_name=name)
        except Exception as exc:  # diffusers/peft raise ValueError, KeyError, RuntimeError on bad files
            _forget(pipe, name)
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
            raise InvalidRequest(f"loras: LoRA {name!r} does not fit this model ({reason})", field="loras") from exc
        log.info("loaded LoRA %r from %s", name, path)
    pipe._sdserver_adapters = [*loaded, name]  # most recently used last


def _forget(pipe: Any, name: str) -> None:
    """Remove what a failed load may have left of adapter `name`."""
    with contextlib.suppress(Exception):  # nothing was left: nothing to remove
        pipe.delete_adapters(name)
