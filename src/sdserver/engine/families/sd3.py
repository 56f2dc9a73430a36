"""Stable Diffusion 3 and 3.5 (Medium, Large): an MMDiT transformer over 16-channel latents, CLIP-L +
CLIP-G (+ an optional T5) text encoders, flow matching, classifier-free guidance.

Inpainting: a regular model blends the known latents back in after every step (diffusers' inpaint
pipeline); 33-channel inpainting transformers take the mask and masked latents as input.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift, retrieve_timesteps

from sdserver.core.types import PreparedRequest, Task
from sdserver.engine.control import summed_outputs
from sdserver.engine.families.base import (
    Conditioning,
    Description,
    Options,
    State,
    bound,
    filled_latents,
    generators,
    latent_fill,
    stacked,
    step_kwargs,
)
from sdserver.engine.families.flow import FlowFamily, strength
from sdserver.engine.families.sd import _inpaint_inputs, _json
from sdserver.engine.samplers import scheduler_for

if TYPE_CHECKING:
    from sdserver.engine.loaders import LoadedPipelines


class StableDiffusion3(FlowFamily):
    name = "sd3"
    kinds: ClassVar[tuple[str, ...]] = ("sd3",)
    pipeline_classes: ClassVar[tuple[str, ...]] = (
        "StableDiffusion3Pipeline",
        "StableDiffusion3Img2ImgPipeline",
        "StableDiffusion3InpaintPipeline",
    )
    options = Options(eta=False, clip_skip=True)
    default_steps = 28
    default_guidance = 7.0

    def describe_index(self, index: dict[str, Any], folder: Path, source: str) -> Description:
        channels = _json(folder / "transformer" / "config.json").get("in_channels")
        return Description("sd3", channels == 33 if isinstance(channels, int) else None)

    def pretrained_kwargs(self, index: dict[str, Any]) -> dict[str, Any]:
        # diffusers lists T5 as required: a folder saved without it loads only with explicit Nones
        return {"text_encoder_3": None, "tokenizer_3": None} if index.get("text_encoder_3") == [None, None] else {}

    def is_inpainting(self, pipe: Any) -> bool:
        return int(pipe.transformer.config.in_channels) == 33

    # -- 1. encode -----------------------------------------------------------------------------
    def encode(self, model: LoadedPipelines, request: PreparedRequest) -> Conditioning:
        cfg = request.guidance_scale > 1
        skip = request.clip_skip - 1 if request.clip_skip is not None and request.clip_skip > 1 else None
        cond, uncond, pooled, uncond_pooled = model.txt2img.encode_prompt(
            prompt=request.prompt,
            prompt_2=None,
            prompt_3=None,
            negative_prompt=request.negative_prompt,
            do_classifier_free_guidance=cfg,
            device=model.device,
            clip_skip=skip,
            num_images_per_prompt=request.num_images,
        )
        tensors = {
            "encoder_hidden_states": torch.cat([uncond, cond]) if cfg else cond,
            "pooled_projections": torch.cat([uncond_pooled, pooled]) if cfg else pooled,
        }
        return Conditioning(tensors, cfg)

    # -- 2. start ------------------------------------------------------------------------------
    def start(self, model: LoadedPipelines, request: PreparedRequest, conditioning: Conditioning) -> State:
        scheduler = scheduler_for(request.sampler, model.txt2img.scheduler, self.samplers)
        gens = generators(request)
        dtype = conditioning.tensors["encoder_hidden_states"].dtype
        state = State(request, scheduler, torch.empty(0), torch.empty(0), gens, conditioning)
        if model.inpainting_unet or request.task is Task.INPAINT:
            self._start_inpaint(model, state, dtype)
        elif request.task is Task.IMG2IMG:
            self._start_img2img(model, state, dtype)
        else:
            self._start_txt2img(model, state, dtype)
        state.step_kwargs = step_kwargs(scheduler, gens, 0.0)
        state.step_kwargs.pop("eta", None)
        return state

    def _timesteps(self, pipe: Any, state: State, *, cut: bool) -> None:
        """The schedule (shifted by the image size when the scheduler asks for it), then, for img2img and
        inpainting, the part that `strength` keeps."""
        request, scheduler = state.request, state.scheduler
        extra: dict[str, Any] = {}
        if scheduler.config.get("use_dynamic_shifting", None):
            patch = pipe.transformer.config.patch_size
            scale = pipe.vae_scale_factor
            extra["mu"] = calculate_shift(
                (request.height // scale // patch) * (request.width // scale // patch),
                scheduler.config.get("base_image_seq_len", 256),
                scheduler.config.get("max_image_seq_len", 4096),
                scheduler.config.get("base_shift", 0.5),
                scheduler.config.get("max_shift", 1.16),
            )
        state.timesteps, _ = retrieve_timesteps(scheduler, request.steps, pipe.device, **extra)
        if cut:
            state.timesteps, _ = pipe.get_timesteps(request.steps, strength(request), pipe.device)

    def _start_txt2img(self, model: LoadedPipelines, state: State, dtype: torch.dtype) -> None:
        request, pipe = state.request, model.txt2img
        with bound(pipe, state.scheduler):
            self._timesteps(pipe, state, cut=False)
            channels = pipe.transformer.config.in_channels
            state.latents = pipe.prepare_latents(
                request.num_images, channels, request.height, request.width, dtype, model.device, state.generators
            )

    def _start_img2img(self, model: LoadedPipelines, state: State, dtype: torch.dtype) -> None:
        request, pipe = state.request, model.img2img
        count = request.num_images
        # One copy of the image per row: diffusers' SD3 img2img encodes image[i] with generator i and
        # does not repeat a single image first.
        image = request.init_tensor
        if image is None:
            image = pipe.image_processor.preprocess(
                [request.init_image] * count, height=request.height, width=request.width
            )
        with bound(pipe, state.scheduler):
            self._timesteps(pipe, state, cut=True)
            first = state.timesteps[:1].repeat(count)
            state.latents = pipe.prepare_latents(image, first, 1, count, dtype, model.device, state.generators)

    def _start_inpaint(self, model: LoadedPipelines, state: State, dtype: torch.dtype) -> None:
        request, pipe = state.request, model.inpaint
        init, mask, strength = _inpaint_inputs(request)
        height, width, count = request.height, request.width, request.num_images
        image = pipe.image_processor.preprocess(init, height=height, width=width).to(dtype=torch.float32)
        with bound(pipe, state.scheduler):
            self._timesteps(pipe, state, cut=True)
            blend, fill = not model.inpainting_unet, latent_fill(request, strength)
            outputs = pipe.prepare_latents(
                count, pipe.vae.config.latent_channels, height, width, dtype, model.device, state.generators,
                image=image, timestep=state.timesteps[:1].repeat(count), is_strength_max=strength == 1.0,
                return_noise=True, return_image_latents=blend or fill,
            )  # fmt: skip
            condition = pipe.mask_processor.preprocess(mask, height=height, width=width)
            masks, masked = pipe.prepare_mask_latents(
                condition, image * (condition < 0.5), 1, count, height, width, dtype, model.device,
                state.generators, False,
            )  # fmt: skip
        state.latents = outputs[0]
        if fill:  # inpaint_fill latent_noise / latent_nothing: noised from the filled latents instead
            start = filled_latents(request, outputs[2], masks, state.generators)
            state.latents = state.scheduler.scale_noise(start, state.timesteps[:1].repeat(count), outputs[1])
        state.extra.update(mask=masks, masked_latents=masked, noise=outputs[1])
        if blend:
            state.extra["image_latents"] = outputs[2]

    # -- 3. denoise ----------------------------------------------------------------------------
    def model_input(self, model: LoadedPipelines, state: State) -> torch.Tensor:
        if model.inpainting_unet:
            return torch.cat([state.latents, state.extra["mask"], state.extra["masked_latents"]], dim=1)
        return state.latents

    def forward(
        self, model: LoadedPipelines, states: Sequence[State], inputs: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        hidden, pooled = stacked(states, "encoder_hidden_states"), stacked(states, "pooled_projections")
        timestep = timesteps.to(inputs.dtype)

        def run(controlnet: Any, conditions: torch.Tensor) -> list[torch.Tensor]:
            config = controlnet.config
            samples = controlnet(
                hidden_states=inputs,
                timestep=timestep,
                encoder_hidden_states=hidden if config.joint_attention_dim is not None else None,
                pooled_projections=torch.zeros_like(pooled) if config.force_zeros_for_pooled_projection else pooled,
                controlnet_cond=conditions,
                conditioning_scale=1.0,
                return_dict=False,
            )[0]
            return list(samples)

        prediction: torch.Tensor = model.txt2img.transformer(
            hidden_states=inputs,
            timestep=timestep,
            encoder_hidden_states=hidden,
            pooled_projections=pooled,
            block_controlnet_hidden_states=summed_outputs(states, run),  # None without ControlNets
            return_dict=False,
        )[0]
        return prediction


FAMILY = StableDiffusion3()
