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
    field_validator,
    model_validator,
)

from sdserver.core.errors import InvalidRequest
from sdserver.imaging import decode_image, to_rgb

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


class Task(StrEnum):
    TXT2IMG = "txt2img"
    IMG2IMG = "img2img"
    INPAINT = "inpaint"


def _image(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, Image.Image):
        return to_rgb(value)
    if isinstance(value, str | bytes):
        if not value:
            return None  # an empty form field means "not given"
        return decode_image(value)
    raise ValueError("expected a base64-encoded image")


ImageField = Annotated[Any, BeforeValidator(_image)]

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


class Limits(BaseModel):
    """Server-side caps on what one request may ask for (configurable in Settings)."""

    max_images: int = Field(default=8, ge=1, description="Images per request at most")
    max_steps: int = Field(default=150, ge=1, description="Denoising steps per request at most")
    max_side: int = Field(default=2048, ge=8, description="Width or height in pixels at most")
    max_pixels: int = Field(default=2048 * 2048, ge=64, description="Width x height at most")
    max_prompt_chars: int = Field(default=4000, ge=1, description="Characters of a prompt (or negative prompt) at most")
    max_guidance: float = Field(default=30.0, ge=0, description="guidance_scale at most")
    max_loras: int = Field(default=8, ge=0, description="LoRAs per request at most")


class GenerationRequest(BaseModel):
    """One client request: `num_images` images from one prompt, image i seeded with `seed + i`."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid", frozen=True)

    task: Task = Task.TXT2IMG
    model: str | None = None  # registry name; None is the base model
    prompt: str = Field(min_length=1)
    negative_prompt: str | None = None
    num_images: int = Field(default=1, ge=1)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)  # None: pick a random one
    steps: int | None = Field(default=None, ge=1)  # None: the model's own default (Engine.prepare fills it)
    guidance_scale: float = Field(default=7.5, ge=0.0, le=100.0, allow_inf_nan=False)
    eta: float = Field(default=0.0, ge=0.0, le=1.0, allow_inf_nan=False)
    width: int | None = Field(default=None, ge=8, le=8192)  # None: the model's native size
    height: int | None = Field(default=None, ge=8, le=8192)
    strength: float = Field(default=0.7, ge=0.0, le=1.0, allow_inf_nan=False)
    init_image: ImageField = None
    mask_image: ImageField = None
    sampler: str | None = None  # an A1111 sampler name (SAMPLER_NAMES); None: the model's own scheduler
    clip_skip: int | None = Field(default=None, ge=1, le=12)  # A1111's: 1 = last CLIP layer, 2 = penultimate
    loras: LoraField = ()  # also read from <lora:name:weight> tags in the prompt

    @model_validator(mode="before")
    @classmethod
    def _prompt_lora_tags(cls, data: Any) -> Any:
        if not isinstance(data, Mapping) or not isinstance(data.get("prompt"), str) or "<lora:" not in data["prompt"]:
            return data
        prompt, tags = split_lora_tags(data["prompt"])
        given = _lora_refs(data.get("loras"))
        return {**data, "prompt": prompt, "loras": (*given, *tags)}

    @field_validator("sampler", mode="before")
    @classmethod
    def _sampler(cls, value: Any) -> Any:
        if isinstance(value, str):
            return canonical_sampler(value) if value.strip() else None
        return value

    @model_validator(mode="after")
    def _check_inputs(self, info: ValidationInfo) -> GenerationRequest:
        limits: Limits = (info.context or {}).get("limits") or Limits()
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and value % 8:
                raise _field_error(name, value, "must be a multiple of 8")
            if value is not None and value > limits.max_side:
                raise _field_error(name, value, f"is over the limit of {limits.max_side}")
        if self.width and self.height and self.width * self.height > limits.max_pixels:
            pixels = f"{self.width} x height {self.height} = {self.width * self.height} pixels"
            raise _field_error("width", None, f"{pixels} is over the limit of {limits.max_pixels}")
        for name, value, limit in (
            ("num_images", self.num_images, limits.max_images),
            ("steps", self.steps, limits.max_steps),
            ("guidance_scale", self.guidance_scale, limits.max_guidance),
        ):
            if value is not None and value > limit:
                raise _field_error(name, value, f"is over the limit of {limit}")
        for name in ("prompt", "negative_prompt"):
            length = len(getattr(self, name) or "")
            if length > limits.max_prompt_chars:
                raise _field_error(name, None, f"is {length} characters, over the limit of {limits.max_prompt_chars}")
        if len(self.loras) > limits.max_loras:
            raise _field_error("loras", len(self.loras), f"LoRAs are over the limit of {limits.max_loras}")
        names = [lora.name for lora in self.loras]
        if len(set(names)) < len(names):
            raise _field_error("loras", names, "name each LoRA once")
        if self.seed is not None and self.seed + self.num_images - 1 > MAX_SEED:
            raise _field_error("seed", self.seed, f"+ {self.num_images - 1} (one seed per image) is over {MAX_SEED}")
        if self.task in (Task.IMG2IMG, Task.INPAINT) and self.init_image is None:
            raise _field_error("init_image", None, f"is required for {self.task.value}")
        if self.task is Task.INPAINT and self.mask_image is None:
            raise _field_error("mask_image", None, "is required for inpaint")
        if self.steps is not None:
            self.check_denoising_steps(self.steps)
        return self

    def with_steps(self, steps: int) -> GenerationRequest:
        """This request with `steps` filled in (the model's default), checked as a given value would be."""
        try:
            self.check_denoising_steps(steps)
        except _FieldError as exc:
            raise InvalidRequest(f"{exc.name}: {exc.reason}, got {_short(exc.value)}", field=exc.name) from None
        return self.model_copy(update={"steps": steps})

    def check_denoising_steps(self, steps: int) -> None:
        """img2img runs steps x strength denoising steps; zero would change nothing (and crash diffusers)."""
        if self.task is not Task.TXT2IMG and int(steps * self.strength) < 1:
            reason = f"x steps {steps} gives no denoising step; raise strength or steps"
            raise _field_error("strength", self.strength, reason)

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


class _FieldError(ValueError):
    def __init__(self, name: str, value: Any, reason: str) -> None:
        super().__init__(reason)
        self.name, self.value, self.reason = name, value, reason


def _field_error(name: str, value: Any, reason: str) -> _FieldError:
    return _FieldError(name, value, reason)


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
        if isinstance(context_error, _FieldError):
            field_name, value, reason = context_error.name, context_error.value, context_error.reason
        else:
            field_name = str(error["loc"][0]) if error["loc"] else "request"
            value, reason = error.get("input"), error["msg"].removeprefix("Value error, ")
            reason = reason[0].lower() + reason[1:] if reason else reason
        shown = names.get(field_name, field_name)
        where = shown
        if not isinstance(context_error, _FieldError):  # a nested field: loras[0].weight
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


@dataclass
class GenerationResult:
    model: str
    images: list[GeneratedImage] = field(default_factory=list)


@dataclass(frozen=True)
class Progress:
    step: int
    total: int
