"""AUTOMATIC1111's global options: a typed, bounded table of A1111's own option names and defaults.

GET /sdapi/v1/options answers the whole table; POST and `override_settings` accept those names only,
each value checked against the type of its default (and A1111's slider range or fixed choices), so
nothing stored can break a later request, and the table cannot grow. Honoured: `sd_model_checkpoint`,
`CLIP_stop_at_last_layers`, `show_progress_every_n_steps`; the others are kept and echoed, and a
request that sets one is told (log line, or `info.notes`) that it has no effect here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from importlib import resources
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, create_model

from sdserver.core.errors import InvalidRequest

HONOURED = frozenset({"sd_model_checkpoint", "CLIP_stop_at_last_layers", "show_progress_every_n_steps"})
# sdserver's own default: a preview at every step from a client's first progress poll on
# (A1111's is 10; its -1 means "none until the end").
OWN_DEFAULTS: dict[str, Any] = {"show_progress_every_n_steps": -1}
MAX_TEXT = 1024
MAX_ITEMS = 64
_INT = 2**31  # ints without a slider range stay within 32 bits
_FLOAT = 1e9

_Item = Annotated[str, StringConstraints(max_length=256)]
_table = json.loads(resources.files("sdserver").joinpath("assets/a1111/options.json").read_text(encoding="utf-8"))
DEFAULTS: dict[str, Any] = {**_table["defaults"], **OWN_DEFAULTS}


def _field(name: str, default: Any) -> tuple[Any, Any]:
    """The pydantic type of an option, from its default's type, range and choices."""
    low, high = _table["ranges"].get(name, (None, None))
    if name in _table["choices"]:
        return Literal[tuple(_table["choices"][name])], Field(default=default)
    if isinstance(default, bool):
        return bool, Field(default=default)
    if isinstance(default, int):
        return int, Field(default=default, ge=-_INT if low is None else low, le=_INT - 1 if high is None else high)
    if isinstance(default, float):
        low, high = (-_FLOAT if low is None else low), (_FLOAT if high is None else high)
        return float, Field(default=default, allow_inf_nan=False, ge=low, le=high)
    if isinstance(default, list):
        return list[_Item], Field(default=default, max_length=MAX_ITEMS)
    return str | None, Field(default=default, max_length=MAX_TEXT)


OptionsModel: type[BaseModel] = create_model(  # type: ignore[call-overload]
    "A1111Options",
    __config__=ConfigDict(extra="forbid"),
    **{name: _field(name, default) for name, default in DEFAULTS.items()},
)


def check(values: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """The options in `values`, typed; an unknown name or a bad value is a 400 naming it
    (`where`: a prefix for the name, e.g. "override_settings.")."""
    try:
        model = OptionsModel.model_validate(dict(values))
    except ValidationError as exc:
        error = exc.errors()[0]
        name = str(error["loc"][0]) if error["loc"] else "options"
        if error["type"] == "extra_forbidden":
            reason = "not an AUTOMATIC1111 option (GET /sdapi/v1/options lists them)"
        else:
            shown = json.dumps(error.get("input"), default=str)
            reason = f"{error['msg']}, got {shown if len(shown) <= 60 else shown[:57] + '...'}"
        raise InvalidRequest(f"{where}{name}: {reason}", field=f"{where}{name}") from None
    return {name: getattr(model, name) for name in model.model_fields_set}


def unhonoured(values: Mapping[str, Any]) -> list[str]:
    """The options in `values` that sdserver keeps but does not act on."""
    return sorted(name for name in values if name not in HONOURED)
