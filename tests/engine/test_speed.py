"""Speed switches and memory modes: chosen for the device, refused in one line where it cannot honour
them, and drawing the same images as without them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdserver.core.errors import ConfigError
from sdserver.engine.loaders import LoadedPipelines, load_pipelines
from sdserver.engine.speed import Tuning, lora_ready
from sdserver.settings import Settings
from tests.engine.test_memory import draw, max_diff
from tests.test_cli import free_port, serve

CPU = torch.device("cpu")


def load(folder: Path, **tuning: object) -> LoadedPipelines:
    return load_pipelines(str(folder), device=CPU, dtype=torch.float32, tuning=Tuning(**tuning))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def plain(tiny_model: Path) -> list[Image.Image]:
    return draw(load(tiny_model), 2)


# -- what a device cannot honour ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "device", "words"),
    [
        ({"offload": "model"}, "cpu", ["offload: model", "no GPU", "auto or none"]),
        ({"offload": "sequential"}, "mps", ["offload: sequential", "shares the CPU's memory"]),
        ({"tf32": "on"}, "cpu", ["tf32: on", "Ampere", "the device is cpu"]),
        ({"compile": True}, "mps", ["compile:", "Metal"]),
        ({"quantize": "fp8"}, "mps", ["quantize: fp8", "int8"]),
    ],
)
def test_a_switch_the_device_cannot_honour_is_refused_in_one_line(
    settings: dict[str, object], device: str, words: list[str]
) -> None:
    with pytest.raises(ConfigError) as refused:
        Tuning.from_settings(Settings(**settings), torch.device(device))  # type: ignore[arg-type]
    assert "\n" not in refused.value.message
    for word in words:
        assert word in refused.value.message


def test_compile_without_a_compiler_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXX", "no-such-compiler-x")
    with pytest.raises(ConfigError, match=r"compile: .*C\+\+ compiler.*no-such-compiler-x"):
        Tuning.from_settings(Settings(compile=True), CPU)


def test_quantize_without_torchao_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(ConfigError, match=r"quantize: int8 needs torchao \(pip install torchao\)"):
        Tuning.from_settings(Settings(quantize="int8"), CPU)


def test_auto_on_the_cpu_turns_on_nothing_it_cannot_use() -> None:
    tuning = Tuning.from_settings(Settings(max_batch_size=3), CPU)
    assert not (tuning.channels_last or tuning.fuse_qkv or tuning.tf32 or tuning.attention_slicing or tuning.compile)
    assert tuning.offload == "none" and tuning.memory_limit is None and tuning.max_rows == 6
    assert Tuning.from_settings(Settings(channels_last="on", fuse_qkv="on"), CPU).fuse_qkv


def test_the_server_refuses_offload_on_the_cpu_at_start_up(tmp_path: Path, tiny_model: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"offload": "model", "device": "cpu"}))
    process = serve("--config", str(config), "--model", str(tiny_model), "--port", str(free_port()))
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 2, output
    errors = [line for line in output.splitlines() if "cannot start" in line]
    assert len(errors) == 1 and "offload: model" in errors[0] and "Traceback" not in output


# -- the switches draw the same images ---------------------------------------------------------------


def test_channels_last_and_fused_qkv_draw_the_same_images(tiny_model: Path, plain: list[Image.Image]) -> None:
    model = load(tiny_model, channels_last=True, fuse_qkv=True)
    unet = model.txt2img.unet
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert any("Fused" in type(p).__name__ for p in unet.attn_processors.values())
    assert max_diff(plain, draw(model, 2)) <= 2
    lora_ready(model, "tiny")  # LoRA adapters need the separate projections back
    assert not any("Fused" in type(p).__name__ for p in unet.attn_processors.values())
    assert max_diff(plain, draw(model, 2)) <= 2


def test_model_offload_draws_the_same_images(tiny_model: Path, plain: list[Image.Image]) -> None:
    """Offloading's hooks around the engine's own loop (executed on the CPU here: a GPU moves weights)."""
    model = load(tiny_model, offload="model")
    assert model.offload == "model" and hasattr(model.txt2img.unet, "_hf_hook")
    assert max_diff(plain, draw(model, 2)) == 0


def test_int8_weights_draw_nearly_the_same_images_in_less_memory(tiny_model: Path, plain: list[Image.Image]) -> None:
    pytest.importorskip("torchao")
    model = load(tiny_model, quantize="int8")
    linear = model.txt2img.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    assert "Int8" in type(linear.weight).__name__
    images = draw(model, 2)
    assert max_diff(plain, images) <= 16  # 8-bit weights: small, visible-only-on-close-look changes
    mean = np.mean(
        [np.abs(np.asarray(a, float) - np.asarray(b, float)).mean() for a, b in zip(plain, images, strict=True)]
    )
    assert float(mean) < 2


def test_compiled_sizes_are_warmed_up_at_load_and_other_sizes_never_recompile(
    tiny_model: Path, plain: list[Image.Image]
) -> None:
    """Regional compilation with inductor on the CPU (the one compile test: compiling is slow)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    try:
        model = load(tiny_model, compile=True, compile_sizes=((64, 64),), max_rows=4)
        assert model.splitter is not None and model.splitter.buckets == (1, 2, 4)
        compiled = counters["stats"]["unique_graphs"]
        assert compiled > 0  # the warm-up compiled before the model served
        assert max_diff(plain, draw(model, 2)) <= 2  # 4 rows: a warmed-up bucket
        draw(model, 1, side=64)  # 2 rows
        draw(model, 2, side=128)  # a size not configured: runs uncompiled
        assert counters["stats"]["unique_graphs"] == compiled
    finally:
        torch.compiler.set_stance("default")
        torch._dynamo.reset()
