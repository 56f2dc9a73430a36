"""Stable Diffusion XL: the SD loop (sd.py) with two text encoders, pooled embeddings and the added
size/crop conditioning ("time ids"), and a VAE that decodes in fp32 when it would overflow in fp16.

The refiner (no first text encoder, aesthetic-score conditioning) cannot serve txt2img: refused at load.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from PIL import Image

from sdserver.core.types import PreparedRequest
from sdserver.engine.families.base import Conditioning, State, stacked
from sdserver.engine.families.sd import StableDiffusion, _postprocess

if TYPE_CHECKING:
    from sdserver.engine.loaders import LoadedPipelines

# SDXL's latent space differs from 1.x's; a commonly used linear fit (previews only).
SDXL_LATENT_RGB = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)


class StableDiffusionXL(StableDiffusion):
    name = "sdxl"
    kinds: ClassVar[tuple[str, ...]] = ("sdxl",)
    pipeline_classes: ClassVar[tuple[str, ...]] = (
        "StableDiffusionXLPipeline",
        "StableDiffusionXLImg2ImgPipeline",
        "StableDiffusionXLInpaintPipeline",
    )
    preview_factors = SDXL_LATENT_RGB
    embedding_encoders: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2")  # clip_l, clip_g

    def kind_of(self, pipe: Any) -> str:
        return "sdxl"

    def encode(self, model: LoadedPipelines, request: PreparedRequest) -> Conditioning:
        pipe = model.txt2img
        cfg = request.guidance_scale > 1 and pipe.unet.config.time_cond_proj_dim is None
        count = request.num_images
        skip = request.clip_skip - 1 if request.clip_skip is not None and request.clip_skip > 1 else None
        negative = model.embeddings.rewrite(request.negative_prompt or "") or None
        cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
            prompt=model.embeddings.rewrite(request.prompt),
            device=model.device,
            num_images_per_prompt=count,
            do_classifier_free_guidance=cfg,
            negative_prompt=negative,
            clip_skip=skip,
        )
        projection = int(pooled.shape[-1]) if pipe.text_encoder_2 is None else pipe.text_encoder_2.config.projection_dim
        size = (request.height, request.width)  # original and target size; no crop
        time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=cond.dtype, text_encoder_projection_dim=projection)
        time_ids = time_ids.to(model.device).repeat(count, 1)
        tensors = {
            "encoder_hidden_states": torch.cat([uncond, cond]) if cfg else cond,
            "text_embeds": torch.cat([uncond_pooled, pooled]) if cfg else pooled,
            "time_ids": torch.cat([time_ids, time_ids]) if cfg else time_ids,
        }
        return Conditioning(tensors, cfg)

    def added_conditions(self, states: Sequence[State]) -> dict[str, torch.Tensor] | None:
        return {"text_embeds": stacked(states, "text_embeds"), "time_ids": stacked(states, "time_ids")}

    def decode(self, model: LoadedPipelines, states: Sequence[State]) -> list[Image.Image]:
        pipe = model.txt2img
        latents = torch.cat([state.latents for state in states])
        vae = pipe.vae
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast  # SDXL's VAE overflows in fp16
        if upcast:
            pipe.upcast_vae()
            latents = latents.to(next(iter(vae.post_quant_conv.parameters())).dtype)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            shape = (1, len(mean), 1, 1)
            mean_t = torch.tensor(mean).view(shape).to(latents.device, latents.dtype)
            std_t = torch.tensor(std).view(shape).to(latents.device, latents.dtype)
            latents = latents * std_t / vae.config.scaling_factor + mean_t
        else:
            latents = latents / vae.config.scaling_factor
        pixels = vae.decode(latents, return_dict=False)[0]
        if upcast:
            vae.to(dtype=torch.float16)
        return _postprocess(pipe, pixels)


FAMILY = StableDiffusionXL()
