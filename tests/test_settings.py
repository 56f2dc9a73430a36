"""Configuration (`sdserver.settings`): config.json in the original format, environment, CLI overrides."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sdserver.core.errors import ConfigError
from sdserver.core.types import Limits
from sdserver.engine import Engine
from sdserver.settings import DEFAULT_MODEL, CustomModel, Settings, is_hub_id, load_settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Run each test in an empty folder, free of the caller's SDSERVER_* and HF_TOKEN variables."""
    for name in list(os.environ):
        if name.upper().startswith("SDSERVER_") or name.upper() == "HF_TOKEN":
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def write_config(folder: Path, data: Any, name: str = "config.json") -> Path:
    path = folder / name
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def model_folder(folder: Path, name: str = "my-model") -> Path:
    path = folder / name
    path.mkdir()
    return path


def custom(model_path: str | Path, url_path: str = "mine", **extra: Any) -> dict[str, Any]:
    return {"model_path": str(model_path), "ui_label": f"Model {url_path}", "url_path": url_path, **extra}


def config_error(load: Callable[[], Any]) -> str:
    """The ConfigError message `load` raises, checked to be one line."""
    with pytest.raises(ConfigError) as info:
        load()
    message = info.value.message
    assert message
    assert "\n" not in message
    assert str(info.value) == message
    return message


# --- the original config.json ----------------------------------------------------------------------


def test_the_original_config_format_is_accepted_as_is(tmp_path: Path) -> None:
    folder = model_folder(tmp_path, "waifu")
    path = write_config(
        tmp_path,
        """{
            "hf_token": "hf_abc123",
            "custom_models": [
                {
                    "model_path": "@FOLDER@",
                    "ui_label": "Waifu Diffusion",
                    "url_path": "waifu",
                    "requires_safety_checker": "true"
                },
                {
                    "model_path": "nitrosocke/Arcane-Diffusion",
                    "ui_label": "Arcane",
                    "url_path": "arcane",
                    "requires_safety_checker": "false"
                }
            ]
        }""".replace("@FOLDER@", str(folder)),
    )

    settings = load_settings(path)

    assert settings.hf_token == "hf_abc123"
    assert settings.custom_models == [
        CustomModel(model_path=str(folder), ui_label="Waifu Diffusion", url_path="waifu", requires_safety_checker=True),
        CustomModel(
            model_path="nitrosocke/Arcane-Diffusion",
            ui_label="Arcane",
            url_path="arcane",
            requires_safety_checker=False,
        ),
    ]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (True, True),
        (False, False),
        ("true", True),
        ("false", False),
        ("True", True),
        (" TRUE ", True),
        ("FALSE", False),
    ],
)
def test_requires_safety_checker_may_be_a_bool_or_a_string(tmp_path: Path, value: Any, expected: bool) -> None:
    path = write_config(tmp_path, {"custom_models": [custom("owner/name", requires_safety_checker=value)]})

    assert load_settings(path).custom_models[0].requires_safety_checker is expected


def test_requires_safety_checker_defaults_to_false(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"custom_models": [custom("owner/name")]})

    assert load_settings(path).custom_models[0].requires_safety_checker is False


def test_a_misspelt_requires_safety_checker_is_an_error_not_false(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"custom_models": [custom("owner/name", requires_safety_checker="ture")]})

    message = config_error(lambda: load_settings(path))
    assert "requires_safety_checker" in message


def test_unknown_keys_are_ignored(tmp_path: Path) -> None:
    path = write_config(
        tmp_path, {"some_future_key": 1, "custom_models": [custom("owner/name", description="ignored")]}
    )

    assert load_settings(path).custom_models[0].url_path == "mine"


def test_our_own_keys_may_live_in_the_file_too(tmp_path: Path) -> None:
    path = write_config(
        tmp_path, {"model": "demo", "host": "0.0.0.0", "port": 8080, "dtype": "float32", "limits": {"max_steps": 30}}
    )

    settings = load_settings(path)

    assert (settings.model, settings.host, settings.port, settings.dtype) == ("demo", "0.0.0.0", 8080, "float32")
    assert settings.limits == Limits(max_steps=30)


def test_without_any_configuration_the_defaults_apply() -> None:
    settings = load_settings()

    assert settings.model is None
    assert not settings.model_explicit
    assert settings.base_model == DEFAULT_MODEL
    assert settings.hf_token is None
    assert settings.custom_models == []
    assert (settings.host, settings.port) == ("127.0.0.1", 1337)
    assert settings.limits == Limits()


def test_a_given_model_is_explicit_and_is_the_base_model() -> None:
    settings = load_settings(model="demo")

    assert settings.model_explicit
    assert settings.base_model == "demo"


# --- priority: CLI over environment over file ------------------------------------------------------


def test_the_environment_beats_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_config(tmp_path, {"port": 1111, "hf_token": "from-file"})
    monkeypatch.setenv("SDSERVER_PORT", "2222")
    monkeypatch.setenv("HF_TOKEN", "from-env")

    settings = load_settings(path)

    assert settings.port == 2222
    assert settings.hf_token == "from-env"


def test_cli_overrides_beat_the_environment_and_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_config(tmp_path, {"port": 1111, "hf_token": "from-file", "host": "file-host"})
    monkeypatch.setenv("SDSERVER_PORT", "2222")
    monkeypatch.setenv("HF_TOKEN", "from-env")
    monkeypatch.setenv("SDSERVER_HOST", "env-host")

    settings = load_settings(path, port=3333, hf_token="from-cli", host="cli-host")

    assert settings.port == 3333
    assert settings.hf_token == "from-cli"
    assert settings.host == "cli-host"


def test_an_override_of_none_means_not_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_config(tmp_path, {"port": 1111, "hf_token": "from-file"})
    monkeypatch.setenv("SDSERVER_HOST", "env-host")

    settings = load_settings(path, port=None, hf_token=None, host=None, model=None)

    assert settings.port == 1111
    assert settings.hf_token == "from-file"
    assert settings.host == "env-host"
    assert settings.model is None


def test_the_file_fills_in_what_nothing_else_gives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_config(tmp_path, {"port": 1111, "max_queue": 5})
    monkeypatch.setenv("SDSERVER_PORT", "2222")

    settings = load_settings(path, host="cli-host")

    assert (settings.port, settings.max_queue, settings.host) == (2222, 5, "cli-host")


def test_the_default_config_json_in_the_working_folder_is_read(tmp_path: Path) -> None:
    write_config(tmp_path, {"hf_token": "from-default-file", "port": 4444})

    settings = load_settings()

    assert settings.hf_token == "from-default-file"
    assert settings.port == 4444


def test_a_nested_environment_variable_sets_one_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDSERVER_LIMITS__MAX_STEPS", "25")

    limits = load_settings().limits

    assert limits.max_steps == 25
    assert limits.model_dump(exclude={"max_steps"}) == Limits().model_dump(exclude={"max_steps"})


def test_a_nested_environment_variable_merges_with_limits_from_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(tmp_path, {"limits": {"max_images": 2, "max_steps": 99}})
    monkeypatch.setenv("SDSERVER_LIMITS__MAX_STEPS", "25")

    limits = load_settings(path).limits

    assert (limits.max_images, limits.max_steps) == (2, 25)


def test_limits_are_read_by_settings_itself_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDSERVER_LIMITS__MAX_STEPS", "12")

    assert Settings().limits.max_steps == 12


def test_a_bad_limit_in_the_environment_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDSERVER_LIMITS__MAX_STEPS", "0")

    message = config_error(load_settings)

    assert "limits.max_steps" in message


def test_a_bad_value_in_the_environment_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDSERVER_PORT", "not-a-port")

    assert "port" in config_error(load_settings)


# --- the config file itself ------------------------------------------------------------------------


def test_a_missing_explicit_config_file_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "config.json"

    message = config_error(lambda: load_settings(missing))

    assert str(missing) in message
    assert "not found" in message


def test_a_missing_explicit_config_file_is_fine_when_a_model_is_given(tmp_path: Path) -> None:
    settings = load_settings(tmp_path / "nowhere.json", model="demo")

    assert settings.model == "demo"
    assert settings.custom_models == []


def test_a_missing_default_config_json_is_fine() -> None:
    assert not Path("config.json").exists()

    assert load_settings().custom_models == []


@pytest.mark.parametrize("text", ["{not json", '{"port": 1,}', "", "{'hf_token': 'x'}"])
def test_malformed_json_is_a_config_error_naming_the_file(tmp_path: Path, text: str) -> None:
    path = write_config(tmp_path, text)

    message = config_error(lambda: load_settings(path))

    assert str(path) in message
    assert "not valid JSON" in message


def test_malformed_json_in_the_default_config_json_is_an_error_too(tmp_path: Path) -> None:
    write_config(tmp_path, "{oops")

    assert "not valid JSON" in config_error(load_settings)


@pytest.mark.parametrize(
    ("text", "kind"), [("[1, 2]", "list"), ('"hf_abc"', "str"), ("42", "int"), ("null", "NoneType")]
)
def test_json_that_is_not_an_object_is_a_config_error(tmp_path: Path, text: str, kind: str) -> None:
    path = write_config(tmp_path, text)

    message = config_error(lambda: load_settings(path))

    assert str(path) in message
    assert "must hold a JSON object" in message
    assert kind in message


def test_a_config_file_that_cannot_be_read_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_bytes(b"\xff\xfe\x00 not utf-8")

    message = config_error(lambda: load_settings(path))

    assert "cannot be read" in message


# --- custom models ---------------------------------------------------------------------------------


def test_a_custom_model_folder_that_exists_is_accepted(tmp_path: Path) -> None:
    folder = model_folder(tmp_path)
    path = write_config(tmp_path, {"custom_models": [custom(folder)]})

    assert load_settings(path).custom_models[0].model_path == str(folder)


def test_a_custom_model_folder_under_home_is_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    model_folder(tmp_path, "sd-models")
    path = write_config(tmp_path, {"custom_models": [custom("~/sd-models")]})

    assert load_settings(path).custom_models[0].model_path == "~/sd-models"


@pytest.mark.parametrize("model_path", ["missing-folder", "./models/missing", "/definitely/not/here/model"])
def test_a_custom_model_whose_folder_does_not_exist_is_a_config_error(tmp_path: Path, model_path: str) -> None:
    path = write_config(tmp_path, {"custom_models": [custom(model_path, url_path="broken")]})

    message = config_error(lambda: load_settings(path))

    assert "custom_models.0" in message
    assert repr(model_path) in message
    assert "'broken'" in message
    assert "not a folder" in message


def test_a_custom_model_path_that_is_some_other_file_is_a_config_error(tmp_path: Path) -> None:
    notes = tmp_path / "weights" / "model.txt"
    notes.parent.mkdir()
    notes.write_text("not weights")
    path = write_config(tmp_path, {"custom_models": [custom(notes)]})

    assert "not a folder, a .safetensors/.ckpt file" in config_error(lambda: load_settings(path))


def test_a_custom_model_checkpoint_that_cannot_be_read_stops_start_up_naming_it(tmp_path: Path) -> None:
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    settings = load_settings(write_config(tmp_path, {"model": "demo", "custom_models": [custom(weights)]}))

    with pytest.raises(ConfigError, match=r"model\.safetensors: not a valid \.safetensors file"):
        Engine.from_settings(settings)


def test_the_error_points_at_the_failing_entry(tmp_path: Path) -> None:
    path = write_config(
        tmp_path, {"custom_models": [custom("owner/one", url_path="one"), custom("nope", url_path="two")]}
    )

    assert "custom_models.1" in config_error(lambda: load_settings(path))


@pytest.mark.parametrize(
    "hub_id",
    ["nitrosocke/Arcane-Diffusion", "stabilityai/stable-diffusion-2-1", "owner/name", "some_org/model.v1.5"],
)
def test_hub_ids_are_accepted_as_model_path(tmp_path: Path, hub_id: str) -> None:
    path = write_config(tmp_path, {"custom_models": [custom(hub_id)]})

    assert is_hub_id(hub_id)
    assert load_settings(path).custom_models[0].model_path == hub_id


def test_an_owner_name_path_that_exists_locally_is_a_path_not_a_hub_id(tmp_path: Path) -> None:
    (tmp_path / "owner").mkdir()
    (tmp_path / "owner" / "name").write_text("a file, not a model folder")

    assert not is_hub_id("owner/name")
    path = write_config(tmp_path, {"custom_models": [custom("owner/name")]})
    assert "not a folder" in config_error(lambda: load_settings(path))  # nor a checkpoint: no suffix


def test_a_custom_model_missing_a_required_key_is_a_config_error(tmp_path: Path) -> None:
    entry = custom("owner/name")
    del entry["ui_label"]
    path = write_config(tmp_path, {"custom_models": [entry]})

    assert "custom_models.0.ui_label" in config_error(lambda: load_settings(path))


def test_a_duplicate_url_path_is_a_config_error(tmp_path: Path) -> None:
    path = write_config(
        tmp_path, {"custom_models": [custom("owner/one", url_path="same"), custom("owner/two", url_path="same")]}
    )

    message = config_error(lambda: load_settings(path))

    assert "duplicate url_path 'same'" in message


def test_distinct_url_paths_are_fine(tmp_path: Path) -> None:
    path = write_config(
        tmp_path, {"custom_models": [custom("owner/one", url_path="one"), custom("owner/two", url_path="two")]}
    )

    assert [m.url_path for m in load_settings(path).custom_models] == ["one", "two"]


@pytest.mark.parametrize("url_path", ["a/b", "../etc", "with space", "", "q?x=1", "frag#x", "%2e%2e", "naïve"])
def test_an_unsafe_url_path_is_a_config_error(tmp_path: Path, url_path: str) -> None:
    path = write_config(tmp_path, {"custom_models": [custom("owner/name", url_path=url_path)]})

    message = config_error(lambda: load_settings(path))

    assert "url_path" in message
    assert repr(url_path) in message


@pytest.mark.parametrize("url_path", ["waifu", "sd-2.1", "my_model", "v1~beta", "A1"])
def test_url_paths_of_letters_digits_and_dot_dash_underscore_tilde_are_accepted(tmp_path: Path, url_path: str) -> None:
    path = write_config(tmp_path, {"custom_models": [custom("owner/name", url_path=url_path)]})

    assert load_settings(path).custom_models[0].url_path == url_path


@pytest.mark.parametrize("url_path", [".", ".."])
def test_dot_segments_are_unsafe_url_paths(tmp_path: Path, url_path: str) -> None:
    path = write_config(tmp_path, {"custom_models": [custom("owner/name", url_path=url_path)]})

    assert "url_path" in config_error(lambda: load_settings(path))


@pytest.mark.parametrize(
    ("config", "where"),
    [
        ({"port": 70000}, "port"),
        ({"port": "http"}, "port"),
        ({"dtype": "int8"}, "dtype"),
        ({"max_queue": 0}, "max_queue"),
        ({"limits": {"max_side": 4}}, "limits.max_side"),
        ({"custom_models": "waifu"}, "custom_models"),
    ],
)
def test_a_bad_value_in_the_file_is_a_config_error_naming_the_key(
    tmp_path: Path, config: dict[str, Any], where: str
) -> None:
    path = write_config(tmp_path, config)

    message = config_error(lambda: load_settings(path))

    assert message.startswith(f"invalid setting {where} (from flags, environment or {path}): ")
