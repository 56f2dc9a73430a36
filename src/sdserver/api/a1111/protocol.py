"""AUTOMATIC1111's `/sdapi/v1` fields and shapes, and their mapping to the core types.

Honoured: prompt, negative_prompt, seed (-1 = random), batch_size x n_iter images (one batched
call), steps, cfg_scale, width, height, sampler_name (or sampler_index) with scheduler (automatic,
uniform, karras), eta, denoising_strength, init_images, mask, mask_blur, inpainting_mask_invert,
send_images, save_images (into the server's history), override_settings (sd_model_checkpoint,
CLIP_stop_at_last_layers), the hires fix (enable_hr, hr_scale, hr_resize_x/y, hr_upscaler,
hr_second_pass_steps, hr_sampler_name, hr_prompt, hr_negative_prompt, denoising_strength), inpainting_fill,
inpaint_full_res (+ inpaint_full_res_padding), resize_mode (3, latent upscale, resizes the image instead),
ControlNet units (alwayson_scripts.controlnet). Accepted and ignored, each noted in `info.notes` when set:
subseed/subseed_strength, styles, restore_faces, tiling, scripts and other alwayson_scripts,
hr_checkpoint_name, any other field.
"""

from __future__ import annotations

import json
import time
from typing import Any

from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field

from sdserver import __version__
from sdserver.api.adapter import random_seed
from sdserver.core.control import units_from_alwayson_scripts
from sdserver.core.errors import FieldError, InvalidRequest, NotFound
from sdserver.core.images import decode_field, open_field
from sdserver.core.sizing import output_size
from sdserver.core.types import (
    SAMPLER_ALIASES,
    SAMPLER_NAMES,
    GenerationRequest,
    GenerationResult,
    Limits,
    Task,
    validate_request,
)
from sdserver.imaging import png_base64
from sdserver.metadata import PARAMETERS_KEY, params_of

NAMES = {
    "num_images": "batch_size",
    "guidance_scale": "cfg_scale",
    "init_image": "init_images",
    "mask_image": "mask",
    "strength": "denoising_strength",
    "sampler": "sampler_name",
    "clip_skip": "CLIP_stop_at_last_layers",
}
SCHEDULERS = {"automatic": "Automatic", "uniform": "Uniform", "karras": "Karras"}


class Txt2ImgBody(BaseModel):
    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "example": {
                "prompt": "a red circle on a blue background",
                "negative_prompt": "blurry",
                "steps": 20,
                "cfg_scale": 7,
                "width": 512,
                "height": 512,
                "seed": -1,
                "sampler_name": "DPM++ 2M",
                "scheduler": "karras",
                "batch_size": 1,
            }
        },
    )

    prompt: str = ""
    negative_prompt: str | None = ""
    styles: list[str] | None = None
    seed: int = Field(default=-1, description="-1: random")
    subseed: int = Field(default=-1, description="Ignored (noted in info)")
    subseed_strength: float = Field(default=0.0, description="Ignored (noted in info)")
    sampler_name: str | None = Field(default=None, description="GET /sdapi/v1/samplers; absent: the model's own")
    sampler_index: str | None = Field(default=None, description="Old name of sampler_name")
    scheduler: str | None = Field(default=None, description="automatic, uniform or karras")
    batch_size: int = Field(default=1, ge=1, description="Images per batch; batch_size x n_iter images in all")
    n_iter: int = Field(default=1, ge=1, description="Batches (run as one with the others)")
    steps: int | None = Field(default=None, description="Default: the model's (50 for SD, 20 for demo)")
    cfg_scale: float = 7.0
    width: int | None = Field(default=None, description="Default: the model's native size (or init image's)")
    height: int | None = Field(default=None, description="Default: the model's native size (or init image's)")
    eta: float | None = None
    denoising_strength: float | None = None
    override_settings: dict[str, Any] | None = Field(
        default=None, description="sd_model_checkpoint and CLIP_stop_at_last_layers are honoured"
    )
    override_settings_restore_afterwards: bool = True
    send_images: bool = True
    save_images: bool = Field(default=False, description="Keep the images in the server's history (/v1/history)")
    enable_hr: bool = Field(default=False, description="Hires fix: a second, upscaled img2img pass in the same job")
    hr_scale: float = Field(default=2.0, description="Hires fix: upscale by (unless hr_resize_x/y)")
    hr_upscaler: str | None = Field(default=None, description="Latent (and variants), Lanczos, Nearest or a model")
    hr_second_pass_steps: int = Field(default=0, description="0: the first pass's steps")
    hr_resize_x: int = Field(default=0, description="Hires fix: target width (0: from hr_scale or the aspect)")
    hr_resize_y: int = Field(default=0, description="Hires fix: target height (0: from hr_scale or the aspect)")
    hr_sampler_name: str | None = Field(default=None, description="Second pass's sampler (absent: the first's)")
    hr_prompt: str = Field(default="", description="Second pass's prompt (empty: the first's)")
    hr_negative_prompt: str = Field(default="", description="Second pass's negative prompt (empty: the first's)")


class Img2ImgBody(Txt2ImgBody):
    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "example": {
                "prompt": "a yellow circle",
                "init_images": ["iVBORw0KGgo..."],
                "mask": "iVBORw0KGgo...",
                "denoising_strength": 0.75,
                "mask_blur": 4,
                "inpainting_mask_invert": 0,
                "width": 512,
                "height": 512,
            }
        },
    )

    init_images: list[str] | None = Field(default=None, description="base64 images; the first is used")
    mask: str | None = Field(default=None, description="base64; white = repaint (unless inpainting_mask_invert)")
    mask_blur: int = Field(default=4, ge=0, le=64)
    inpainting_mask_invert: int = Field(default=0, ge=0, le=1)
    denoising_strength: float | None = 0.75
    resize_mode: int = Field(default=0, description="0 just resize, 1 crop and resize, 2 resize and fill, 3 as 0")
    inpainting_fill: int = Field(default=0, description="Masked content: 0 fill, 1 original, 2 latent noise, 3 nothing")
    inpaint_full_res: bool = Field(default=True, description="Only masked: the mask's box at full size, pasted back")
    inpaint_full_res_padding: int = Field(default=0, ge=0, le=256, description="Px around the box (only masked)")
    include_init_images: bool = False


class ImagesOut(BaseModel):
    images: list[str] = Field(description="base64 PNGs, each with its parameters inside")
    parameters: dict[str, Any]
    info: str = Field(description="JSON: all_seeds, all_prompts, infotexts, ...")


class PngInfoBody(BaseModel):
    image: str = Field(description="base64 PNG (data URL allowed)")


class PngInfoOut(BaseModel):
    info: str = Field(description="AUTOMATIC1111's parameters text ('' if none)")
    items: dict[str, Any] = Field(description="The image's other text chunks")
    parameters: dict[str, Any] = Field(description="The parameters text, parsed")
    parameters_json: dict[str, Any] | None = Field(default=None, description="sdserver's structured parameters")


def sampler_of(body: Txt2ImgBody) -> str | None:
    """The core sampler name from sampler_name + scheduler."""
    name = body.sampler_name or body.sampler_index
    name = name.strip() if name and name.strip() else None
    schedule = (body.scheduler or "automatic").strip().lower()
    if schedule not in SCHEDULERS:
        raise InvalidRequest(
            f"scheduler: unknown scheduler, got {body.scheduler!r}; valid: {', '.join(SCHEDULERS)}", field="scheduler"
        )
    if schedule == "karras" and name is not None and not name.lower().endswith("karras"):
        karras = f"{name} Karras"
        if karras.lower() not in {sampler.lower() for sampler in SAMPLER_NAMES}:
            raise InvalidRequest(f"scheduler: 'karras' is not available for sampler {name!r}", field="scheduler")
        return karras
    return name


# A1111 features sdserver does not have, by the field that turns each on: a request that turns one
# on is told so in `info.notes`. The fields that only tune a feature that is off (hr_scale without
# enable_hr, txt2img's denoising_strength...) need no note; nor do empty values; any other field
# this API does not know is noted.
UNSUPPORTED: dict[str, Any] = {
    "restore_faces": False, "tiling": False, "styles": None, "subseed_strength": 0.0,
    "script_name": None, "s_min_uncond": 0, "seed_resize_from_h": 0, "seed_resize_from_w": 0,
    "s_churn": 0, "s_tmin": 0, "s_tmax": 0, "s_noise": 1, "refiner_checkpoint": None, "image_cfg_scale": None,
}  # fmt: skip
INERT = frozenset(
    {
        "subseed", "script_args", "denoising_strength", "do_not_save_samples", "do_not_save_grid", "comments",
        "disable_extra_networks", "force_task_id", "infotext", "refiner_switch_at", "mask_blur_x", "mask_blur_y",
        "initial_noise_multiplier", "latent_mask", "alwayson_scripts", "mask_round", "firstpass_image",
        "sampler_index", "include_init_images", "override_settings_restore_afterwards",
    }
)  # fmt: skip


def generation_request(
    body: Txt2ImgBody, task: Task, model: str | None, clip_skip: Any, limits: Limits
) -> GenerationRequest:
    """`model` (a registry name) and `clip_skip` come from override_settings or the options."""
    images = body.batch_size * body.n_iter
    if images > limits.max_images:
        reason = f"{body.batch_size} x n_iter {body.n_iter} = {images} images is over the limit of {limits.max_images}"
        raise InvalidRequest(f"batch_size: {reason}", field="batch_size")
    data: dict[str, Any] = {
        "task": task,
        "model": model,
        "prompt": body.prompt,
        "negative_prompt": body.negative_prompt or None,
        "seed": random_seed(body.seed),
        "num_images": images,
        "steps": body.steps,
        "guidance_scale": body.cfg_scale,
        "sampler": sampler_of(body),
        "clip_skip": None if clip_skip in (None, 1, "1") else clip_skip,
        "width": body.width,
        "height": body.height,
    }
    if body.eta is not None:
        data["eta"] = body.eta
    units = units_from_alwayson_scripts((body.model_extra or {}).get("alwayson_scripts"), limits)
    if units:
        data["controlnets"] = units
    if isinstance(body, Img2ImgBody):
        data.update(_img2img_inputs(body, limits))
    elif body.enable_hr:
        data["hires"] = _hires(body)
    return validate_request(data, names=NAMES, limits=limits)


def _hires(body: Txt2ImgBody) -> dict[str, Any]:
    """txt2img's hires fix fields as the core's `hires`."""
    hires: dict[str, Any] = {
        "scale": body.hr_scale,
        "width": body.hr_resize_x or None,
        "height": body.hr_resize_y or None,
        "steps": body.hr_second_pass_steps or None,
        "sampler": body.hr_sampler_name,
        "prompt": body.hr_prompt or None,
        "negative_prompt": body.hr_negative_prompt or None,
    }
    if body.hr_upscaler and body.hr_upscaler.strip():
        hires["upscaler"] = body.hr_upscaler
    if body.denoising_strength is not None:
        hires["strength"] = body.denoising_strength
    return hires


# A1111's numbers for resize_mode and inpainting_fill, as the core's names
RESIZE_MODES = ("just_resize", "crop_and_resize", "resize_and_fill", "latent_upscale")
INPAINTING_FILLS = ("fill", "original", "latent_noise", "latent_nothing")


def _img2img_inputs(body: Img2ImgBody, limits: Limits) -> dict[str, Any]:
    """The init image and mask as sent: the core resizes them (resize_mode), blurs the mask (mask_blur),
    crops (inpaint_full_res) and fills (inpainting_fill) as A1111 does. Only the inversion is done here,
    once every size is checked (the headers first, as everywhere)."""
    if not body.init_images:
        raise InvalidRequest("init_images: at least one image is required", field="init_images")
    inputs: dict[str, Any] = {
        "init_image": body.init_images[0],
        "resize_mode": _numbered("resize_mode", body.resize_mode, RESIZE_MODES),
    }
    if body.denoising_strength is not None:
        inputs["strength"] = body.denoising_strength
    if body.mask:
        inputs.update(
            task=Task.INPAINT,
            mask_image=_inverted(body, limits) if body.inpainting_mask_invert else body.mask,
            mask_blur=body.mask_blur,
            inpaint_fill=_numbered("inpainting_fill", body.inpainting_fill, INPAINTING_FILLS),
            inpaint_full_res=body.inpaint_full_res,
            inpaint_padding=body.inpaint_full_res_padding,
        )
    return inputs


def _numbered(field: str, value: int, names: tuple[str, ...]) -> str:
    if not 0 <= value < len(names):
        valid = ", ".join(f"{number} ({name})" for number, name in enumerate(names))
        raise InvalidRequest(f"{field}: must be one of {valid}, got {value}", field=field)
    return names[value]


def _inverted(body: Img2ImgBody, limits: Limits) -> Image.Image:
    """The mask with black and white swapped (inpainting_mask_invert), decoded at its own size."""
    assert body.init_images and body.mask
    try:
        init = open_field(body.init_images[0], "init_image", limits.max_input_pixels)
        mask = open_field(body.mask, "mask_image", limits.max_input_pixels)
        output_size(body.width, body.height, init.size, limits)
        return ImageOps.invert(decode_field(mask, "mask_image").convert("L"))
    except FieldError as exc:
        raise exc.invalid(NAMES) from None


def notes(body: Txt2ImgBody, ignored_options: list[str] | None = None) -> list[str]:
    """What the request asked for that sdserver did not do."""
    found = []
    for name, value in body:  # a model's iteration includes its extra fields
        if _unsupported(name, value, type(body)):
            found.append(f"{name} is not supported and was ignored")
    for name in ignored_options or []:
        found.append(f"override_settings.{name} has no effect on sdserver and was ignored")
    if isinstance(body, Img2ImgBody) and body.enable_hr:
        found.append("enable_hr applies to txt2img only and was ignored")
    scripts = (body.model_extra or {}).get("alwayson_scripts")
    for script, args in scripts.items() if isinstance(scripts, dict) else ():
        if str(script).strip().lower() != "controlnet" and args:
            found.append(f"alwayson_scripts.{script} is not supported and was ignored (only ControlNet is)")
    for name, same in HIRES_SAME.items():
        value = (body.model_extra or {}).get(name)
        if body.enable_hr and value not in (None, "", [], same, [same]):
            found.append(f"{name} is not supported: the second pass used the first pass's")
    if isinstance(body, Img2ImgBody) and body.init_images and len(body.init_images) > 1:
        found.append("only the first of init_images was used")
    return found


_INERT_PREFIXES = ("hr_", "firstphase_")
# The hires fix's "another model/scheduler/module for the second pass", by A1111's value for "the same".
HIRES_SAME = {
    "hr_checkpoint_name": "Use same checkpoint", "hr_scheduler": "Use same scheduler",
    "hr_additional_modules": "Use same choices",
}  # fmt: skip
NEGATIVE_IS_OFF = frozenset({"seed_resize_from_h", "seed_resize_from_w"})  # A1111's default is -1


def _unsupported(name: str, value: Any, body_type: type[Txt2ImgBody]) -> bool:
    """Did the client turn on something sdserver does not do?"""
    if value in (None, False, 0, "", [], {}) or (value == -1 and name in NEGATIVE_IS_OFF):
        return False
    if name in UNSUPPORTED:
        return bool(value != UNSUPPORTED[name])
    # honoured, or tuning a feature that is off; else a field this API does not know
    return not (name in body_type.model_fields or name in INERT or name.startswith(_INERT_PREFIXES))


def response(
    body: Txt2ImgBody,
    generation: GenerationRequest,
    result: GenerationResult | None,
    model_hash: str | None,
    ignored_options: list[str] | None = None,
    engine_notes: list[str] | None = None,
) -> ImagesOut:
    """A1111's response: images, the request echoed as `parameters`, and `info` (a JSON string).
    `engine_notes`: what the engine did not use (e.g. embeddings for another architecture), for `info.notes`."""
    outs = result.images if result is not None else []
    params = [params_of(out.image) or {} for out in outs]
    first = params[0] if params else {}
    seeds = [out.seed for out in outs]
    info: dict[str, Any] = {
        "prompt": generation.prompt,
        "all_prompts": [generation.prompt] * len(outs),
        "negative_prompt": generation.negative_prompt or "",
        "all_negative_prompts": [generation.negative_prompt or ""] * len(outs),
        "seed": seeds[0] if seeds else generation.seed,
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": [-1] * len(outs),
        "subseed_strength": 0,
        "width": first.get("width", generation.width),
        "height": first.get("height", generation.height),
        "sampler_name": first.get("sampler", generation.sampler),
        "cfg_scale": generation.guidance_scale,
        "steps": first.get("steps", generation.steps),
        "batch_size": body.batch_size,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": result.model if result is not None else generation.model,
        "sd_model_hash": (model_hash or "")[:10] or None,
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": first.get("denoising_strength"),
        "extra_generation_params": _extra_params(first),
        "index_of_first_image": 0,
        "infotexts": [str(out.image.info.get(PARAMETERS_KEY, "")) for out in outs],
        "styles": body.styles or [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": generation.clip_skip or 1,
        "is_using_inpainting_conditioning": generation.task is Task.INPAINT,
        "version": f"sdserver {__version__}",
        "nsfw": [out.nsfw for out in outs],
        "interrupted": result is None,
        "notes": notes(body, ignored_options) + list(engine_notes or []),
    }
    echoed = body.model_dump()
    echoed.update(steps=info["steps"], width=info["width"], height=info["height"])  # what was used
    if isinstance(body, Img2ImgBody) and not body.include_init_images:
        echoed.update(init_images=None, mask=None)
    images = [png_base64(out.image) for out in outs] if body.send_images else []
    return ImagesOut(images=images, parameters=echoed, info=json.dumps(info))


def _extra_params(params: dict[str, Any]) -> dict[str, Any]:
    """A1111's extra_generation_params: the hires fix's, as its infotext names them."""
    hires = params.get("hires") or {}
    names = {
        "upscale": "Hires upscale", "steps": "Hires steps", "upscaler": "Hires upscaler", "sampler": "Hires sampler",
        "prompt": "Hires prompt", "negative_prompt": "Hires negative prompt",
    }  # fmt: skip
    extra = {label: hires[key] for key, label in names.items() if hires.get(key) is not None}
    if hires.get("resize"):
        extra["Hires resize"] = "{}x{}".format(*hires["resize"])
    if hires:
        extra["Denoising strength"] = params.get("denoising_strength")
        extra["First pass size"] = "{}x{}".format(*hires["first_pass_size"])
    return extra


def samplers() -> list[dict[str, Any]]:
    aliases: dict[str, list[str]] = {name: [] for name in SAMPLER_NAMES}
    for alias, name in SAMPLER_ALIASES.items():
        aliases[name].append(alias)
    return [{"name": name, "aliases": aliases[name], "options": {}} for name in SAMPLER_NAMES]


def schedulers() -> list[dict[str, Any]]:
    return [
        {"name": name, "label": label, "aliases": None, "default_rho": -1, "need_inner_model": False}
        for name, label in SCHEDULERS.items()
    ]


def title(name: str, model_hash: str | None) -> str:
    """A1111's checkpoint title: `name [hash10]`, or just `name` until the model has been loaded
    (A1111 also lists checkpoints without a hash until it has computed one)."""
    return f"{name} [{model_hash[:10]}]" if model_hash else name


def resolve_checkpoint(value: Any, titles: dict[str, str]) -> str:
    """A registry name from a checkpoint title, name or short hash (`titles`: name -> title)."""
    text = str(value).strip()
    bare = text.rsplit(" [", 1)[0] if text.endswith("]") else text  # a title seen before, hash or not
    for name, full in titles.items():
        if name in (text, bare) or text == full or (full != name and text == full.rsplit(" [", 1)[-1].rstrip("]")):
            return name
    raise NotFound(
        f"sd_model_checkpoint: no checkpoint {text!r}; available: {', '.join(titles.values())}",
        field="sd_model_checkpoint",
    )
