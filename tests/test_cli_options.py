"""`sdserver serve`'s options come from the Settings fields: one definition, help and default included."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, Field
from typer.testing import CliRunner

import sdserver.settings
from sdserver import cli_options
from sdserver.cli import app
from sdserver.settings import DEFAULT_MODEL, Settings

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("restore_logging")


def serve_help() -> str:
    result = runner.invoke(app, ["serve", "--help"], terminal_width=80)
    assert result.exit_code == 0, result.output
    return result.output


def flat(text: str) -> str:
    """The help text with its line wrapping undone (it wraps at the terminal width)."""
    return " ".join(text.split())


def all_fields(model: type[BaseModel] = Settings, prefix: str = "") -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        nested = field.annotation if isinstance(field.annotation, type) else None
        if nested is not None and issubclass(nested, BaseModel):
            fields |= all_fields(nested, f"{prefix}{name}.")
        else:
            fields[prefix + name] = field
    return fields


def test_every_setting_has_help_and_an_option_unless_marked_config_only() -> None:
    options = {".".join(option.path) for option in cli_options.setting_options()}
    for name, field in all_fields().items():
        assert field.description, f"setting {name} has no description (it is the --help text)"
        config_only = isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get("cli") is False
        assert (name in options) != config_only, f"setting {name}: an option, or json_schema_extra cli False"


def test_help_shows_each_fields_description_and_default() -> None:
    text = flat(serve_help())
    assert "--port INTEGER Port to listen on (0: any free port) [default: 1337]" in text
    assert "--host TEXT Address to listen on (0.0.0.0: every interface) [default: 127.0.0.1]" in text
    assert "--limits.max-steps INTEGER Denoising steps per request at most [default: 150]" in text
    assert "--allow-webhooks / --no-allow-webhooks" in text and "[default: off]" in text
    assert "--preload TEXT" in text and "--api-key TEXT" in text and "--cors-origin TEXT" in text
    assert "--dtype <auto|float16|bfloat16|float32>" in text


def test_help_uses_plain_metavars_states_the_default_model_and_the_environment() -> None:
    text = serve_help()
    assert not re.search(r"<(list\[|bool>|str>|int>|float>|path>)", text), text
    assert DEFAULT_MODEL in flat(text).replace("- ", "-")  # (a long id may wrap at its hyphen)
    assert "SDSERVER_<NAME>" in text and "SDSERVER_PORT=8080" in text
    assert "hf-token" not in text  # a secret on the command line would show in `ps`: config and env only


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and re.fullmatch(r"sdserver \d+\.\d+\.\d+\n", result.output)


def test_a_new_settings_field_gets_its_option_without_touching_the_cli() -> None:
    class Nested(BaseModel):
        depth: int = Field(default=2, description="How deep")

    class Extended(Settings):
        public_url: str | None = Field(default=None, description="Base URL for links")
        trusted_hosts: list[str] = Field(default_factory=list, description="Allowed Host headers")
        sign_webhooks: bool = Field(default=True, description="Sign deliveries")
        ratio: float = Field(default=0.5, description="A ratio")
        nested: Nested = Field(default_factory=Nested, description="Nested")
        secret: str | None = Field(default=None, description="Hidden", json_schema_extra={"cli": False})

    options = {option.param: option for option in cli_options.setting_options(Extended)}
    assert {"public_url", "trusted_hosts", "sign_webhooks", "ratio", "nested__depth"} <= set(options)
    assert "secret" not in options
    values = {"public_url": "https://x", "trusted_hosts": ["a", "b"], "sign_webhooks": False, "nested__depth": 5}
    assert cli_options.overrides(list(options.values()), {**values, "ratio": None}) == {
        "public_url": "https://x",
        "trusted_hosts": ["a", "b"],
        "sign_webhooks": False,
        "nested": {"depth": 5},
    }


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """What `serve` hands to load_settings; start-up then stops there."""
    seen: dict[str, Any] = {}

    def fake_load_settings(config: Path | None, **given: Any) -> Settings:
        seen.update(given, config=config)
        raise sdserver.settings.ConfigError("stop here")

    monkeypatch.setattr(sdserver.settings, "load_settings", fake_load_settings)
    return seen


def test_flags_reach_load_settings_nested_and_only_when_given(captured: dict[str, Any], tmp_path: Path) -> None:
    args = ["serve", "--port", "8080", "--limits.max-steps", "20", "--preload", "a", "--preload", "b"]
    args += ["--no-allow-webhooks", "--api-key", "k1", "--config", str(tmp_path / "c.json")]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "cannot start: stop here" in result.output
    assert captured == {
        "port": 8080,
        "limits": {"max_steps": 20},
        "preload": ["a", "b"],
        "allow_webhooks": False,
        "api_keys": ["k1"],
        "config": tmp_path / "c.json",
    }


def test_flags_beat_the_environment_which_beats_the_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text('{"port": 1111, "max_queue": 5, "limits": {"max_images": 2, "max_steps": 99}}')
    monkeypatch.setenv("SDSERVER_PORT", "2222")
    monkeypatch.setenv("SDSERVER_MAX_QUEUE", "6")
    options = cli_options.setting_options()
    given = cli_options.overrides(options, {"port": 3333, "limits__max_steps": 20})

    settings = sdserver.settings.load_settings(config, **given)

    assert (settings.port, settings.max_queue) == (3333, 6)
    assert (settings.limits.max_steps, settings.limits.max_images) == (20, 2)  # one limit from the flag


def test_a_bad_value_is_one_line_naming_the_option() -> None:
    result = runner.invoke(app, ["serve", "--port", "http"])
    assert result.exit_code == 2 and "--port" in result.output and "Traceback" not in result.output
