"""FLUX.1 (dev, schnell, Fill): an MMDiT transformer over 16-channel latents packed into 2x2 patches,
CLIP-L (pooled) + T5 text encoders, flow matching with a resolution-dependent shift.

Guidance: dev is guidance-distilled (`guidance_scale` feeds its guidance embedding, per row; there is
no negative branch, so a negative prompt is refused by name); schnell takes no guidance at all.
FLUX.1 Fill is the inpainting model: its transformer takes the masked image and the mask as input, and
it serves txt2img (a full mask over grey) and img2img (a full mask) too.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from PIL import Image

from sdserver.core.types import PreparedRequest, Task
from sdserver.engine.control import summed_outputs
from sdserver.engine.families.base import (
    NO_CHECKER,
    Conditioning,
    Description,
    Options,
    State,
    bound,
    filled_latents,
    generators,
    init_pixels,
    latent_fill,
    latent_rgb,
    stacked,
    step_kwargs,
)
from sdserver.engine.families.flow import FlowFamily, strength
from sdserver.engine.families.sd import _inpaint_inputs, _json
from sdserver.engine.samplers import scheduler_for

if TYPE_CHECKING:
    from sdserver.engine.loaders import LoadedPipelines

FILL_PIPELINE = "FluxFillPipeline"


class Flux(FlowFamily):
    name = "flux"
    kinds: ClassVar[tuple[str, ...]] = ("flux",)
    pipeline_classes: ClassVar[tuple[str, ...]] = (
        "FluxPipeline",
        "FluxImg2ImgPipeline",
        "FluxInpaintPipeline",
        FILL_PIPELINE,
    )
    options = Options(negative_prompt=False, guidance="distilled", eta=False, clip_skip=False)
    default_steps = 28
    default_guidance = 3.5

    def describe_index(self, index: dict[str, Any], folder: Path, source: str) -> Description:
        fill = index.get("_class_name") == FILL_PIPELINE
        if not fill:  # a Fill transformer may sit in a plain FluxPipeline folder
            channels = _json(folder / "transformer" / "config.json").get("in_channels")
            fill = isinstance(channels, int) and channels > 64
        return Description("flux", fill)

    def is_inpainting(self, pipe: Any) -> bool:
        return int(pipe.transformer.config.in_channels) > int(pipe.vae.config.latent_channels) * 4

    def latent_fills(self, inpainting_model: bool) -> bool:
        return not inpainting_model  # FLUX.1 Fill starts from its own latents (diffusers gives no hook)

    def defaults(self, pipe: Any) -> tuple[int, float]:
        if not pipe.transformer.config.guidance_embeds:  # schnell: 4 steps, no guidance
            return 4, 0.0
        return self.default_steps, self.default_guidance

    def pipelines(self, pipe: Any, device: torch.device) -> tuple[Any, Any, Any]:
        if not self.is_inpainting(pipe):
            return super().pipelines(pipe, device)
        from diffusers import FluxFillPipeline

        fill: Any = pipe if type(pipe).__name__ == FILL_PIPELINE else FluxFillPipeline(**_without_checker(pipe))
        fill = fill.to(device) if fill.device != device else fill
        fill.set_progress_bar_config(disable=True)
        return fill, fill, fill  # every task is inpainting on a Fill model

    # -- 1. encode -----------------------------------------------------------------------------
    def encode(self, model: LoadedPipelines, request: PreparedRequest) -> Conditioning:
        pipe = model.txt2img
        embeds, pooled, text_ids = pipe.encode_prompt(
            prompt=request.prompt,
            prompt_2=None,
            device=model.device,
            num_images_per_prompt=request.num_images,
            max_sequence_length=self.max_sequence_length(pipe),
        )
        tensors = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        if pipe.transformer.config.guidance_embeds:
            tensors["guidance"] = torch.full([request.num_images], request.guidance_scale, dtype=torch.float32)
            tensors["guidance"] = tensors["guidance"].to(model.device)
        return Conditioning(tensors, cfg=False, shared={"txt_ids": text_ids})

    def max_sequence_length(self, pipe: Any) -> int:
        """T5 tokens per prompt: dev was trained with 512, schnell with 256."""
        return 512 if pipe.transformer.config.guidance_embeds else 256

    # -- 2. start ------------------------------------------------------------------------------
    def start(self, model: LoadedPipelines, request: PreparedRequest, conditioning: Conditioning) -> State:
        scheduler = scheduler_for(request.sampler, model.txt2img.scheduler, self.samplers)
        gens = generators(request)
        dtype = conditioning.tensors["encoder_hidden_states"].dtype
        state = State(request, scheduler, torch.empty(0), torch.empty(0), gens, conditioning)
        with bound(model.txt2img, scheduler), bound(model.img2img, scheduler), bound(model.inpaint, scheduler):
            if model.inpainting_unet:
                self._start_fill(model, state, dtype)
            elif request.task is Task.INPAINT:
                self._start_inpaint(model, state, dtype)
            elif request.task is Task.IMG2IMG:
                self._start_img2img(model, state, dtype)
            else:
                self._start_txt2img(model, state, dtype)
        state.step_kwargs = step_kwargs(scheduler, gens, 0.0)
        state.step_kwargs.pop("eta", None)
        return state

    def _timesteps(self, pipe: Any, state: State, *, cut: bool) -> None:
        request, scheduler = state.request, state.scheduler
        steps = request.steps
        sigmas = None if scheduler.config.get("use_flow_sigmas") else list(np.linspace(1.0, 1 / steps, steps))
        scale = pipe.vae_scale_factor
        mu = calculate_shift(
            (request.height // scale // 2) * (request.width // scale // 2),
            scheduler.config.get("base_image_seq_len", 256),
            scheduler.config.get("max_image_seq_len", 4096),
            scheduler.config.get("base_shift", 0.5),
            scheduler.config.get("max_shift", 1.15),
        )
        state.timesteps, _ = retrieve_timesteps(scheduler, steps, pipe._execution_device, sigmas=sigmas, mu=mu)
        if cut:
            state.timesteps, _ = pipe.get_timesteps(steps, strength(request), pipe._execution_device)
        else:
            scheduler.set_begin_index(0)

    def _start_txt2img(self, model: LoadedPipelines, state: State, dtype: torch.dtype) -> None:
        request, pipe = state.request, model.txt2img
        channels = pipe.transformer.config.in_channels // 4
        state.latents, state.extra["img_ids"] = pipe.prepare_latents(
            request.num_images, channels, request.height, request.width, dtype, model.device, state.generators
        )
        self._timesteps(pipe, state, cut=False)

    def _start_img2img(self, model: LoadedPipelines, state: State, dtype: torch.dtype) -> None:
        request, pipe = state.request, model.img2img
        image = init_pixels(pipe, request, height=request.height, width=request.width)
        self._timesteps(pipe, state, cut=True)
        count = request.num_images
        state.latents, state.extra["img_ids"] = pipe.prepare_latents(
            image.to(dtype=torch.float32), state.timesteps[:1].repeat(count), count,
            pipe.transformer.config.in_channels // 4, request.height, request.width, dtype, model.device,
            state.generators,
        )  # fmt: skip

    def _start_inpaint(self, model: LoadedPipelines, state: State, dtype: torch.dtype) -> None:
        request, pipe = state.request, model.inpaint
        height, width, count = request.height, request.width, request.num_images
        image = pipe.image_processor.preprocess(request.init_image, height=height, width=width).to(torch.float32)
        self._timesteps(pipe, state, cut=True)
        channels = pipe.transformer.config.in_channels // 4
        state.latents, noise, known, state.extra["img_ids"] = pipe.prepare_latents(
            image, state.timesteps[:1].repeat(count), count, channels, height, width, dtype, model.device,
            state.generators,
        )  # fmt: skip
        condition = pipe.mask_processor.preprocess(request.mask_image, height=height, width=width)
        mask, _ = pipe.prepare_mask_latents(
            condition, image * (condition < 0.5), 1, channels, count, height, width, dtype, model.device,
            state.generators,
        )  # fmt: skip
        if latent_fill(request, strength(request)):  # inpaint_fill latent_noise / latent_nothing
            start = filled_latents(request, known, mask, state.generators)
            state.latents = state.scheduler.scale_noise(start, state.timesteps[:1].repeat(count), noise)
        state.extra.update(mask=mask, noise=noise, image_latents=known)

    def _start_fill(self, model: LoadedPipelines, state: State, dtype: torch.dtype) -> None:
        request, pipe = state.request, model.inpaint
        init, mask, _ = _inpaint_inputs(request)
        height, width, count = request.height, request.width, request.num_images
        image = pipe.image_processor.preprocess(init, height=height, width=width).to(torch.float32)
        self._timesteps(pipe, state, cut=True)
        channels = pipe.vae.config.latent_channels
        state.latents, state.extra["img_ids"] = pipe.prepare_latents(
            image, state.timesteps[:1].repeat(count), count, channels, height, width, dtype, model.device,
            state.generators,
        )  # fmt: skip
        condition = pipe.mask_processor.preprocess(mask, height=height, width=width)
        masked = (image * (1 - condition)).to(device=model.device, dtype=dtype)
        masks, masked_latents = pipe.prepare_mask_latents(
            condition, masked, 1, channels, count, height, width, dtype, model.device, state.generators
        )
        state.extra["fill"] = torch.cat((masked_latents, masks), dim=-1)

    # -- 3. denoise ----------------------------------------------------------------------------
    def model_input(self, model: LoadedPipelines, state: State) -> torch.Tensor:
        fill = state.extra.get("fill")
        return state.latents if fill is None else torch.cat((state.latents, fill), dim=2)

    def forward(
        self, model: LoadedPipelines, states: Sequence[State], inputs: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        first = states[0]
        guidance = stacked(states, "guidance") if "guidance" in first.conditioning.tensors else None
        common = {
            "timestep": timesteps.to(inputs.dtype) / 1000,
            "pooled_projections": stacked(states, "pooled_projections"),
            "encoder_hidden_states": stacked(states, "encoder_hidden_states"),
            "txt_ids": first.conditioning.shared["txt_ids"],
            "img_ids": first.extra["img_ids"],  # one size per running set, so one set of position ids
        }
        double = [0]  # how many of a ControlNet's outputs go to the double-stream blocks

        def run(controlnet: Any, conditions: torch.Tensor) -> list[torch.Tensor]:
            blocks, singles = controlnet(
                hidden_states=inputs[..., : controlnet.config.in_channels],  # FLUX Fill's extra channels are not its
                controlnet_cond=conditions,
                conditioning_scale=1.0,
                guidance=guidance if controlnet.config.guidance_embeds else None,
                return_dict=False,
                **common,
            )
            double[0] = len(blocks or ())
            return [*(blocks or ()), *(singles or ())]

        control = summed_outputs(states, run)  # None without ControlNets
        prediction: torch.Tensor = model.txt2img.transformer(
            hidden_states=inputs,
            guidance=guidance,
            controlnet_block_samples=control[: double[0]] or None if control else None,
            controlnet_single_block_samples=control[double[0] :] or None if control else None,
            return_dict=False,
            **common,
        )[0]
        return prediction

    # -- 4. finish -----------------------------------------------------------------------------
    def decode(self, model: LoadedPipelines, states: Sequence[State]) -> list[Image.Image]:
        pipe = model.txt2img
        request = states[0].request
        latents = pipe._unpack_latents(
            torch.cat([state.latents for state in states]), request.height, request.width, pipe.vae_scale_factor
        )
        return self.decode_latents(pipe, latents)

    def control_condition(self, model: LoadedPipelines, pixels: torch.Tensor, controlnet: Any) -> torch.Tensor:
        """FLUX ControlNets take the encoded control image packed as the latents are (XLabs' ones, with
        their own hint encoder, the pixels in -1..1)."""
        if getattr(controlnet, "input_hint_block", None) is not None:
            return pixels * 2 - 1
        latents = super().control_condition(model, pixels, controlnet)
        batch, channels, height, width = latents.shape
        packed: torch.Tensor = model.txt2img._pack_latents(latents, batch, channels, height, width)
        return packed

    def image_latents(self, model: LoadedPipelines, state: State) -> torch.Tensor:
        request = state.request
        latents: torch.Tensor = model.txt2img._unpack_latents(
            state.latents, request.height, request.width, model.txt2img.vae_scale_factor
        )
        return latents

    def previews(self, latents: torch.Tensor, state: State) -> list[Image.Image]:
        from diffusers import FluxPipeline

        height, width = state.request.height, state.request.width
        return latent_rgb(FluxPipeline._unpack_latents(latents, height, width, 8), self.preview_factors)


def _without_checker(pipe: Any) -> dict[str, Any]:
    """A Fill model's components (a plain FluxPipeline folder holding a Fill transformer)."""
    return {name: module for name, module in pipe.components.items() if name not in NO_CHECKER}


FAMILY = Flux()
