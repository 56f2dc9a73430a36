"""The registry on tiny real models: models_dir, lazy loading, the LRU budget, load locks, unloading."""

from __future__ import annotations

import gc
import logging
import threading
import weakref
from pathlib import Path

import pytest

from sdserver.core.errors import ConfigError, InvalidRequest, NotFound, Unavailable
from sdserver.core.types import GenerationRequest
from sdserver.engine import Engine
from sdserver.engine.registry import Registry
from sdserver.engine.tiny import make_tiny_model
from sdserver.settings import CustomModel, Settings
from tests.conftest import SIZE, STEPS

MODELS = ("alpha", "beta", "gamma")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models_dir")
    for seed, name in enumerate(MODELS, start=10):
        make_tiny_model(root / name, safety_checker=False, seed=seed)
    (root / "broken").mkdir()
    (root / "broken" / "model_index.json").write_text("{not json")
    (root / "has space").mkdir()
    (root / "has space" / "model_index.json").write_text("{}")
    (root / "notes").mkdir()  # no model_index.json: not a model, silently
    (root / "readme.txt").write_text("not a folder")
    return root


def make_engine(tiny_model: Path, models_dir: Path, **settings: object) -> Engine:
    engine = Engine.from_settings(
        Settings(model=str(tiny_model), models_dir=str(models_dir), device="cpu", **settings)  # type: ignore[arg-type]
    )
    engine.load()
    return engine


def others(registry: Registry) -> list[str]:
    """Loaded models other than the base (which is never unloaded), least recently used first."""
    return [name for name in registry.loaded_names() if name != registry.base_name]


def generate(engine: Engine, model: str) -> None:
    request = engine.prepare(
        GenerationRequest(prompt="a cat", model=model, steps=STEPS, width=SIZE, height=SIZE, seed=1)
    )
    [[image]] = engine.run([request], lambda *progress: None)
    assert image.image.size == (SIZE, SIZE)


def test_models_dir_folders_are_models_and_bad_ones_are_skipped(
    tiny_model: Path, models_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="sdserver.engine.registry"):
        engine = make_engine(tiny_model, models_dir)
    registry = engine.registry
    assert registry.names() == [tiny_model.name, *MODELS]
    warnings = caplog.text
    assert "broken" in warnings and "has space" in warnings and "notes" not in warnings
    # lazily: only the base model is loaded before serving
    assert registry.loaded_names() == [tiny_model.name] and registry.load_count == 1
    assert registry.spec("alpha").origin == "models_dir"
    with pytest.raises(NotFound):
        registry.spec("broken")


def test_missing_models_dir_is_a_config_error(tiny_model: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="models_dir"):
        Engine.from_settings(Settings(model=str(tiny_model), models_dir=str(tmp_path / "nope"), device="cpu"))


def test_budget_unloads_the_least_recently_used_and_keeps_serving(tiny_model: Path, models_dir: Path) -> None:
    engine = make_engine(tiny_model, models_dir, max_loaded_models=3)
    registry = engine.registry
    base = tiny_model.name
    registry.get("alpha")  # a generation's first use, as in Engine.run (generating costs seconds each)
    registry.get("beta")
    assert others(registry) == ["alpha", "beta"]
    registry.get("alpha")  # alpha is now more recently used than beta
    alpha_unet = weakref.ref(registry.get("alpha").txt2img.unet)
    beta_unet = weakref.ref(registry.get("beta").txt2img.unet)
    registry.get("alpha")
    generate(engine, "gamma")  # over the budget: beta (least recently used, not the base) goes
    assert others(registry) == ["alpha", "gamma"] and registry.is_loaded(base)
    gc.collect()
    assert beta_unet() is None and alpha_unet() is not None
    assert registry.load_count == 4 and registry.unload_count == 1
    registry.get("beta")  # loads again, and alpha (now the least recently used) goes
    assert others(registry) == ["gamma", "beta"]
    assert registry.load_count == 5 and not registry.is_loaded("alpha")


def test_budget_of_two_with_three_models_in_use(tiny_model: Path, models_dir: Path) -> None:
    engine = make_engine(tiny_model, models_dir, max_loaded_models=2)
    registry = engine.registry
    registry.get("alpha")
    generate(engine, "beta")  # the base model is never unloaded: alpha goes
    assert others(registry) == ["beta"] and registry.is_loaded(None)
    registry.get(None)
    registry.get("alpha")
    assert others(registry) == ["alpha"] and registry.is_loaded(None)
    assert registry.load_count == 4


def test_concurrent_first_requests_load_once(tiny_model: Path, models_dir: Path) -> None:
    registry = make_engine(tiny_model, models_dir).registry
    start = threading.Barrier(4)
    got: list[object] = []

    def first_use() -> None:
        start.wait()
        got.append(registry.get("alpha"))

    threads = [threading.Thread(target=first_use) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(got) == 4 and all(pipelines is got[0] for pipelines in got)
    assert registry.load_count == 2  # the base model, then alpha once


def test_unload_returns_the_memory(tiny_model: Path, models_dir: Path) -> None:
    registry = make_engine(tiny_model, models_dir).registry
    pipelines = registry.get("alpha")
    refs = [weakref.ref(pipelines.txt2img.unet), weakref.ref(pipelines.inpaint), weakref.ref(pipelines.txt2img.vae)]
    del pipelines
    assert registry.unload("alpha") is True
    assert all(ref() is None for ref in refs)  # every pipeline sharing those components is gone
    assert registry.unload("alpha") is False
    assert not registry.is_loaded("alpha")
    assert registry.weights_hash("alpha")  # remembered: no reload for a listing
    assert registry.load_count == 2


def test_the_base_model_and_models_in_use_stay(tiny_model: Path, models_dir: Path) -> None:
    registry = make_engine(tiny_model, models_dir, max_loaded_models=2).registry
    with pytest.raises(InvalidRequest):
        registry.unload(tiny_model.name)
    with registry.use("alpha"):
        registry.get("beta")  # over the budget, but alpha runs a batch and the base stays
        assert set(registry.loaded_names()) == {tiny_model.name, "alpha", "beta"}
        with pytest.raises(Unavailable):
            registry.unload("alpha")
    registry.get("gamma")
    assert registry.is_loaded(None) and others(registry) == ["gamma"]
    assert len(registry.loaded_names()) == 2


def test_refresh_finds_new_folders_and_forgets_removed_ones(tiny_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "models"
    make_tiny_model(folder / "one", safety_checker=False, seed=20)
    registry = make_engine(tiny_model, folder).registry
    assert registry.names() == [tiny_model.name, "one"]
    make_tiny_model(folder / "two", safety_checker=False, seed=21)
    registry.get("one")
    (folder / "one" / "model_index.json").unlink()
    assert registry.refresh() == [tiny_model.name, "two"]
    assert registry.loaded_names() == [tiny_model.name]
    with pytest.raises(NotFound):
        registry.get("one")
    assert registry.get("two").native_size == SIZE


def test_custom_models_load_lazily_and_borrow_the_base_safety_checker(
    tiny_model: Path, tiny_model_without_checker: Path
) -> None:
    custom = CustomModel(
        model_path=str(tiny_model_without_checker), ui_label="No checker", url_path="nc", requires_safety_checker=True
    )
    engine = Engine.from_settings(Settings(model=str(tiny_model), custom_models=[custom], device="cpu"))
    engine.load()
    registry: Registry = engine.registry
    assert registry.loaded_names() == [tiny_model.name]
    assert registry.get("nc").checker is registry.get(None).checker
    assert registry.info("nc").origin == "custom_models"


def test_kind_is_read_from_disk_without_loading(tiny_model: Path, tiny_inpainting_model: Path) -> None:
    custom = CustomModel(model_path=str(tiny_inpainting_model), ui_label="Inpaint", url_path="inp")
    engine = Engine.from_settings(Settings(model=str(tiny_model), custom_models=[custom], device="cpu"))
    info = engine.registry.info("inp")  # read from model_index.json and the configs: not loaded for this
    assert (info.kind, info.inpainting, info.loaded) == ("sd1", True, False)
    assert engine.registry.load_count == 0


def test_a_memory_budget_unloads_the_least_recently_used_to_make_room(tiny_model: Path, models_dir: Path) -> None:
    probe = make_engine(tiny_model, models_dir).registry
    size = probe.get("alpha").memory_bytes
    assert size > 0 and probe.get(None).memory_bytes > 0
    # room for the base and one more model, never two: max_loaded alone would keep three
    budget_gb = (probe.get(None).memory_bytes + 1.5 * size) / 1e9
    engine = make_engine(tiny_model, models_dir, max_loaded_models=10, max_memory_gb=budget_gb)
    registry = engine.registry
    for name in ("alpha", "beta", "alpha", "gamma"):
        if name == "gamma":
            generate(engine, name)  # and it still serves
        else:
            registry.get(name)
        assert others(registry) == [name]
        assert registry.loaded_bytes() <= budget_gb * 1e9
    assert registry.unload_count == 3
    assert "loaded_bytes" in str(engine.stats())


def test_preload_loads_the_named_models_before_serving(tiny_model: Path, models_dir: Path) -> None:
    engine = make_engine(tiny_model, models_dir, preload=["beta"])
    assert engine.registry.loaded_names() == [tiny_model.name, "beta"]
    everything = make_engine(tiny_model, models_dir, preload="all", max_loaded_models=4)
    assert sorted(everything.registry.loaded_names()) == sorted([tiny_model.name, *MODELS])
    with pytest.raises(NotFound, match="'nope'"):
        make_engine(tiny_model, models_dir, preload=["nope"])
