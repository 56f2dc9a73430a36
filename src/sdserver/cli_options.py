"""`sdserver serve`'s options, generated from the `Settings` fields (a setting is written once).

Each field becomes one option: `port` -> `--port`, `limits.max_steps` -> `--limits.max-steps`; a bool
-> `--x/--no-x`; a list -> an option given once per value. The field's description and default are
the option's help; its type gives a plain metavar (TEXT, INTEGER, NUMBER, or the choices). Every
option defaults to None, "not given", so `load_settings` can apply the precedence flags > environment
(`SDSERVER_*`) > config.json. Fields marked `json_schema_extra={"cli": False}` have no option.
"""

from __future__ import annotations

import inspect
import types
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from sdserver.settings import Settings

_METAVARS: dict[type, str] = {str: "TEXT", int: "INTEGER", float: "NUMBER"}


@dataclass(frozen=True)
class SettingOption:
    """One CLI option and the setting it sets."""

    param: str  # the Python parameter name typer passes it by, e.g. limits__max_steps
    path: tuple[str, ...]  # where it goes in Settings, e.g. ("limits", "max_steps")
    annotation: Any  # typer's Annotated[... | None, typer.Option(...)]

    @property
    def env(self) -> str:
        return "SDSERVER_" + "__".join(self.path).upper()


def setting_options(model: type[BaseModel] = Settings, prefix: tuple[str, ...] = ()) -> list[SettingOption]:
    """The options of every field of `model` (nested models flattened), in declaration order."""
    options = []
    for name, field in model.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if extra.get("cli") is False:
            continue
        kind = _plain_type(field.annotation)
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            options += setting_options(kind, (*prefix, name))
            continue
        option = _option(field, (*prefix, name), kind, extra)
        if option is not None:
            options.append(option)
    return options


def _plain_type(annotation: Any) -> Any:
    """`X | None` -> X, Annotated[X, ...] -> X."""
    if get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) in (Union, types.UnionType):
        args = [arg for arg in get_args(annotation) if arg is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def _option(field: FieldInfo, path: tuple[str, ...], kind: Any, extra: dict[str, Any]) -> SettingOption | None:
    flag = "--" + ".".join(str(extra.get("flag", part)).replace("_", "-") for part in path)
    help_text = (field.description or "") + _default_note(field)
    metavar = extra.get("metavar")
    if kind is bool:
        negative = "--" + ".".join([*path[:-1], "no-" + path[-1]]).replace("_", "-")
        info = typer.Option(f"{flag}/{negative}", help=help_text, show_default=False)
        return SettingOption("__".join(path), path, Annotated[bool | None, info])
    if get_origin(kind) is Literal:
        info = typer.Option(flag, help=help_text, show_default=False)
        return SettingOption("__".join(path), path, Annotated[kind | None, info])
    if get_origin(kind) is list and get_args(kind) and get_args(kind)[0] in _METAVARS:
        item = get_args(kind)[0]
        info = typer.Option(flag, help=help_text, show_default=False, metavar=metavar or _METAVARS[item])
        return SettingOption("__".join(path), path, Annotated[list[item] | None, info])  # type: ignore[valid-type]
    if kind in _METAVARS:
        info = typer.Option(flag, help=help_text, show_default=False, metavar=metavar or _METAVARS[kind])
        return SettingOption("__".join(path), path, Annotated[kind | None, info])
    return None  # a type with no obvious flag form: config.json and environment only


def _default_note(field: FieldInfo) -> str:
    default = field.get_default(call_default_factory=True)
    if default is None or default == [] or isinstance(default, BaseModel):
        return ""
    if isinstance(default, bool):
        shown = "on" if default else "off"
    elif isinstance(default, float):
        shown = f"{default:g}"
    else:
        shown = str(default)
    return f" [default: {shown}]"


def parameters(options: list[SettingOption]) -> list[inspect.Parameter]:
    """Keyword-only parameters with typer annotations, for a generated command signature."""
    return [
        inspect.Parameter(option.param, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=option.annotation)
        for option in options
    ]


def overrides(options: list[SettingOption], values: dict[str, Any]) -> dict[str, Any]:
    """The flags given (not None, lists not empty), nested as Settings takes them."""
    result: dict[str, Any] = {}
    for option in options:
        value = values.get(option.param)
        if value is None or value == []:
            continue
        target = result
        for part in option.path[:-1]:
            target = target.setdefault(part, {})
        target[option.path[-1]] = value
    return result


def with_setting_options(func: Any, options: list[SettingOption]) -> Any:
    """`func(own parameters..., **flags)` presented to typer as taking its own parameters plus one
    keyword per option (typer passes them in `flags`, by `SettingOption.param`)."""
    own = [
        param
        for param in inspect.signature(func, eval_str=True).parameters.values()
        if param.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    params = [*own, *parameters(options)]
    func.__signature__ = inspect.Signature(params)
    func.__annotations__ = {param.name: param.annotation for param in params}
    return func
