"""Generation parameters carried inside images, and read back.

Each PNG gets two text chunks: `parameters`, AUTOMATIC1111's "infotext" (prompt, then
`Negative prompt: ...`, then `Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, ...`), which A1111,
Civitai, ComfyUI and most image viewers read; and `parameters_json`, the same as structured JSON.

The engine attaches them to each generated image's `info` (PIL's own place for PNG text chunks) and
`imaging.encode_png` writes them.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from PIL import Image

from sdserver import __version__, safejson
from sdserver.core.types import GenerationRequest
from sdserver.imaging import METADATA_KEYS as TEXT_KEYS
from sdserver.imaging import open_image_header

PARAMETERS_KEY, JSON_KEY = TEXT_KEYS


def parameters_for(
    request: GenerationRequest,
    *,
    seed: int,
    width: int,
    height: int,
    model: str,
    model_hash: str | None,
    sampler: str,
    embeddings: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The structured parameters of one generated image (the `parameters_json` chunk). A hires fix's
    second pass is described as A1111 does: the first pass's prompt, steps and size, plus `hires`.
    `embeddings`: the textual-inversion embeddings the prompts used, name -> short hash ("TI hashes")."""
    second = request
    first: GenerationRequest | None = getattr(request, "first_pass", None)
    request = first if first is not None else request
    params: dict[str, Any] = {
        # A1111 keeps LoRA tags in the prompt: pasting the parameters back reproduces the image.
        "prompt": " ".join([request.prompt, *(f"<lora:{lora.name}:{lora.weight:g}>" for lora in request.loras)]),
        "negative_prompt": request.negative_prompt or "",
        "steps": request.steps,
        "sampler": sampler,
        "cfg_scale": request.guidance_scale,
        "seed": seed,
        "width": width,
        "height": height,
        "model": model,
        "model_hash": model_hash,
        "task": request.task.value,
        "eta": request.eta,
        "clip_skip": request.clip_skip,
        "denoising_strength": None if request.task.value == "txt2img" else request.strength,
        "software": f"sdserver {__version__}",
    }
    if embeddings:
        params["ti_hashes"] = ", ".join(f"{name}: {digest}" for name, digest in embeddings.items())
    if request.controlnets:
        params["controlnets"] = [
            {"module": unit.module, "model": unit.name, "weight": unit.weight, "resize_mode": unit.resize_mode,
             "processor_res": unit.processor_res, "guidance_start": unit.guidance_start,
             "guidance_end": unit.guidance_end, "control_mode": unit.control_mode, "pixel_perfect": unit.pixel_perfect}
            for unit in request.controlnets
        ]  # fmt: skip
    if first is not None and second.hires is not None:
        hires = second.hires
        params["denoising_strength"] = hires.strength
        params["hires"] = {
            "first_pass_size": [first.width, first.height],
            "upscale": hires.scale if not (hires.width or hires.height) else None,
            "resize": [width, height] if hires.width or hires.height else None,
            "steps": hires.steps,
            "upscaler": hires.upscaler,
            "sampler": hires.sampler,
            "prompt": hires.prompt or None,
            "negative_prompt": hires.negative_prompt or None,
        }
    return params


def infotext(params: Mapping[str, Any]) -> str:
    """AUTOMATIC1111's parameters text for `params` (as made by `parameters_for`)."""
    hires: Mapping[str, Any] = params.get("hires") or {}
    fields: list[tuple[str, Any]] = [
        ("Steps", params.get("steps")),
        ("Sampler", params.get("sampler")),
        ("CFG scale", _number(params.get("cfg_scale"))),
        ("Seed", params.get("seed")),
        ("Size", "{}x{}".format(*(hires.get("first_pass_size") or (params.get("width"), params.get("height"))))),
        ("Model hash", (params.get("model_hash") or "")[:10] or None),
        ("Model", params.get("model")),
        ("Denoising strength", _number(params.get("denoising_strength"))),
        ("Hires prompt", hires.get("prompt")),
        ("Hires negative prompt", hires.get("negative_prompt")),
        ("Hires upscale", _number(hires.get("upscale"))),
        ("Hires resize", "{}x{}".format(*hires["resize"]) if hires.get("resize") else None),
        ("Hires steps", hires.get("steps")),
        ("Hires upscaler", hires.get("upscaler")),
        ("Hires sampler", hires.get("sampler")),
        ("Clip skip", params.get("clip_skip")),
        ("TI hashes", params.get("ti_hashes")),
        *_controlnet_fields(params.get("controlnets") or []),
        ("Version", params.get("software")),
    ]
    last = ", ".join(f"{key}: {_quote(value)}" for key, value in fields if value is not None)
    lines = [str(params.get("prompt", ""))]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    lines.append(last)
    return "\n".join(lines)


CONTROL_MODES = {
    "balanced": "Balanced",
    "prompt": "My prompt is more important",
    "controlnet": "ControlNet is more important",
}


def _controlnet_fields(units: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    """The sd-webui-controlnet extension's infotext fields: `ControlNet 0: "Module: canny, Model: ..."`."""
    fields = []
    for index, unit in enumerate(units):
        parts = [
            ("Module", unit.get("module")), ("Model", unit.get("model")), ("Weight", _number(unit.get("weight"))),
            ("Resize Mode", unit.get("resize_mode")), ("Processor Res", unit.get("processor_res")),
            ("Guidance Start", unit.get("guidance_start")), ("Guidance End", unit.get("guidance_end")),
            ("Pixel Perfect", unit.get("pixel_perfect")),
            ("Control Mode", CONTROL_MODES.get(str(unit.get("control_mode")), unit.get("control_mode"))),
        ]  # fmt: skip
        fields.append((f"ControlNet {index}", ", ".join(f"{key}: {value}" for key, value in parts)))
    return fields


def text_chunks(params: Mapping[str, Any]) -> dict[str, str]:
    return {PARAMETERS_KEY: infotext(params), JSON_KEY: json.dumps(dict(params), ensure_ascii=False)}


def attach(image: Image.Image, params: Mapping[str, Any]) -> None:
    """Store the text chunks in `image.info`, where `imaging.encode_png` finds them."""
    image.info.update(text_chunks(params))


def params_of(image: Image.Image) -> dict[str, Any] | None:
    """The structured parameters attached to (or read with) `image`, if any: None when absent or
    not a JSON object (any image may carry any text in that chunk)."""
    text = image.info.get(JSON_KEY)
    if not isinstance(text, str):
        return None
    try:
        data = safejson.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def read_info(data: bytes) -> tuple[str | None, dict[str, Any] | None, dict[str, str]]:
    """(infotext, structured parameters, every other text item) of an encoded image, read from its
    header chunks alone (no pixel is decoded, so a decompression bomb costs nothing).

    Raises ValueError with a client-facing reason if it is not an image.
    """
    image = open_image_header(data)
    text = image.info.get(PARAMETERS_KEY)
    others = {str(key): value for key, value in image.info.items() if isinstance(value, str) and key not in TEXT_KEYS}
    return (text if isinstance(text, str) else None), params_of(image), others


_FIELD = re.compile(r'\s*(\w[\w \-/+]*):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_infotext(text: str) -> dict[str, Any]:
    """A1111's infotext as a dict: `Prompt`, `Negative prompt`, and each `Key: value` of the last line.

    Numbers become int/float; `Size: WxH` also gives `Size-1` and `Size-2` (as A1111 does). Any text
    parses: a quoted value that is not valid JSON is kept as written.
    """
    lines = text.strip().split("\n")
    last = lines[-1] if lines and _FIELD.findall(lines[-1]) and ": " in lines[-1] else ""
    body = lines[:-1] if last else lines
    prompt: list[str] = []
    negative: list[str] = []
    target = prompt
    for line in body:
        if line.startswith("Negative prompt:"):
            target = negative
            line = line.removeprefix("Negative prompt:").strip()
        target.append(line)
    result: dict[str, Any] = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, raw in _FIELD.findall(last):
        value = raw.strip()
        if value.startswith('"') and value.endswith('"'):
            value = _unquote(value)
        result[key] = _typed(value)
        if key == "Size" and re.fullmatch(r"\d+x\d+", value):
            width, height = value.split("x")
            result["Size-1"], result["Size-2"] = int(width), int(height)
    return result


def _unquote(value: str) -> str:
    try:
        unquoted = json.loads(value)
    except ValueError:  # e.g. an escape JSON does not know, as in "\\q"
        return value
    return unquoted if isinstance(unquoted, str) else value


def _typed(value: str) -> Any:
    for cast in (int, float):
        try:
            number = cast(value)
        except ValueError:  # not a number (or an int past Python's 4300 digits)
            continue
        return number if math.isfinite(number) else value  # "nan", "1e999": kept as text
    return value


def _number(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _quote(value: Any) -> str:
    text = str(value)
    if any(char in text for char in ',:"\n'):
        return json.dumps(text, ensure_ascii=False)
    return text
