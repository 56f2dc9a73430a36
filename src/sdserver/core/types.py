"""The protocol-independent generation request and result.

Every protocol adapter maps its own fields onto `GenerationRequest`; validation of values lives here,
once, so every protocol rejects the same bad input with the same message.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Annotated, Any

from PIL import Image
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from sdserver.core.control import MAX_UNITS, ControlUnit
from sdserver.core.errors import FieldError, InvalidRequest
from sdserver.core.fields import ImageField, limits_of
from sdserver.core.images import decode_field, fit
from sdserver.core.inpainting import (
    InpaintFill,
    PasteBack,
    ResizeMode,
    blurred_mask,
    crop_for_full_res,
    crop_region,
    doubled,
    fill_masked,
    resized,
)
from sdserver.core.limits import Limits
from sdserver.core.sizing import hires_size, output_size

MAX_SEED = 2**63 - 1

# Samplers by AUTOMATIC1111's names (engine/samplers.py maps each to a diffusers scheduler), and
# the aliases clients also send (A1111's k-diffusion names, PLMS). Matched case-insensitively.
SAMPLER_NAMES = (
    "Euler", "Euler a", "Heun", "DPM2", "DPM2 Karras", "DPM2 a", "DPM2 a Karras",
    "DPM++ 2M", "DPM++ 2M Karras", "DPM++ 2M SDE", "DPM++ 2M SDE Karras", "DPM++ SDE", "DPM++ SDE Karras",
    "LMS", "LMS Karras", "DDIM", "PNDM", "UniPC", "DEIS", "LCM",
)  # fmt: skip
SAMPLER_ALIASES = {
    "k_euler": "Euler", "k_euler_a": "Euler a", "k_euler_ancestral": "Euler a", "k_heun": "Heun",
    "k_dpm_2": "DPM2", "k_dpm_2_ka": "DPM2 Karras", "k_dpm_2_a": "DPM2 a", "k_dpm_2_a_ka": "DPM2 a Karras",
    "k_dpmpp_2m": "DPM++ 2M", "k_dpmpp_2m_ka": "DPM++ 2M Karras", "k_dpmpp_2m_sde": "DPM++ 2M SDE",
    "k_dpmpp_2m_sde_ka": "DPM++ 2M SDE Karras", "k_dpmpp_sde": "DPM++ SDE", "k_dpmpp_sde_ka": "DPM++ SDE Karras",
    "k_lms": "LMS", "k_lms_ka": "LMS Karras", "plms": "PNDM",
}  # fmt: skip
_SAMPLERS_BY_KEY = {name.lower(): name for name in SAMPLER_NAMES} | SAMPLER_ALIASES


def canonical_sampler(name: str) -> str:
    """The canonical sampler name for `name` (any case, or an alias); ValueError lists the valid ones."""
    found = _SAMPLERS_BY_KEY.get(name.strip().lower())
    if found is None:
        raise ValueError(f"unknown sampler; valid: {', '.join(SAMPLER_NAMES)}")
    return found


def _sampler_name(value: Any) -> Any:
    """A sampler's canonical name (any case, or an alias); "" is none."""
    if isinstance(value, str):
        return canonical_sampler(value) if value.strip() else None
    return value


SamplerField = Annotated[str | None, BeforeValidator(_sampler_name)]  # an A1111 name (SAMPLER_NAMES)


class Task(StrEnum):
    TXT2IMG = "txt2img"
    IMG2IMG = "img2img"
    INPAINT = "inpaint"
    UPSCALE = "upscale"  # no denoising: init_image through an upscaler (engine/upscalers.py)


# AUTOMATIC1111's prompt syntax for LoRAs, which users type into every client: <lora:name:weight>
_LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?(?::[^>]*)?>", re.IGNORECASE)


class LoraRef(BaseModel):
    """A LoRA adapter (by its name in loras_dir) applied to one request at `weight`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    weight: float = Field(default=1.0, ge=-4.0, le=4.0, allow_inf_nan=False)


def _lora_refs(value: Any) -> Any:
    """Accepts "a:0.8,b" (a form field), a list of names or {"name", "weight"} objects, or {name: weight}."""
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        value = [part for part in value.split(",") if part.strip()]
    if isinstance(value, Mapping):
        return tuple({"name": name, "weight": weight} for name, weight in value.items())
    if isinstance(value, list | tuple):
        return tuple(_lora_ref(item) for item in value)
    return value


def _lora_ref(item: Any) -> Any:
    if isinstance(item, str):
        name, _, weight = item.strip().partition(":")
        return {"name": name.strip(), "weight": weight.strip()} if weight.strip() else {"name": name.strip()}
    return item


def split_lora_tags(prompt: str) -> tuple[str, list[dict[str, str]]]:
    """The prompt without its <lora:name:weight> tags, and the tags as LoRA references."""
    refs = [{"name": m.group(1).strip(), "weight": (m.group(2) or "1").strip()} for m in _LORA_TAG.finditer(prompt)]
    return " ".join(_LORA_TAG.sub(" ", prompt).split()), refs


LoraField = Annotated[tuple[LoraRef, ...], BeforeValidator(_lora_refs)]

# A1111's latent upscalers for the hires fix: the first pass's latents are resized (torch's
# interpolate modes), not its decoded image.
LATENT_UPSCALERS = {
    "latent": ("bilinear", False), "latent (antialiased)": ("bilinear", True), "latent (bicubic)": ("bicubic", False),
    "latent (bicubic antialiased)": ("bicubic", True), "latent (nearest)": ("nearest", False),
    "latent (nearest-exact)": ("nearest-exact", False),
}  # fmt: skip


class HiresFix(BaseModel):
    """A1111's hires fix (txt2img): after the first pass, upscale to `width` x `height` (or `scale` x the
    first pass's size) with `upscaler`, then run an img2img pass at `strength` there, in the same job."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    scale: float = Field(default=2.0, ge=1.0, le=8.0, allow_inf_nan=False)
    width: int | None = Field(default=None, ge=0, le=8192)  # 0 or None: from scale (or the other side's aspect)
    height: int | None = Field(default=None, ge=0, le=8192)
    upscaler: str = Field(default="Latent", min_length=1, max_length=200)  # Latent..., Lanczos, Nearest, a model
    steps: int | None = Field(default=None, ge=0)  # 0 or None: the first pass's steps
    strength: float = Field(default=0.7, ge=0.0, le=1.0, allow_inf_nan=False)
    sampler: SamplerField = None  # None: the first pass's
    prompt: str | None = None  # None or "": the first pass's
    negative_prompt: str | None = None

    @property
    def latent(self) -> tuple[str, bool] | None:
        """(interpolation mode, antialias) for a latent upscaler; None for an image upscaler."""
        return LATENT_UPSCALERS.get(self.upscaler.strip().lower())

    @property
    def denoising_steps(self) -> int:
        """Steps the second pass runs (img2img: steps x strength), once `steps` is filled in."""
        return int((self.steps or 0) * self.strength)


class GenerationRequest(BaseModel):
    """One client request: `num_images` images from one prompt, image i seeded with `seed + i`."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid", frozen=True)

    task: Task = Task.TXT2IMG
    model: str | None = None  # registry name; None is the base model
    prompt: str = ""  # required, but for an upscale
    negative_prompt: str | None = None
    num_images: int = Field(default=1, ge=1)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)  # None: pick a random one
    steps: int | None = Field(default=None, ge=1)  # None: the model's default (engine/families)
    guidance_scale: float | None = Field(default=None, ge=0.0, le=100.0, allow_inf_nan=False)  # None: the model's
    eta: float = Field(default=0.0, ge=0.0, le=1.0, allow_inf_nan=False)
    width: int | None = Field(default=None, ge=8, le=8192)  # None: the model's native size
    height: int | None = Field(default=None, ge=8, le=8192)
    strength: float = Field(default=0.7, ge=0.0, le=1.0, allow_inf_nan=False)
    init_image: ImageField = None
    mask_image: ImageField = None
    sampler: SamplerField = None  # an A1111 sampler name; None: the model's own scheduler
    clip_skip: int | None = Field(default=None, ge=1, le=12)  # A1111's: 1 = last CLIP layer, 2 = penultimate
    loras: LoraField = ()  # also read from <lora:name:weight> tags in the prompt
    hires: HiresFix | None = None  # txt2img: a second, upscaled pass (A1111's hires fix)
    upscaler: str | None = Field(default=None, max_length=200)  # task upscale: a name of /sdapi/v1/upscalers
    upscale_by: float = Field(default=2.0, ge=1.0, le=8.0, allow_inf_nan=False)  # task upscale, unless width/height
    controlnets: tuple[ControlUnit, ...] = Field(default=(), max_length=MAX_UNITS)  # from controlnet_dir
    # Inpainting and img2img options, AUTOMATIC1111's (core/inpainting.py); the inpaint_* and mask_blur
    # apply to inpaint only, resize_mode to an init image of another aspect than the size generated.
    mask_blur: int = Field(default=0, ge=0, le=64)  # px of Gaussian blur softening the mask's edge
    inpaint_fill: InpaintFill = "original"  # what the masked area starts from
    inpaint_full_res: bool = False  # "only masked": the mask's box, worked at the full size, pasted back
    inpaint_padding: int = Field(default=32, ge=0, le=256)  # px around the mask's box (inpaint_full_res)
    resize_mode: ResizeMode = "just_resize"

    @model_validator(mode="before")
    @classmethod
    def _prompt_lora_tags(cls, data: Any) -> Any:
        if not isinstance(data, Mapping) or not isinstance(data.get("prompt"), str) or "<lora:" not in data["prompt"]:
            return data
        prompt, tags = split_lora_tags(data["prompt"])
        given = _lora_refs(data.get("loras"))
        return {**data, "prompt": prompt, "loras": (*given, *tags)}

    @model_validator(mode="after")
    def _check_inputs(self, info: ValidationInfo) -> GenerationRequest:
        limits = limits_of(info)
        source = self.init_image.size if self.init_image is not None else None
        output_size(self.width, self.height, source, limits)  # checked before any pixel is decoded
        for name, value, limit in (
            ("num_images", self.num_images, limits.max_images),
            ("steps", self.steps, limits.max_steps),
            ("guidance_scale", self.guidance_scale, limits.max_guidance),
        ):
            if value is not None and value > limit:
                raise FieldError(name, value, f"is over the limit of {limit}")
        for name in ("prompt", "negative_prompt"):
            length = len(getattr(self, name) or "")
            if length > limits.max_prompt_chars:
                raise FieldError(name, None, f"is {length} characters, over the limit of {limits.max_prompt_chars}")
        if len(self.loras) > limits.max_loras:
            raise FieldError("loras", len(self.loras), f"LoRAs are over the limit of {limits.max_loras}")
        names = [lora.name for lora in self.loras]
        if len(set(names)) < len(names):
            raise FieldError("loras", names, "name each LoRA once")
        if self.seed is not None and self.seed + self.num_images - 1 > MAX_SEED:
            raise FieldError("seed", self.seed, f"+ {self.num_images - 1} (one seed per image) is over {MAX_SEED}")
        _check_task(self, limits)
        if self.task in (Task.IMG2IMG, Task.INPAINT, Task.UPSCALE) and self.init_image is None:
            raise FieldError("init_image", None, f"is required for {self.task.value}")
        if self.task is Task.INPAINT and self.mask_image is None:
            raise FieldError("mask_image", None, "is required for inpaint")
        if self.hires is not None and self.task is not Task.TXT2IMG:
            raise FieldError("hires", None, f"applies to txt2img only, not {self.task.value}")
        problem = strength_problem(self.task, self.steps, self.strength)
        if problem is not None:
            raise FieldError("strength", self.strength, problem)
        _check_canvas(self, limits)
        for name in ("init_image", "mask_image"):  # every check passed: now the pixels
            if (image := getattr(self, name)) is not None:
                self.__dict__[name] = decode_field(image, name)  # frozen to clients, not to its own validator
        return self

    def sized(self, limits: Limits, native: int | None) -> GenerationRequest:
        """The request at the size it will generate (core.sizing's rule, `native` the model's size):
        width and height filled in, the init image and mask resized to them (one resampling rule)."""
        source = self.init_image.size if self.init_image is not None else None
        try:
            size = output_size(self.width, self.height, source, limits, native=native)
        except FieldError as exc:
            raise exc.invalid() from None
        assert size is not None  # an init image or the native size gives one
        init, mask = self.init_image, self.mask_image
        if _full_res(self) and init is not None and mask is not None:  # the crop is sized in framed()
            update = {"width": size[0], "height": size[1], "mask_image": fit(mask, init.size, mask=True)}
            return self.model_copy(update=update)
        return self.model_copy(
            update={
                "width": size[0],
                "height": size[1],
                "init_image": None if init is None else resized(init, self.resize_mode, size),
                "mask_image": None if mask is None else resized(mask.convert("L"), self.resize_mode, size),
            }
        )

    def with_seed(self) -> GenerationRequest:
        """Fix a random seed now, so the result reports the seed that reproduces it."""
        if self.seed is not None:
            return self
        return self.model_copy(update={"seed": secrets.randbelow(2**32 - self.num_images) + 1})

    @property
    def seeds(self) -> list[int]:
        if self.seed is None:
            raise RuntimeError("seeds are only known after with_seed()")
        return [self.seed + i for i in range(self.num_images)]


class PreparedRequest(GenerationRequest):
    """A request completed by the engine for its model (`Engine.prepare`): the model named, the size,
    steps and guidance filled in with the model's own where the client gave none."""

    model: str
    steps: int
    guidance_scale: float
    width: int
    height: int
    # A hires fix's second pass (Engine.second_pass): its first pass's request, and where img2img starts
    # from: an engine tensor, one row per image (the upscaled pixels, or the resized latents).
    first_pass: GenerationRequest | None = None
    init_tensor: Any = None
    control_images: tuple[Image.Image, ...] = ()  # each ControlNet unit's preprocessed image (Engine.prepare)
    paste: PasteBack | None = None  # inpainting: how the result goes back onto the picture sent (framed)

    @property
    def needs_second_pass(self) -> bool:
        return self.hires is not None and self.first_pass is None

    def framed(self) -> PreparedRequest:
        """Inpainting's image work, done once for every family: the mask binarised and blurred
        (mask_blur), the crop of inpaint_full_res, the fill, and how the result is pasted back (A1111's
        overlay: twice the blurred mask for the whole picture, the blurred mask itself for a crop)."""
        init, mask = self.init_image, self.mask_image
        if self.task is not Task.INPAINT or init is None or mask is None:
            return self
        soft = blurred_mask(mask, self.mask_blur)
        work, work_mask, box, overlay = init, soft, None, doubled(soft)
        if _full_res(self):
            size = (self.width, self.height)
            box = crop_region(soft, self.inpaint_padding, size) or (0, 0, *init.size)  # blank: the whole
            work, work_mask = crop_for_full_res(init, soft, box, size)
            overlay = soft
        if self.inpaint_fill != "original":  # A1111 fills for its latent fills too
            work = fill_masked(work, work_mask)
        paste = PasteBack(init, overlay, box)
        return self.model_copy(update={"init_image": work, "mask_image": work_mask, "paste": paste})


def _check_task(request: GenerationRequest, limits: Limits) -> None:
    """A prompt for every task but an upscale; an upscale makes one image, its size within the limits."""
    if request.task is not Task.UPSCALE:
        if not request.prompt:
            raise FieldError("prompt", request.prompt, "is required")
        return
    if request.num_images != 1:
        raise FieldError("num_images", request.num_images, "an upscale makes one image")
    if request.init_image is not None:
        upscale_size(request, limits)


def upscale_size(request: GenerationRequest, limits: Limits) -> tuple[int, int]:
    """An upscale's output size: width x height as sent (one: the other keeps the aspect), else the
    init image's size x upscale_by."""
    assert request.init_image is not None
    size = request.init_image.size
    return hires_size(size, request.upscale_by, request.width, request.height, limits, field="upscale_by")


def _full_res(request: GenerationRequest) -> bool:
    return request.task is Task.INPAINT and request.inpaint_full_res and request.mask_image is not None


def _check_canvas(request: GenerationRequest, limits: Limits) -> None:
    """inpaint_full_res returns the init image at its own size: that size is an output too."""
    if not _full_res(request) or request.init_image is None:
        return
    width, height = request.init_image.size
    if max(width, height) > limits.max_side or width * height > limits.max_pixels:
        reason = (
            f"is {width}x{height}; with inpaint_full_res the result has the init image's size, over the limit "
            f"of {limits.max_side} per side and {limits.max_pixels} pixels"
        )
        raise FieldError("init_image", None, reason)


def strength_problem(task: Task, steps: int | None, strength: float) -> str | None:
    """img2img runs steps x strength denoising steps; zero would change nothing (and crash diffusers)."""
    if task is not Task.TXT2IMG and steps is not None and int(steps * strength) < 1:
        return f"x steps {steps} gives no denoising step; raise strength or steps"
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def validate_request(
    data: Mapping[str, Any], names: Mapping[str, str] | None = None, limits: Limits | None = None
) -> GenerationRequest:
    """Build a GenerationRequest, turning the first problem into an InvalidRequest.

    `names` maps internal field names to the client's own (e.g. num_images -> num_outputs),
    so the message names the field the client actually sent.
    """
    names = names or {}
    try:
        return GenerationRequest.model_validate(data, context={"limits": limits or Limits()})
    except ValidationError as exc:
        error = exc.errors()[0]
        context_error = (error.get("ctx") or {}).get("error")
        if isinstance(context_error, FieldError):
            field_name, value, reason = context_error.name, context_error.value, context_error.reason
        else:
            field_name = str(error["loc"][0]) if error["loc"] else "request"
            value, reason = error.get("input"), error["msg"].removeprefix("Value error, ")
            reason = reason[0].lower() + reason[1:] if reason else reason
        shown = names.get(field_name, field_name)
        where = shown
        if not isinstance(context_error, FieldError):  # a nested field: loras[0].weight
            where += "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"][1:])
        if error["type"] == "missing" or value is None:
            message = f"{where}: {reason}"
        else:
            message = f"{where}: {reason}, got {_short(value)}"
        raise InvalidRequest(message, field=shown) from None


@dataclass
class GeneratedImage:
    image: Image.Image
    seed: int
    nsfw: bool
    latents: Any = None  # a hires first pass's latents (an engine tensor), for its second pass


@dataclass
class GenerationResult:
    model: str
    images: list[GeneratedImage] = field(default_factory=list)


@dataclass(frozen=True)
class Progress:
    step: int
    total: int
