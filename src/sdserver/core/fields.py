"""Field types shared by the core's request models (core.types, core.control)."""

from __future__ import annotations

from typing import Annotated, Any

from PIL import Image
from pydantic import BeforeValidator, ValidationInfo

from sdserver.core.images import open_field
from sdserver.core.limits import Limits


def _image(value: Any, info: ValidationInfo) -> Any:
    """Only the header is read here; the pixels are decoded once every check has passed."""
    if value is None or (isinstance(value, str | bytes) and not value):
        return None  # an empty form field means "not given"
    if not isinstance(value, Image.Image | str | bytes):
        raise ValueError("expected a base64-encoded image")
    return open_field(value, str(info.field_name), limits_of(info).max_input_pixels)


def limits_of(info: ValidationInfo) -> Limits:
    """The limits a validation runs under (its context's), the defaults where none were given."""
    limits: Limits = (info.context or {}).get("limits") or Limits()
    return limits


ImageField = Annotated[Any, BeforeValidator(_image)]
