"""The original API's fields, defaults and response shape, and their mapping to the core types."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, Field

from sdserver.api.adapter import ignored, random_seed
from sdserver.core.types import SAMPLER_NAMES, GenerationRequest, GenerationResult, Limits, Task, validate_request
from sdserver.imaging import png_base64

# The original form fields and their defaults (read from the original server.py).
DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "num_outputs": 1,
    "num_inference_steps": 100,
    "guidance_scale": 7.5,
    "eta": 0.0,
    "width": 512,
    "height": 512,
    "strength": 0.7,
}
# original field name -> core field name
TO_CORE = {
    "prompt": "prompt",
    "negative_prompt": "negative_prompt",  # not in the original; harmless and often asked for
    "seed": "seed",
    "num_outputs": "num_images",
    "num_inference_steps": "steps",
    "guidance_scale": "guidance_scale",
    "eta": "eta",
    "width": "width",
    "height": "height",
    "strength": "strength",
    "init_image": "init_image",
    "mask_image": "mask_image",
    "loras": "loras",  # ours: "name:weight,name2" from loras_dir (or <lora:name:weight> in the prompt)
    "sampler": "sampler",  # ours, as every protocol: an A1111 sampler name
    "clip_skip": "clip_skip",  # ours, as every protocol: 1 = the last CLIP layer
}
TO_ORIGINAL = {core: original for original, core in TO_CORE.items()}
SIZED_TASKS = (Task.TXT2IMG,)  # img2img and masking take their size from init_image


def to_generation_request(
    fields: Mapping[str, Any], task: Task, model: str | None, limits: Limits
) -> GenerationRequest:
    # Fields the original never had on a route are ignored as it did, and logged (never silently).
    unused: tuple[str, ...] = (
        ("width", "height") if task not in SIZED_TASKS else ("strength", "init_image", "mask_image")
    )
    if task is not Task.INPAINT:
        unused += ("mask_image",)
    ignored(fields, set(TO_CORE) - set(unused))
    values = {**DEFAULTS, **{k: v for k, v in fields.items() if k in TO_CORE and k not in unused and _given(k, v)}}
    for name in unused:
        values.pop(name, None)
    data = {TO_CORE[name]: value for name, value in values.items()}
    data["seed"] = random_seed(data.get("seed"))  # the original's "no seed" (0): pick a random one
    return validate_request({**data, "task": task, "model": model}, names=TO_ORIGINAL, limits=limits)


def form_schema(task: Task) -> dict[str, Any]:
    """The form fields of a route, for the OpenAPI document (values are checked in the core)."""
    properties: dict[str, Any] = {
        "prompt": {"type": "string", "description": "What to draw"},
        "negative_prompt": {"type": "string"},
        "seed": {"type": "integer", "default": 0, "description": "0: random; image i uses seed + i"},
        "num_outputs": {"type": "integer", "default": 1},
        "num_inference_steps": {"type": "integer", "default": 100},
        "guidance_scale": {"type": "number", "default": 7.5},
        "eta": {"type": "number", "default": 0.0},
        "loras": {"type": "string", "description": "LoRAs from loras_dir, e.g. 'ink:0.8,film' (for this request)"},
        "sampler": {"type": "string", "description": f"An A1111 sampler name: {', '.join(SAMPLER_NAMES)}"},
        "clip_skip": {"type": "integer", "description": "1 = the last CLIP layer (no skip), 2 = the penultimate..."},
    }
    if task in SIZED_TASKS:
        properties["width"] = {"type": "integer", "default": 512, "description": "A multiple of 8"}
        properties["height"] = {"type": "integer", "default": 512, "description": "A multiple of 8"}
    else:
        properties["init_image"] = {"type": "string", "description": "base64 PNG/JPEG/WebP (data URL allowed)"}
        properties["strength"] = {"type": "number", "default": 0.7, "description": "0..1, higher changes more"}
    if task is Task.INPAINT:
        properties["mask_image"] = {"type": "string", "description": "base64 image: white = repaint, black = keep"}
    required = ["prompt"] + (["init_image"] if task is not Task.TXT2IMG else [])
    required += ["mask_image"] if task is Task.INPAINT else []
    schema = {"type": "object", "properties": properties, "required": required}
    example = {"prompt": "a red circle on a blue background", "seed": 42, "num_inference_steps": 20}
    content = {"schema": schema, "example": example}
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/x-www-form-urlencoded": content,
                "application/json": content,
                "multipart/form-data": {"schema": schema},
            },
        }
    }


def _given(name: str, value: Any) -> bool:
    """An empty form field counts as absent (the prompt excepted: an empty prompt is an error)."""
    return name == "prompt" or not (isinstance(value, str | bytes) and not value.strip())


class ImageOut(BaseModel):
    base64: str = Field(description="PNG image, base64, no data-URL prefix")
    seed: int = Field(description="The seed that reproduces this image alone")
    mime_type: str = "image/png"
    mimetype: str = Field(default="image/png", description="Same as mime_type (the original README's name)")
    nsfw: bool = Field(description="The model's safety checker flagged it (the image is then blacked out)")


class SuccessResponse(BaseModel):
    status: str = "success"
    images: list[ImageOut]


class FailureResponse(BaseModel):
    status: str = "failure"
    message: str


class CustomModelOut(BaseModel):
    model_path: str
    ui_label: str
    url_path: str
    requires_safety_checker: bool


def to_response(result: GenerationResult | None) -> SuccessResponse:
    assert result is not None  # only A1111 answers a cancelled request
    return SuccessResponse(
        images=[ImageOut(base64=png_base64(out.image), seed=out.seed, nsfw=out.nsfw) for out in result.images]
    )
