"""What the flow-matching families (SD3, FLUX) share: their single files, a transformer as denoiser,
16-channel latents with a shifted VAE, the flow samplers and regular-model inpainting by blending.

Not a family itself (it is not in `_MODULES`); sd3.py and flux.py derive from `FlowFamily`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from sdserver.core.types import PreparedRequest, Task
from sdserver.engine import flowfiles
from sdserver.engine.families.base import Description, Family, FileOptions, Shapes, State, keep_unmasked
from sdserver.engine.families.sd import _postprocess
from sdserver.engine.samplers import FLOW_SAMPLERS

if TYPE_CHECKING:
    from sdserver.engine.loaders import LoadedPipelines

# A linear fit of SD3's 16 latent channels to RGB (previews only; FLUX's VAE is close enough).
SD3_LATENT_RGB = (
    (-0.0645, 0.0177, 0.1052), (0.0028, 0.0312, 0.0650), (0.1848, 0.0762, 0.0360), (0.0944, 0.0360, 0.0889),
    (0.0897, 0.0506, -0.0364), (-0.0020, 0.1203, 0.0284), (0.0855, 0.0118, 0.0283), (-0.0539, 0.0658, 0.1047),
    (-0.0057, 0.0116, 0.0700), (-0.0412, 0.0281, -0.0039), (0.1106, 0.1171, 0.1220), (-0.0248, 0.0682, -0.0481),
    (0.0815, 0.0846, 0.1207), (-0.0120, -0.0055, -0.0867), (-0.0749, -0.0634, -0.0456), (-0.1418, -0.1457, -0.1259),
)  # fmt: skip


class FlowFamily(Family):
    latent_channels = 16
    samplers = FLOW_SAMPLERS
    preview_factors = SD3_LATENT_RGB

    def detect_file(self, path: Path, shapes: Shapes | None, options: FileOptions) -> Description | None:
        """A single file of this family (all-in-one, transformer only, or GGUF), from its header."""
        found = flowfiles.detect_shapes(shapes, path) if shapes is not None else None
        if found is None or found.family != self.name:
            return None
        return Description(self.name, found.variant == "flux-fill")

    def load_file(self, path: Path, dtype: torch.dtype, options: FileOptions) -> Any:
        return flowfiles.load_pipeline(path, dtype, options.encoders_for(self.name), options.token)

    def denoiser(self, pipe: Any) -> torch.nn.Module:
        transformer: torch.nn.Module = pipe.transformer
        return transformer

    def native_size(self, pipe: Any) -> int:
        return int(pipe.default_sample_size) * int(pipe.vae_scale_factor)

    def after_step(self, model: LoadedPipelines, state: State) -> None:
        """Inpainting with a regular model: outside the mask, the original (base.keep_unmasked)."""
        keep_unmasked(state, flow=True)

    def decode_latents(self, pipe: Any, latents: torch.Tensor) -> list[Image.Image]:
        """Unpacked latents to images: these VAEs are shifted as well as scaled."""
        config = pipe.vae.config
        pixels = pipe.vae.decode(latents / config.scaling_factor + config.shift_factor, return_dict=False)[0]
        return _postprocess(pipe, pixels)

    def decode(self, model: LoadedPipelines, states: Sequence[State]) -> list[Image.Image]:
        return self.decode_latents(model.txt2img, torch.cat([state.latents for state in states]))

    def control_condition(self, model: LoadedPipelines, pixels: torch.Tensor, controlnet: Any) -> torch.Tensor:
        """Transformer ControlNets take the control image encoded as the latents are (the VAE's mean, so
        the same image conditions alike every time); InstantX's SD3 ones without the shift."""
        vae = model.txt2img.vae
        encoded = vae.encode((pixels * 2 - 1).to(vae.dtype)).latent_dist.mode()
        unshifted = getattr(controlnet.config, "force_zeros_for_pooled_projection", False)
        shift = 0.0 if unshifted else float(vae.config.shift_factor or 0.0)
        latents: torch.Tensor = (encoded - shift) * vae.config.scaling_factor
        return latents


def strength(request: PreparedRequest) -> float:
    """The share of the schedule a request runs: all of it for txt2img."""
    return 1.0 if request.task is Task.TXT2IMG else request.strength
