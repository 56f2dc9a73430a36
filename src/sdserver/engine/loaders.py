"""Load a model source (hub id, local diffusers folder, or the bundled demo) into pipelines.

txt2img, img2img and inpainting pipelines are built with `from_pipe`, so the three share one set of
weights in memory.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    AutoPipelineForText2Image,
    DiffusionPipeline,
)

from sdserver.core.errors import ModelLoadError
from sdserver.settings import DEMO_MODEL, is_hub_id

log = logging.getLogger(__name__)


def demo_model_path() -> Path:
    return Path(str(resources.files("sdserver") / "assets" / "demo"))


@dataclass
class LoadedPipelines:
    # diffusers pipelines (typed Any: their classes are not precisely typed)
    txt2img: Any
    img2img: Any
    inpaint: Any
    inpainting_unet: bool  # a dedicated 9-channel inpainting model serves every task through `inpaint`
    native_size: int
    weights_hash: str  # sha256 of the UNet weights: the "model hash" in image metadata

    @property
    def safety_checker(self) -> Any:
        return self.txt2img.safety_checker


def resolve_source(source: str) -> tuple[str, bool]:
    """Return (where to load from, is it a hub id)."""
    if source == DEMO_MODEL:
        path = demo_model_path()
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(f"the bundled demo model is missing from this install ({path})")
        return str(path), False
    local = Path(source).expanduser()
    if local.is_dir():
        if not (local / "model_index.json").is_file():
            raise ModelLoadError(f"{source!r} is a folder but not a diffusers model (no model_index.json)")
        return str(local), False
    if is_hub_id(source):
        return source, True
    raise ModelLoadError(f"model {source!r} is neither a local diffusers folder nor a hub id (owner/name)")


def load_pipelines(
    source: str,
    *,
    device: torch.device,
    dtype: torch.dtype,
    token: str | None = None,
    safety_checker_from: LoadedPipelines | None = None,
) -> LoadedPipelines:
    """Load `source` onto `device`; borrow `safety_checker_from`'s checker if it has none of its own."""
    location, from_hub = resolve_source(source)
    try:
        pipe: Any = DiffusionPipeline.from_pretrained(location, dtype=dtype, token=token, local_files_only=not from_hub)
    except Exception as exc:  # diffusers raises many kinds (OSError, ValueError, hub errors)
        raise ModelLoadError(_load_failure(source, from_hub, exc)) from exc
    shared: dict[str, Any] = {}
    if getattr(pipe, "safety_checker", None) is None and safety_checker_from is not None:
        base = safety_checker_from.txt2img
        shared = {"safety_checker": base.safety_checker, "feature_extractor": base.feature_extractor}
    txt2img = AutoPipelineForText2Image.from_pipe(pipe, **shared).to(device)
    for component in ("unet", "vae", "text_encoder", "tokenizer"):
        if getattr(txt2img, component, None) is None:
            raise ModelLoadError(f"model {source!r} is not a Stable Diffusion model (it has no {component})")
    txt2img.set_progress_bar_config(disable=True)
    img2img = AutoPipelineForImage2Image.from_pipe(txt2img)
    inpaint = AutoPipelineForInpainting.from_pipe(txt2img)
    for pipeline in (img2img, inpaint):
        pipeline.set_progress_bar_config(disable=True)
    return LoadedPipelines(
        txt2img=txt2img,
        img2img=img2img,
        inpaint=inpaint,
        inpainting_unet=txt2img.unet.config.in_channels == 9,
        native_size=int(txt2img.unet.config.sample_size) * int(txt2img.vae_scale_factor),
        weights_hash=weights_hash(txt2img.unet),
    )


def weights_hash(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _load_failure(source: str, from_hub: bool, exc: Exception) -> str:
    reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
    if from_hub:
        return (
            f"could not load {source!r} from the Hugging Face hub ({reason}). Check the id, your network, "
            "and for gated models set hf_token in config.json or HF_TOKEN; offline, download it first "
            f"with `hf download {source}`"
        )
    return f"could not load model {source!r} ({reason})"
