"""The OpenAI Images API's fields and shapes, and their mapping to the core types.

OpenAI's own parameters are honoured where they mean something for Stable Diffusion (`prompt`, `n`,
`size`, `response_format`, `output_format`, `output_compression`, `model`); the rest (`quality`,
`style`, `background`, `moderation`, `user`) are accepted and ignored. Extensions: `negative_prompt`,
`seed`, `steps`, `guidance_scale`, `sampler`, `clip_skip` (and `strength` for edits and variations).
"""

from __future__ import annotations

import re
import time
from typing import Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from sdserver.api.adapter import fitted_images, ignored, open_header, random_seed
from sdserver.core.errors import InvalidRequest
from sdserver.core.types import GenerationRequest, GenerationResult, Limits, Task, validate_request
from sdserver.imaging import encode_image, has_alpha, to_rgb

# OpenAI's model names, as clients send them by default: they mean "the server's default model".
OPENAI_MODEL_PREFIXES = ("dall-e", "gpt-image", "chatgpt-image")
NAMES = {"num_images": "n", "width": "size", "height": "size", "init_image": "image", "mask_image": "mask"}
_SIZE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")
VARIATION_PROMPT = "a high quality image"  # variations have no prompt; img2img needs one

OutputFormat = Literal["png", "jpeg", "webp"]
Quality = Literal["auto", "standard", "hd", "low", "medium", "high"]
ResponseFormat = Literal["b64_json", "url"]


class Extensions(BaseModel):
    """sdserver's extensions to OpenAI's request (all optional)."""

    negative_prompt: str | None = Field(default=None, description="What to steer away from")
    seed: int | None = Field(default=None, description="Image i uses seed + i; absent: random")
    steps: int | None = Field(default=None, description="Denoising steps (default 50)")
    guidance_scale: float | None = Field(default=None, description="Classifier-free guidance (default 7.5)")
    sampler: str | None = Field(default=None, description="An AUTOMATIC1111 sampler name, e.g. 'DPM++ 2M Karras'")
    clip_skip: int | None = Field(default=None, description="1 = last CLIP layer (no skip), 2 = penultimate...")


class GenerationsBody(Extensions):
    """`POST /v1/images/generations`."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "example": {"prompt": "a red circle on a blue background", "n": 1, "size": "512x512", "seed": 42}
        },
    )

    prompt: str = Field(description="What to draw")
    model: str | None = Field(
        default=None, description="A model id from GET /v1/models; OpenAI's names mean the default"
    )
    n: int = Field(default=1, description="How many images")
    size: str | None = Field(default=None, description="WIDTHxHEIGHT (multiples of 8) or 'auto' (the model's own)")
    response_format: ResponseFormat | None = Field(default=None, description="b64_json (default) or url")
    output_format: OutputFormat = Field(default="png", description="png (with the parameters inside), jpeg or webp")
    output_compression: int | None = Field(default=None, ge=0, le=100, description="JPEG/WebP quality 0-100")
    quality: Quality | None = Field(default=None, description="Accepted and ignored")
    style: str | None = Field(default=None, description="Accepted and ignored")
    background: str | None = Field(default=None, description="Accepted and ignored")
    moderation: str | None = Field(default=None, description="Accepted and ignored")
    user: str | None = Field(default=None, description="Accepted and ignored")


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None
    seed: int | None = Field(default=None, description="Extension: the seed that reproduces this image alone")


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: OutputFormat | None = None
    size: str | None = None


class ModelOut(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "sdserver"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelOut]


def model_name(model: str | None) -> str | None:
    """The registry name the client means (None: the default model)."""
    if model is None or not model.strip() or model.strip().lower().startswith(OPENAI_MODEL_PREFIXES):
        return None
    return model.strip()


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """(width, height) as sent, unchecked (the core checks them: "0x0" is no "auto"); "auto" or
    nothing is (None, None), the model's or the image's own size."""
    if size is None or size.strip().lower() in ("", "auto"):
        return None, None
    match = _SIZE.match(size)
    if match is None:
        raise InvalidRequest(f"size: must be WIDTHxHEIGHT (e.g. 512x512) or 'auto', got {size!r}", field="size")
    return int(match.group(1)), int(match.group(2))


def _core_fields(ext: Extensions) -> dict[str, Any]:
    fields = {key: getattr(ext, key) for key in Extensions.model_fields if getattr(ext, key) is not None}
    if "seed" in fields:
        fields["seed"] = random_seed(fields["seed"])
    return fields


# OpenAI's fields that mean nothing for Stable Diffusion: accepted (its clients send them) and
# noted in the request's log line when sent.
IGNORED = ("quality", "style", "background", "moderation", "user")


def generation_request(body: GenerationsBody, limits: Limits) -> GenerationRequest:
    ignored(body.model_extra or {}, set())
    sent = {name: value for name in IGNORED if (value := getattr(body, name)) is not None}
    ignored(sent, set(), what="ignored_openai")
    width, height = parse_size(body.size)
    data = {
        **_core_fields(body),
        "task": Task.TXT2IMG,
        "prompt": body.prompt,
        "model": model_name(body.model),
        "num_images": body.n,
        "width": width,
        "height": height,
    }
    return validate_request(data, names=NAMES, limits=limits)


def repaint_mask(image: Image.Image) -> Image.Image:
    """OpenAI's convention (transparent = repaint) as the core's (white = repaint)."""
    alpha = image.convert("RGBA").getchannel("A")
    return alpha.point(lambda value: 255 if value < 128 else 0)


def edit_request(
    *,
    image: bytes,
    mask: bytes | None,
    prompt: str,
    model: str | None,
    n: int,
    size: str | None,
    ext: Extensions,
    strength: float | None,
    limits: Limits,
    transparency_is_mask: bool = True,
) -> GenerationRequest:
    """An edit: inpainting where the mask (or else the image itself) is transparent; without any
    transparency, img2img of the whole picture. Variations pass `transparency_is_mask=False`.

    The images are read by the shared decoder at the size generated (`size`, else the image's own),
    every limit checked before a pixel is decoded."""
    width, height = parse_size(size)
    opened_mask = None if mask is None else open_header(mask, "mask_image", limits, NAMES)
    if opened_mask is not None and not has_alpha(opened_mask):
        raise InvalidRequest(
            "mask: must be a PNG with an alpha channel (its transparent pixels are repainted), "
            f"got mode {opened_mask.mode}",
            field="mask",
        )
    picture, alpha_mask = fitted_images(image, opened_mask, width, height, limits, NAMES, keep_alpha=True)
    repaint = repaint_mask(alpha_mask) if alpha_mask is not None else None
    if repaint is None and transparency_is_mask and repaint_mask(picture).getbbox() is not None:
        repaint = repaint_mask(picture)  # DALL-E 2's rule: no mask, the image's own transparency
    data: dict[str, Any] = {
        **_core_fields(ext),
        "task": Task.IMG2IMG if repaint is None else Task.INPAINT,
        "prompt": prompt,
        "model": model_name(model),
        "num_images": n,
        "init_image": to_rgb(picture) if transparency_is_mask else picture.convert("RGB"),
        "mask_image": repaint,
        "strength": strength if strength is not None else (0.7 if repaint is None else 1.0),
    }
    return validate_request(data, names=NAMES, limits=limits)


def image_bytes(result: GenerationResult, output_format: str, compression: int | None) -> list[bytes]:
    return [encode_image(out.image, output_format, compression) for out in result.images]


def created_now() -> int:
    return int(time.time())
