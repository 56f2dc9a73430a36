"""Single-file checkpoints: SD 1.x, 2.x and XL (and inpainting) in the original layout load offline as
the same model as their diffusers folder; pickles that want more than weights are refused; files we
cannot serve are named as what they are."""

from __future__ import annotations

import json
import logging
import os
import pickle
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import load_file, save_file

from sdserver.core.errors import ConfigError, UnsafeCheckpoint, UnsupportedModel
from sdserver.engine import Engine
from sdserver.engine.architectures import Architecture, architectures_root, detect, write_config_folder
from sdserver.engine.checkpoint import read_state_dict
from sdserver.engine.loaders import Description, LoadedPipelines, describe_source, load_pipelines
from sdserver.engine.registry import scan_models_dir
from sdserver.settings import CustomModel, Settings
from tests.conftest import SIZE, ArchModels
from tests.engine.test_model_sources import load_offline
from tests.support.original_layout import to_original_state_dict

ARCHS = [("sd1", False), ("sd1", True), ("sd2", False), ("sd2", True), ("sdxl", False), ("sdxl", True)]
CPU = torch.device("cpu")


def load(source: Path | str, **options: Any) -> LoadedPipelines:
    return load_pipelines(str(source), device=CPU, dtype=torch.float32, **options)


def draw(model: LoadedPipelines, seed: int = 0) -> np.ndarray:
    """Two steps of the model's own task pipeline (inpainting for 9-channel models), as floats."""
    options: dict[str, Any] = {"prompt": ["a red circle"], "num_inference_steps": 2, "output_type": "np"}
    if model.inpainting_unet:
        square = Image.new("RGB", (SIZE, SIZE), (90, 90, 90))
        options |= {"image": [square], "mask_image": [Image.new("L", (SIZE, SIZE), 255)]}
        pipe = model.inpaint
    else:
        pipe = model.txt2img
    images: np.ndarray = pipe(**options, height=SIZE, width=SIZE, generator=torch.Generator().manual_seed(seed)).images
    return images


@pytest.mark.parametrize(("arch", "inpainting"), ARCHS, ids=[f"{a}{'-inpainting' if i else ''}" for a, i in ARCHS])
def test_a_single_file_is_the_same_model_as_its_diffusers_folder(
    arch_model: ArchModels, arch: str, inpainting: bool
) -> None:
    model = arch_model(arch, inpainting)
    folder, single, pickled = load(model.folder), load(model.safetensors), load(model.ckpt)

    assert folder.description == single.description == pickled.description == Description(arch, inpainting)
    assert single.weights_hash == folder.weights_hash == pickled.weights_hash  # the UNet, bit for bit
    prediction = folder.txt2img.scheduler.config.prediction_type
    assert single.txt2img.scheduler.config.prediction_type == prediction
    assert type(single.txt2img) is type(folder.txt2img)
    assert np.array_equal(draw(single), draw(folder))  # text encoders, tokenizers and VAE too


def test_each_architecture_gets_its_own_pipelines_and_prediction(arch_model: ArchModels) -> None:
    sd2 = load(arch_model("sd2").safetensors)
    assert isinstance(sd2.txt2img, StableDiffusionPipeline)
    assert sd2.txt2img.scheduler.config.prediction_type == "v_prediction"  # 2.x's 768 px flagship
    assert load(arch_model("sd2", inpainting=True).safetensors).txt2img.scheduler.config.prediction_type == "epsilon"
    sdxl = load(arch_model("sdxl").safetensors)
    assert isinstance(sdxl.txt2img, StableDiffusionXLPipeline)
    assert type(sdxl.img2img).__name__ == "StableDiffusionXLImg2ImgPipeline"
    assert type(sdxl.inpaint).__name__ == "StableDiffusionXLInpaintPipeline"
    assert sdxl.img2img.unet is sdxl.txt2img.unet is sdxl.inpaint.unet  # one set of weights
    assert sdxl.native_size == 1024  # the shipped XL config: sizes the weights cannot tell come from it


def test_prediction_type_can_be_set_by_config_by_a_sidecar_yaml_or_a_v_pred_key(
    arch_model: ArchModels, tmp_path: Path
) -> None:
    sd2 = arch_model("sd2").safetensors
    assert load(sd2, prediction_type="epsilon").txt2img.scheduler.config.prediction_type == "epsilon"

    beside = tmp_path / "sd2-base.safetensors"  # A1111's convention: model.yaml beside model.safetensors
    beside.symlink_to(sd2)
    beside.with_suffix(".yaml").write_text("model:\n  params:\n    parameterization: eps\n")
    assert load(beside).txt2img.scheduler.config.prediction_type == "epsilon"
    beside.with_suffix(".yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    assert load(beside).txt2img.scheduler.config.prediction_type == "v_prediction"

    marked = tmp_path / "sd1-vpred.safetensors"
    save_file({**load_file(arch_model("sd1").safetensors), "v_pred": torch.tensor([])}, marked)
    assert load(marked).txt2img.scheduler.config.prediction_type == "v_prediction"


def test_a_ckpt_that_runs_code_when_unpickled_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": Exploit()}}, path)
    with pytest.raises(UnsafeCheckpoint) as refused:
        load(path)
    assert "evil.ckpt" in refused.value.message and "system" in refused.value.message
    assert not marker.exists()

    raw = tmp_path / "raw.ckpt"  # a bare pickle, not torch's zip format
    raw.write_bytes(pickle.dumps({"state_dict": {"w": Exploit()}}))
    with pytest.raises(UnsafeCheckpoint):
        read_state_dict(raw)
    assert not marker.exists()


def test_a_ckpt_with_lightning_training_state_beside_the_weights_loads(tmp_path: Path) -> None:
    # Original SD 1.x .ckpt files carry a Lightning ModelCheckpoint and numpy scalars; neither runs code here.
    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        def __init__(self) -> None:
            self.best_model_score = 0.5

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = module.__name__, "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint  # type: ignore[attr-defined]
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", module.__name__]
    sys.modules.update({name: module if name == module.__name__ else types.ModuleType(name) for name in names})
    try:
        checkpoint = {"state_dict": {"w": torch.ones(2)}, "global_step": np.int64(470000), "cb": ModelCheckpoint()}
        torch.save(checkpoint, tmp_path / "sd-v1.ckpt")
    finally:
        for name in names:
            del sys.modules[name]
    assert set(read_state_dict(tmp_path / "sd-v1.ckpt")) == {"w"}


UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
VAE_IN = "first_stage_model.encoder.conv_in.weight"


@pytest.mark.parametrize(
    ("keys", "named"),
    [
        ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (9, 3)}, "Stable Diffusion 3"),
        ({"double_blocks.0.img_attn.qkv.weight": (9, 3)}, "FLUX"),
        ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 8)}, "LoRA"),
        ({UNET_IN: (1, 4), VAE_IN: (1, 3), "conditioner.embedders.0.model.text_projection": (1, 1)}, "refiner"),
        ({UNET_IN: (320, 4, 3, 3)}, "not a full Stable Diffusion checkpoint"),
    ],
)
def test_files_of_other_kinds_are_refused_by_name(keys: dict[str, tuple[int, ...]], named: str) -> None:
    with pytest.raises(UnsupportedModel) as refused:
        detect(keys, name="thing.safetensors")
    assert named in refused.value.message and "thing.safetensors" in refused.value.message


def test_a_depth_model_unet_is_refused_naming_its_input_channels(arch_model: ArchModels) -> None:
    shapes = {key: tuple(t.shape) for key, t in load_file(arch_model("sd2").safetensors).items()}
    shapes[UNET_IN] = (64, 5, 3, 3)
    with pytest.raises(UnsupportedModel, match="5 input channels"):
        detect(shapes, name="depth.safetensors")


def test_a_text_encoder_without_clips_vocabulary_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    from tests.support.original_layout import save_single_file

    path = save_single_file(StableDiffusionPipeline.from_pretrained(tiny_model), tmp_path / "bytes.safetensors")
    with pytest.raises(UnsupportedModel, match=r"vocabulary of 51\d tokens"):
        describe_source(str(path))


def test_a_configured_model_of_a_kind_we_cannot_serve_stops_start_up(tiny_model: Path, tmp_path: Path) -> None:
    lora = tmp_path / "style.safetensors"
    save_file({"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)}, lora)
    custom = CustomModel(model_path=str(lora), ui_label="Style", url_path="style")
    with pytest.raises(ConfigError, match=r"'style'.*LoRA"):
        Engine.from_settings(Settings(model=str(tiny_model), custom_models=[custom], device="cpu"))

    cascade = tmp_path / "cascade"
    cascade.mkdir()
    (cascade / "model_index.json").write_text(json.dumps({"_class_name": "StableCascadeCombinedPipeline"}))
    with pytest.raises(ConfigError, match="StableCascadeCombinedPipeline"):
        Engine.from_settings(Settings(model=str(cascade), device="cpu"))


def test_models_dir_lists_single_files_by_name_and_skips_what_it_cannot_serve(
    arch_model: ArchModels, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "xl-finetune.safetensors").symlink_to(arch_model("sdxl").safetensors)
    (tmp_path / "old.ckpt").symlink_to(arch_model("sd1").ckpt)
    save_file(
        {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, 4)}, tmp_path / "lora.safetensors"
    )
    (tmp_path / "notes.txt").write_text("not a model")
    with caplog.at_level(logging.WARNING):
        specs = {spec.name: spec for spec in scan_models_dir(tmp_path, set())}
    assert set(specs) == {"xl-finetune", "old"}
    assert specs["xl-finetune"].description == Description("sdxl", False)  # from the header alone
    assert specs["old"].description is None  # a .ckpt is only read when loaded
    assert "lora.safetensors" in caplog.text and "LoRA" in caplog.text


def test_a_single_file_base_model_loads_with_the_hub_offline(arch_model: ArchModels, tmp_path: Path) -> None:
    loaded = load_offline(tmp_path, model=str(arch_model("sdxl").safetensors), device="cpu")
    assert "BASE=sdxl" in loaded.stdout, loaded.stderr


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_the_shipped_configs_are_what_full_size_checkpoints_infer(kind: str, tmp_path: Path) -> None:
    """A full-size model of each kind (on the meta device: no memory), written in the original layout,
    infers exactly the shipped configs, whose parameter counts are the published ones."""
    shipped = architectures_root() / kind
    with torch.device("meta"):
        pipe = _meta_pipeline(kind)
    shapes = {key: tuple(tensor.shape) for key, tensor in to_original_state_dict(pipe).items()}
    arch = detect(shapes, name=f"{kind}.safetensors")
    assert arch == Architecture(kind, False, "v_prediction" if kind == "sd2" else "epsilon")  # type: ignore[arg-type]
    inferred = write_config_folder(arch, shapes, tmp_path, name=f"{kind}.safetensors")
    for component in [c for c in ("unet", "vae", "text_encoder", "text_encoder_2") if (shipped / c).is_dir()]:
        want = json.loads((shipped / component / "config.json").read_text())
        got = json.loads((inferred / component / "config.json").read_text())
        assert {key: got[key] for key in want if key in got} == _normalised(want), component
    unet_params = sum(p.numel() for p in pipe.unet.parameters())
    assert unet_params == {"sd1": 859_520_964, "sd2": 865_910_724, "sdxl": 2_567_463_684}[kind]


def _meta_pipeline(kind: str) -> Any:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    root = architectures_root() / kind

    def config(component: str) -> dict[str, Any]:
        return json.loads((root / component / "config.json").read_text())

    parts: dict[str, Any] = {
        "unet": UNet2DConditionModel.from_config(config("unet")),
        "vae": AutoencoderKL.from_config(config("vae")),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**config("text_encoder"))),
        "tokenizer": CLIPTokenizer.from_pretrained(architectures_root() / "clip-tokenizer"),
        "scheduler": None,
    }
    if kind == "sdxl":
        parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**config("text_encoder_2")))
        parts["tokenizer_2"] = parts["tokenizer"]
        return StableDiffusionXLPipeline(**parts)
    return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _normalised(config: dict[str, Any]) -> dict[str, Any]:
    """As JSON reads it back (tuples become lists)."""
    normalised: dict[str, Any] = json.loads(json.dumps(config))
    return normalised
