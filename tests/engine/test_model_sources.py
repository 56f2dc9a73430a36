"""Where the base model comes from: the bundled demo, the hub (offline here), local folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdserver.core.errors import ModelLoadError
from sdserver.engine import Engine
from sdserver.engine.loaders import demo_model_path
from sdserver.settings import DEFAULT_MODEL, Settings


def load_offline(hub_cache: Path, **settings: object) -> subprocess.CompletedProcess[str]:
    """Load the engine in a fresh process with the hub offline and its cache at `hub_cache`
    (huggingface_hub reads both variables once, at import)."""
    script = (
        "import json, sys\n"
        "from sdserver.engine import Engine\nfrom sdserver.settings import Settings\n"
        "engine = Engine.from_settings(Settings(**json.loads(sys.argv[1])))\n"
        "engine.load()\nprint('BASE=' + engine.registry.base_name)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache)}
    return subprocess.run(
        [sys.executable, "-c", script, json.dumps(settings)], capture_output=True, text=True, env=env, timeout=300
    )


def test_the_demo_model_ships_inside_the_package() -> None:
    assert (demo_model_path() / "model_index.json").is_file()


def test_no_model_configured_and_no_hub_serves_the_demo(tmp_path: Path) -> None:
    loaded = load_offline(tmp_path)
    assert "BASE=demo" in loaded.stdout, loaded.stderr
    assert "serving the bundled demo model" in loaded.stderr and DEFAULT_MODEL in loaded.stderr
    assert "gone from models_dir" not in loaded.stderr  # no models_dir here: nothing to say about one


def test_demo_by_name() -> None:
    engine = Engine.from_settings(Settings(model="demo"))
    engine.load()
    assert engine.registry.base_name == "demo" and engine.registry.get(None).native_size >= 64


def test_an_explicit_hub_model_that_is_not_cached_fails_clearly(tmp_path: Path) -> None:
    loaded = load_offline(tmp_path, model="someone/not-downloaded")
    assert loaded.returncode != 0 and "BASE=" not in loaded.stdout
    assert "ModelLoadError" in loaded.stderr and "hf download someone/not-downloaded" in loaded.stderr
    message = loaded.stderr.strip().splitlines()[-1]  # the exception's own line, after the traceback
    assert message.startswith("sdserver.core.errors.ModelLoadError: ")
    assert "'someone/not-downloaded' is not in the Hugging Face cache and the hub cannot be reached" in message
    assert "stacktrace" not in message and "local_files_only" not in message  # not diffusers' internals


def test_a_folder_without_model_index_is_refused(tmp_path: Path) -> None:
    engine = Engine.from_settings(Settings(model=str(tmp_path)))
    with pytest.raises(ModelLoadError, match=r"no model_index\.json"):
        engine.load()


def test_a_hub_model_in_the_local_cache_loads_offline(tmp_path: Path, tiny_model: Path) -> None:
    # The layout huggingface_hub writes: models--owner--name/{refs/main, snapshots/<revision>/...}
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-sd"
    snapshot = repo / "snapshots" / revision
    for file in tiny_model.rglob("*"):
        if file.is_file():
            target = snapshot / file.relative_to(tiny_model)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(file.read_bytes())
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    loaded = load_offline(tmp_path / "hub", model="someone/tiny-sd", hf_token="hf_unused")
    assert "BASE=someone/tiny-sd" in loaded.stdout, loaded.stderr
