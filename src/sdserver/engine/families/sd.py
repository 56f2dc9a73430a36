"""Stable Diffusion 1.x and 2.x: a UNet over 4-channel latents, a CLIP (1.x) or OpenCLIP (2.x) text encoder,
epsilon or v-prediction, classifier-free guidance. SDXL (sdxl.py) builds on this module.

Inpainting comes two ways, both from diffusers' inpaint pipeline helpers: a dedicated 9-channel model
takes the mask and the masked image's latents as input; a regular model blends the noised original back
in outside the mask after every step.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import diffusers
import torch
import yaml
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.loaders.single_file import load_single_file_sub_model
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from PIL import Image

from sdserver.core.errors import ModelLoadError, UnsupportedModel
from sdserver.core.types import PreparedRequest, Task
from sdserver.engine.architectures import Prediction, detect, write_config_folder
from sdserver.engine.checkpoint import read_state_dict
from sdserver.engine.control import step_residuals
from sdserver.engine.families.base import (
    Conditioning,
    Description,
    Family,
    FileOptions,
    Shapes,
    State,
    bound,
    filled_latents,
    generators,
    init_pixels,
    keep_unmasked,
    latent_fill,
    stacked,
    step_kwargs,
)
from sdserver.engine.samplers import SAMPLERS, scheduler_for

if TYPE_CHECKING:
    from sdserver.engine.loaders import LoadedPipelines

log = logging.getLogger(__name__)

# The widely used least-squares fit of SD 1.x/2.x latents to RGB (for previews only).
SD_LATENT_RGB = ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473))


class StableDiffusion(Family):
    name = "sd"
    kinds: ClassVar[tuple[str, ...]] = ("sd1", "sd2")
    pipeline_classes: ClassVar[tuple[str, ...]] = (
        "StableDiffusionPipeline",
        "StableDiffusionImg2ImgPipeline",
        "StableDiffusionInpaintPipeline",
    )
    samplers = SAMPLERS
    preview_factors = SD_LATENT_RGB
    embedding_encoders: ClassVar[tuple[str, ...]] = ("text_encoder",)

    # -- what the model is ---------------------------------------------------------------------
    def kind_of(self, pipe: Any) -> str:
        return _clip_kind(pipe.text_encoder.config.hidden_act)

    def describe_index(self, index: dict[str, Any], folder: Path, source: str) -> Description:
        if index.get("text_encoder", [None])[0] is None:
            raise UnsupportedModel(f"{source} has no first text encoder (an SDXL refiner?): it cannot serve txt2img")
        unet = _json(folder / "unet" / "config.json")
        channels = unet.get("in_channels")
        kind = (
            self.kinds[0]
            if len(self.kinds) == 1
            else _clip_kind(_json(folder / "text_encoder" / "config.json").get("hidden_act"))
        )
        return Description(kind, channels == 9 if isinstance(channels, int) else None)

    def detect_file(self, path: Path, shapes: Shapes | None, options: FileOptions) -> Description | None:
        if shapes is None:  # a .ckpt: only SD 1.x/2.x/XL ship as pickles; its kind is read when it loads
            return Description("unknown", None) if self.name == "sd" else None
        arch = detect(shapes, name=path.name, prediction_type=options.prediction_type)
        return Description(arch.kind, arch.inpainting) if arch.kind in self.kinds else None

    def load_file(self, path: Path, dtype: torch.dtype, options: FileOptions) -> Any:
        return load_ldm_file(path, dtype, options.prediction_type)

    def check(self, pipe: Any, source: str) -> None:
        if getattr(pipe, "text_encoder", None) is None:
            raise UnsupportedModel(
                f"model {source!r} has no first text encoder (an SDXL refiner?): it cannot serve txt2img"
            )

    def denoiser(self, pipe: Any) -> torch.nn.Module:
        unet: torch.nn.Module = pipe.unet
        return unet

    def is_inpainting(self, pipe: Any) -> bool:
        return int(pipe.unet.config.in_channels) == 9

    def native_size(self, pipe: Any) -> int:
        return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)

    # -- 1. encode -----------------------------------------------------------------------------
    def encode(self, model: LoadedPipelines, request: PreparedRequest) -> Conditioning:
        pipe = model.txt2img
        cfg = request.guidance_scale > 1 and pipe.unet.config.time_cond_proj_dim is None
        count = request.num_images
        names = model.embeddings  # textual-inversion embeddings named in the prompts: their tokens
        prompt, negative = names.rewrite(request.prompt), names.rewrite(request.negative_prompt or "")
        if request.clip_skip is not None and request.clip_skip > 1:
            cond = _clip_skip_embeds(pipe, [prompt] * count, request.clip_skip - 1)
            uncond = _clip_skip_embeds(pipe, [negative] * count, request.clip_skip - 1)
        else:
            cond, uncond = pipe.encode_prompt(prompt, model.device, count, cfg, negative or None)
        tensors = {"encoder_hidden_states": torch.cat([uncond, cond]) if cfg else cond}
        if pipe.unet.config.time_cond_proj_dim is not None:  # guidance-embedding (LCM-distilled) UNets
            scale = torch.tensor(request.guidance_scale - 1).repeat(count)
            embedding = pipe.get_guidance_scale_embedding(scale, embedding_dim=pipe.unet.config.time_cond_proj_dim)
            tensors["timestep_cond"] = embedding.to(device=model.device, dtype=cond.dtype)
        return Conditioning(tensors, cfg)

    # -- 2. start ------------------------------------------------------------------------------
    def start(self, model: LoadedPipelines, request: PreparedRequest, conditioning: Conditioning) -> State:
        scheduler = scheduler_for(request.sampler, model.txt2img.scheduler)
        gens = generators(request)
        dtype = conditioning.tensors["encoder_hidden_states"].dtype
        state = State(request, scheduler, torch.empty(0), torch.empty(0), gens, conditioning)
        if model.inpainting_unet or request.task is Task.INPAINT:
            self._start_inpaint(model, state, dtype)
        elif request.task is Task.IMG2IMG:
            self._start_img2img(model, state, dtype)
        else:
            self._start_txt2img(model, state, dtype)
        state.step_kwargs = step_kwargs(scheduler, gens, request.eta)
        return state

    def _start_txt2img(self, model: LoadedPipelines, state: State, dtype: torch.dtype) -> None:
        request, pipe = state.request, model.txt2img
        with bound(pipe, state.scheduler):
            state.timesteps, _ = retrieve_timesteps(state.scheduler, request.steps, model.device)
            channels = pipe.unet.config.in_channels
            state.latents = pipe.prepare_latents(
                request.num_images, channels, request.height, request.width, dtype, model.device, state.generators
            )

    def _start_img2img(self, model: LoadedPipelines, state: State, dtype: torch.dtype) -> None:
        request, pipe = state.request, model.img2img
        image = init_pixels(pipe, request)
        with bound(pipe, state.scheduler):
            retrieve_timesteps(state.scheduler, request.steps, model.device)
            state.timesteps, _ = pipe.get_timesteps(request.steps, request.strength, model.device)
            first = state.timesteps[:1].repeat(request.num_images)
            state.latents = pipe.prepare_latents(
                image, first, 1, request.num_images, dtype, model.device, state.generators
            )

    def _start_inpaint(self, model: LoadedPipelines, state: State, dtype: torch.dtype) -> None:
        """Inpainting; on a 9-channel model also txt2img (a full mask over grey) and img2img (a full mask)."""
        request, pipe = state.request, model.inpaint
        init, mask, strength = _inpaint_inputs(request)
        height, width, count = request.height, request.width, request.num_images
        image = request.init_tensor  # a hires second pass: its upscaled pixels, a row per image
        if image is None:
            image = pipe.image_processor.preprocess(init, height=height, width=width)
        image = image.to(dtype=torch.float32)
        with bound(pipe, state.scheduler):
            retrieve_timesteps(state.scheduler, request.steps, model.device)
            state.timesteps, _ = pipe.get_timesteps(
                num_inference_steps=request.steps, strength=strength, device=model.device
            )
            blend = not model.inpainting_unet  # a regular model: blend the known latents back in each step
            fill = latent_fill(request, strength)
            outputs = pipe.prepare_latents(
                count, pipe.vae.config.latent_channels, height, width, dtype, model.device, state.generators,
                image=image, timestep=state.timesteps[:1].repeat(count), is_strength_max=strength == 1.0,
                return_noise=True, return_image_latents=blend or fill,
            )  # fmt: skip
            condition = pipe.mask_processor.preprocess(mask, height=height, width=width)
            masks, masked = pipe.prepare_mask_latents(
                condition, image * (condition < 0.5), count, height, width, dtype, model.device, state.generators, False
            )
        state.latents = outputs[0]
        if fill:  # inpaint_fill latent_noise / latent_nothing: noised from the filled latents instead
            start = filled_latents(request, outputs[2], masks, state.generators)
            state.latents = state.scheduler.add_noise(start, outputs[1], state.timesteps[:1].repeat(count))
        state.extra.update(mask=masks, masked_latents=masked, noise=outputs[1])
        if blend:
            state.extra["image_latents"] = outputs[2]

    # -- 3. denoise ----------------------------------------------------------------------------
    def model_input(self, model: LoadedPipelines, state: State) -> torch.Tensor:
        rows = state.scheduler.scale_model_input(state.latents, state.timestep)
        if model.inpainting_unet:
            rows = torch.cat([rows, state.extra["mask"], state.extra["masked_latents"]], dim=1)
        return rows

    def forward(
        self, model: LoadedPipelines, states: Sequence[State], inputs: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        has_cond = "timestep_cond" in states[0].conditioning.tensors
        hidden, added = stacked(states, "encoder_hidden_states"), self.added_conditions(states)
        control = step_residuals(states, inputs, timesteps, hidden, added)  # None without ControlNets
        prediction: torch.Tensor = model.txt2img.unet(
            inputs,
            timesteps,
            encoder_hidden_states=hidden,
            timestep_cond=stacked(states, "timestep_cond") if has_cond else None,
            added_cond_kwargs=added,
            down_block_additional_residuals=control[0] if control else None,
            mid_block_additional_residual=control[1] if control else None,
            return_dict=False,
        )[0]
        return prediction

    def added_conditions(self, states: Sequence[State]) -> dict[str, torch.Tensor] | None:
        return None

    def after_step(self, model: LoadedPipelines, state: State) -> None:
        """Inpainting with a regular model: outside the mask, the original (base.keep_unmasked)."""
        keep_unmasked(state, flow=False)

    # -- 4. finish -----------------------------------------------------------------------------
    def decode(self, model: LoadedPipelines, states: Sequence[State]) -> list[Image.Image]:
        pipe = model.txt2img
        latents = torch.cat([state.latents for state in states])
        pixels = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
        return _postprocess(pipe, pixels)


def load_ldm_file(path: Path, dtype: torch.dtype, prediction_type: Prediction | None) -> Any:
    """An SD 1.x/2.x/XL pipeline from an original-layout checkpoint (.safetensors, or .ckpt through the
    weights-only unpickler), converted by diffusers with the shipped architecture configs."""
    state = read_state_dict(path)
    shapes = {key: tuple(tensor.shape) for key, tensor in state.items()}
    arch = detect(shapes, name=path.name, prediction_type=prediction_type or _sidecar_prediction(path))
    with tempfile.TemporaryDirectory(prefix="sdserver-config-") as tmp:
        folder = write_config_folder(arch, shapes, Path(tmp), name=path.name)
        components = {}
        for name, value in _json(folder / "model_index.json").items():
            if not isinstance(value, list) or value[0] is None:
                continue  # a setting, or a component single files do not have (the safety checker)
            library, class_name = value
            components[name] = load_single_file_sub_model(
                library_name=library,
                class_name=class_name,
                name=name,
                checkpoint=state,
                pipelines=diffusers.pipelines,
                is_pipeline_module=hasattr(diffusers.pipelines, library),
                cached_model_config_path=str(folder),
                local_files_only=True,
                torch_dtype=dtype,
            )
    log.info("%s: %s%s, %s", path.name, arch.kind, " inpainting" if arch.inpainting else "", arch.prediction_type)
    if arch.kind == "sdxl":
        return StableDiffusionXLPipeline(**components)
    no_checker = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    return StableDiffusionPipeline(**components, **no_checker)


def _sidecar_prediction(path: Path) -> Prediction | None:
    """A1111's convention: `model.yaml` beside `model.safetensors` is its original LDM config, where
    v-prediction models say `parameterization: "v"`."""
    yaml_path = path.with_suffix(".yaml")
    if not yaml_path.is_file():
        return None
    try:
        config = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))
        params = config["model"]["params"]
    except (OSError, UnicodeDecodeError, yaml.YAMLError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"cannot read {yaml_path.name} (the config beside {path.name}): {exc}") from None
    return "v_prediction" if isinstance(params, dict) and params.get("parameterization") == "v" else "epsilon"


def _inpaint_inputs(request: PreparedRequest) -> tuple[Image.Image, Image.Image, float]:
    """(image, mask, strength) for the inpaint path; txt2img and img2img on an inpainting model are
    inpainting of the whole picture."""
    size = (int(request.width or 0), int(request.height or 0))
    init = request.init_image if request.init_image is not None else Image.new("RGB", size, (127, 127, 127))
    mask = request.mask_image if request.mask_image is not None else Image.new("L", size, 255)
    strength = 1.0 if request.task is Task.TXT2IMG else request.strength
    return init, mask, strength


def _postprocess(pipe: Any, pixels: torch.Tensor) -> list[Image.Image]:
    images: list[Image.Image] = pipe.image_processor.postprocess(
        pixels, output_type="pil", do_denormalize=[True] * pixels.shape[0]
    )
    return images


def _clip_skip_embeds(pipe: Any, texts: list[str], skip: int) -> torch.Tensor:
    """Prompt embeddings from the CLIP layer `skip` layers before the last (normalised, as diffusers does).
    diffusers' own clip_skip path needs `text_encoder.text_model`, which transformers 5 no longer has."""
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    texts = pipe.maybe_convert_prompt(texts, tokenizer)  # a multi-vector embedding's name: all its tokens
    tokens = tokenizer(
        texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        hidden = encoder(tokens.input_ids.to(encoder.device), output_hidden_states=True).hidden_states[-(skip + 1)]
        norm = getattr(encoder, "text_model", encoder).final_layer_norm
        embeds: torch.Tensor = norm(hidden).to(dtype=encoder.dtype)
        return embeds


def _clip_kind(hidden_act: Any) -> str:
    return "sd2" if hidden_act == "gelu" else "sd1"  # OpenCLIP (2.x) uses gelu, OpenAI CLIP (1.x) quick_gelu


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


FAMILY = StableDiffusion()
