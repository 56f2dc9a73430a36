"""ControlNet units as clients send them: the sd-webui-controlnet extension's `alwayson_scripts` arguments.

A unit names a ControlNet model (from `controlnet_dir`), a preprocessor module (sdserver.preprocessors)
and a control image, with the extension's settings. Validation happens here, once, with errors naming
`alwayson_scripts.controlnet.args[i].<field>` and the bad value; values read as the extension reads them
(its long names and ints for control_mode and resize_mode, `input_image` for `image`, -1 for a
module's default). Fields the extension has and sdserver does not use (low_vram, hr_option,
save_detected_map, advanced_weighting...) are ignored.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, ValidationInfo, model_validator

from sdserver import preprocessors
from sdserver.core.errors import FieldError, InvalidRequest
from sdserver.core.fields import ImageField
from sdserver.core.images import decode_field
from sdserver.core.limits import Limits

ControlMode = Literal["balanced", "prompt", "controlnet"]
ResizeMode = preprocessors.ResizeMode  # "Just Resize" | "Crop and Resize" | "Resize and Fill"
MAX_UNITS = 8  # ControlNet units per request at most (the extension's UI offers 3 by default)

_CONTROL_MODES: dict[Any, ControlMode] = {
    0: "balanced", 1: "prompt", 2: "controlnet",
    "balanced": "balanced", "prompt": "prompt", "controlnet": "controlnet",
    "my prompt is more important": "prompt", "controlnet is more important": "controlnet",
}  # fmt: skip
_RESIZE_MODES: dict[Any, ResizeMode] = {
    0: "Just Resize", 1: "Crop and Resize", 2: "Resize and Fill", 3: "Just Resize",  # 3: "(Latent upscale)"
    "just resize": "Just Resize", "crop and resize": "Crop and Resize", "resize and fill": "Resize and Fill",
    "just_resize": "Just Resize", "crop_and_resize": "Crop and Resize", "resize_and_fill": "Resize and Fill",
    "inner fit (scale to fit)": "Crop and Resize", "scale to fit (inner fit)": "Crop and Resize",
    "outer fit (shrink to fit)": "Resize and Fill", "envelope (outer fit)": "Resize and Fill",
    "just resize (latent upscale)": "Just Resize",
}  # fmt: skip
# The extension's older field names.
_ALIASES = {"input_image": "image", "guidance": "guidance_end", "mask_image": "mask"}
_HASH_SUFFIX = re.compile(r"\s*\[[0-9a-fA-F]{6,64}\]\s*$")


def model_name(title: str) -> str:
    """A ControlNet's name from the extension's title "name [hash]" (the hash is informative only)."""
    return _HASH_SUFFIX.sub("", title).strip()


def resize_mode(value: Any) -> ResizeMode:
    """The extension's resize mode from its name, an alias, or 0/1/2; ValueError lists the valid ones."""
    found: ResizeMode = _lookup(_RESIZE_MODES, value, "resize mode")
    return found


def _lookup(table: Mapping[Any, Any], value: Any, what: str) -> Any:
    key = value.strip().lower() if isinstance(value, str) else value
    if isinstance(key, float) and key.is_integer():
        key = int(key)
    if isinstance(key, bool) or key not in table:
        names = sorted({v for v in table.values()})
        raise ValueError(f"unknown {what}; use one of {', '.join(names)} (or 0, 1, 2)")
    return table[key]


class ControlUnit(BaseModel):
    """One ControlNet unit, validated; `image` and `mask` decoded once every check has passed.
    `processor_res`, `threshold_a` and `threshold_b` are the values the module runs with (its defaults
    where the client sent none, -1, or a value out of the slider's range)."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="ignore", frozen=True)

    model: str = Field(min_length=1, max_length=300)  # as sent: "name" or the extension's "name [hash]"
    module: str = "none"
    image: ImageField = None  # None: the request's own init image (img2img), as in the extension
    mask: ImageField = None
    weight: float = Field(default=1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    guidance_start: float = Field(default=0.0, ge=0.0, le=1.0, allow_inf_nan=False)
    guidance_end: float = Field(default=1.0, ge=0.0, le=1.0, allow_inf_nan=False)
    control_mode: ControlMode = "balanced"
    resize_mode: ResizeMode = "Crop and Resize"
    processor_res: float = -1
    threshold_a: float = Field(default=-1, allow_inf_nan=False)
    threshold_b: float = Field(default=-1, allow_inf_nan=False)
    pixel_perfect: bool = False
    enabled: bool = True

    @model_validator(mode="before")
    @classmethod
    def _extension_values(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        data = {_ALIASES.get(key, key): value for key, value in data.items()}
        image = data.get("image")
        if isinstance(image, Mapping):  # {"image": ..., "mask": ...}
            data["image"], data["mask"] = image.get("image"), image.get("mask", data.get("mask"))
        elif isinstance(image, list | tuple) and len(image) == 2:  # [image, mask]
            data["image"], data["mask"] = image
        for name, table, what in (
            ("control_mode", _CONTROL_MODES, "control mode"),
            ("resize_mode", _RESIZE_MODES, "resize mode"),
        ):
            if name in data:
                try:
                    data[name] = _lookup(table, data[name], what)
                except ValueError as exc:
                    raise FieldError(name, data[name], str(exc)) from None
        return data

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> ControlUnit:
        if self.guidance_start > self.guidance_end:
            raise FieldError("guidance_start", self.guidance_start, f"is after guidance_end {self.guidance_end}")
        params = preprocessors.resolve(self.module, self.processor_res, self.threshold_a, self.threshold_b)
        resolved = {
            "module": params.module.name,
            "processor_res": params.res,
            "threshold_a": params.threshold_a,
            "threshold_b": params.threshold_b,
        }
        if self.image is not None:  # every check passed: now the pixels
            resolved["image"] = decode_field(self.image, "image")
        if self.mask is not None:
            resolved["mask"] = decode_field(self.mask, "mask", "L")
        self.__dict__.update(resolved)  # frozen to clients, not to its own validator
        return self

    @property
    def name(self) -> str:
        """The ControlNet's name in controlnet_dir (`model` without the extension's " [hash]")."""
        return model_name(self.model)


_BOOL: TypeAdapter[bool] = TypeAdapter(bool)


def units_from_alwayson_scripts(alwayson_scripts: Any, limits: Limits | None = None) -> list[ControlUnit]:
    """The enabled ControlNet units of A1111's `alwayson_scripts` (`{"controlnet": {"args": [...]}}`,
    the script's name in any case); disabled units and units with model "None" are dropped, as the
    extension does. InvalidRequest names `alwayson_scripts.controlnet.args[i].<field>` and the value."""
    if not isinstance(alwayson_scripts, Mapping):
        return []
    key = next((k for k in alwayson_scripts if isinstance(k, str) and k.strip().lower() == "controlnet"), None)
    if key is None:
        return []
    where = f"alwayson_scripts.{key}.args"
    script = alwayson_scripts[key]
    args = script.get("args") if isinstance(script, Mapping) else None
    if not isinstance(args, list):
        raise InvalidRequest(f"{where}: expected a list of ControlNet units, got {_short(args)}", field=where)
    units = []
    for index, arg in enumerate(args):
        field = f"{where}[{index}]"
        if not isinstance(arg, Mapping):
            raise InvalidRequest(f"{field}: expected an object (a ControlNet unit), got {_short(arg)}", field=field)
        if _dropped(arg, field):
            continue
        units.append(_unit(arg, field, limits or Limits()))
    if len(units) > MAX_UNITS:
        raise InvalidRequest(f"{where}: {len(units)} ControlNet units, over the limit of {MAX_UNITS}", field=where)
    return units


def _dropped(arg: Mapping[str, Any], field: str) -> bool:
    try:
        enabled = _BOOL.validate_python(arg.get("enabled", True))
    except ValidationError:
        where = f"{field}.enabled"
        raise InvalidRequest(f"{where}: expected true or false, got {_short(arg['enabled'])}", field=where) from None
    model = arg.get("model")
    return not enabled or model is None or (isinstance(model, str) and model.strip().lower() in ("", "none"))


def _unit(arg: Mapping[str, Any], field: str, limits: Limits) -> ControlUnit:
    try:
        return ControlUnit.model_validate(arg, context={"limits": limits})
    except ValidationError as exc:
        error = exc.errors()[0]
        found = (error.get("ctx") or {}).get("error")
        if isinstance(found, FieldError):
            name, value, reason = found.name, found.value, found.reason
        else:
            name = ".".join(str(part) for part in error["loc"]) or "unit"
            value, reason = error.get("input"), error["msg"].removeprefix("Value error, ")
            reason = reason[0].lower() + reason[1:] if reason else reason
        sent = _OLD_NAMES.get(name)
        where = f"{field}.{sent if name not in arg and sent in arg else name}"  # as the client named it
        shown = "" if error["type"] == "missing" or value is None else f", got {_short(value)}"
        raise InvalidRequest(f"{where}: {reason}{shown}", field=where) from None


_OLD_NAMES = {new: old for old, new in _ALIASES.items()}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
