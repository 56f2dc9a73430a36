"""SD 3 / 3.5 and FLUX.1 single files: each form people download (all-in-one, transformer-only,
GGUF-quantised) is recognised from its header and loads as the same model as its diffusers folder;
what a file lacks comes from `encoders`, and when nothing provides it the error is one clear line."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
from diffusers.quantizers.gguf.utils import GGUFParameter, dequantize_gguf_tensor
from PIL import Image
from safetensors.torch import load_file, save_file

from sdserver.core.errors import ModelLoadError, UnsupportedModel
from sdserver.engine.architectures import architectures_root
from sdserver.engine.flowfiles import (
    VARIANTS,
    FlowFile,
    _flux_to_diffusers,
    detect,
    detect_shapes,
    load_pipeline,
)
from tests.conftest import SIZE, ArchModels, FlowModel, FlowModels
from tests.support.flow_layout import all_in_one, save_safetensors, transformer_to_original

FORMS = ["all_in_one", "transformer", "gguf"]
CASES = [
    ("sd3", "all_in_one"),
    ("sd3", "transformer"),
    ("sd3", "gguf"),
    ("sd3-medium", "all_in_one"),
    ("sd3.5-large", "gguf"),
    ("flux", "all_in_one"),
    ("flux", "transformer"),
    ("flux", "gguf"),
    ("flux-schnell", "gguf"),
    ("flux-fill", "transformer"),
    ("flux-fill", "gguf"),
]
VARIANT = {"sd3": "sd3.5-medium", "flux": "flux-dev"}
PARAMETERS = {
    "sd3-medium": 2_028_328_000,
    "sd3.5-medium": 2_243_171_520,
    "sd3.5-large": 8_056_627_520,
    "flux-dev": 11_901_408_320,
    "flux-schnell": 11_891_178_560,
    "flux-fill": 11_902_391_360,
}


def load(path: Path, encoders: Path | str | None = None) -> Any:
    return load_pipeline(path, torch.float32, encoders=str(encoders) if encoders is not None else None)


def draw(pipe: Any, prompt: str = "a red circle", seed: int = 0) -> np.ndarray:
    """Two steps of diffusers' own pipeline call, as floats in [0, 1] (before rounding to 8 bits)."""
    options: dict[str, Any] = {}
    if "Fill" in type(pipe).__name__:
        mask = Image.new("L", (SIZE, SIZE), 0)
        mask.paste(255, (0, 0, SIZE, SIZE // 2))
        options = {"image": Image.new("RGB", (SIZE, SIZE), (90, 120, 150)), "mask_image": mask}
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    result = pipe(
        prompt=prompt, num_inference_steps=2, height=SIZE, width=SIZE, generator=generator, output_type="np", **options
    )
    images: np.ndarray = result.images[0]
    return images


def same_image(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to float noise: the same weights read from a file at other memory alignments take other
    SIMD paths (differences ~1e-6)."""
    return bool(np.abs(a - b).max() < 1e-5)


@functools.cache
def folder_image(model: FlowModel) -> np.ndarray:
    return draw(model.pipeline)


def path_of(model: FlowModel, form: str) -> Path:
    path: Path = getattr(model, form)
    return path


@pytest.mark.parametrize(("arch", "form"), CASES, ids=[f"{a}-{f}" for a, f in CASES])
def test_each_file_form_loads_as_the_same_model_as_its_folder(flow_model: FlowModels, arch: str, form: str) -> None:
    model = flow_model(arch)
    folder = model.pipeline
    single = load(path_of(model, form), encoders=model.folder)  # all-in-one: for the T5 tokenizer alone

    assert type(single) is type(folder)
    want, got = folder.transformer.state_dict(), single.transformer.state_dict()
    assert set(got) == set(want)
    if form == "gguf":
        quantised = [key for key, tensor in got.items() if isinstance(tensor, GGUFParameter)]
        assert len(quantised) > len(got) // 3  # the weights stay 8-bit in memory, dequantised per layer
        for key, tensor in got.items():  # Q8_0: within half a step of each 32-value block's scale
            tolerance = float(want[key].abs().max()) / 127 if key in quantised else 0.0
            assert float((dequantize_gguf_tensor(tensor) - want[key]).abs().max()) <= tolerance + 1e-6, key
        assert np.abs(draw(single) - folder_image(model)).max() < 16 / 255
    else:
        assert all(torch.equal(got[key], want[key]) for key in want)
        assert same_image(draw(single), folder_image(model))  # encoders, tokenizers, VAE, scheduler too


def test_an_sd3_all_in_one_file_with_t5_loads_with_the_t5_tokenizer_from_encoders(flow_model: FlowModels) -> None:
    model = flow_model("sd3")
    pipe = load(model.all_in_one, encoders=model.folder)
    assert pipe.text_encoder_3 is not None and not pipe.text_encoder_3.training
    folder = model.pipeline
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
        want, got = folder.components[name].state_dict(), pipe.components[name].state_dict()
        assert all(torch.equal(got[key], want[key]) for key in want), name  # from the file, bit for bit


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_detect_tells_each_form_apart_and_reads_the_config_from_shapes(flow_model: FlowModels, arch: str) -> None:
    model = flow_model(arch)
    folder_config = json.loads((model.folder / "transformer" / "config.json").read_text())
    family = arch[:4] if arch.startswith("flux") else "sd3"
    everything = {"transformer", "vae", "text_encoder", "text_encoder_2"} | (
        {"text_encoder_3"} if family == "sd3" else set()
    )
    for form, parts, file_format in [
        ("all_in_one", everything, "safetensors"),
        ("transformer", {"transformer"}, "safetensors"),
        ("gguf", {"transformer"}, "gguf"),
    ]:
        info = detect(path_of(model, form))
        assert isinstance(info, FlowFile)
        assert (info.family, info.variant, info.format, set(info.parts)) == (family, VARIANT[arch], file_format, parts)
        read = {key: info.transformer[key] for key in info.transformer if key in folder_config}
        expected = {key: folder_config[key] for key in read}
        if expected.get("out_channels", 0) is None:  # FLUX's "the same as in_channels"
            expected["out_channels"] = folder_config["in_channels"]
        assert read == expected, form  # sizes, heads, layers: all from shapes
        assert info.prefix == ("model.diffusion_model." if form == "all_in_one" else "")


@pytest.mark.parametrize("arch", ["sd3-medium", "sd3", "sd3.5-large", "flux", "flux-schnell", "flux-fill"])
def test_detect_tells_the_variants_apart(flow_model: FlowModels, arch: str) -> None:
    info = detect(flow_model(arch).transformer)
    assert info is not None and info.variant == VARIANT.get(arch, arch)
    assert info.pipeline_class == {"flux-fill": "FluxFillPipeline"}.get(
        arch, "FluxPipeline" if arch.startswith("flux") else "StableDiffusion3Pipeline"
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_shipped_configs_are_what_full_size_files_infer(variant: str) -> None:
    """A full-size transformer of each variant (on the meta device: no memory), written in the original
    layout, is recognised as its variant and infers exactly the shipped transformer config."""
    shipped = json.loads((architectures_root() / variant / "transformer" / "config.json").read_text())
    model_class = FluxTransformer2DModel if variant.startswith("flux") else SD3Transformer2DModel
    with torch.device("meta"):
        transformer = model_class.from_config(shipped)
    shapes = {key: tuple(t.shape) for key, t in transformer_to_original(transformer).items()}
    info = detect_shapes(shapes, Path(f"{variant}.safetensors"))
    assert info is not None and info.variant == variant
    read = {key: info.transformer[key] for key in info.transformer if key in shipped}
    expected = {key: shipped[key] for key in read} | (
        {"out_channels": 64} if variant in ("flux-dev", "flux-schnell") else {}
    )
    assert read == expected
    # The published sizes: SD3 Medium 2B, SD3.5 Medium 2.5B (with its 384x384 position table, a
    # buffer), SD3.5 Large 8.1B, FLUX.1 12B.
    assert sum(p.numel() for p in transformer.parameters()) == PARAMETERS[variant]


def test_the_flux_conversion_matches_diffusers_own_at_flux1_width() -> None:
    """diffusers' converter hard-codes FLUX.1's width; ours hands it stand-ins and splits `linear1`
    itself so any width loads. At FLUX.1's width both give the same names and shapes."""
    config = json.loads((architectures_root() / "flux-dev" / "transformer" / "config.json").read_text())
    config |= {"num_layers": 1, "num_single_layers": 1}
    with torch.device("meta"):
        original = transformer_to_original(FluxTransformer2DModel.from_config(config))
    ours = _flux_to_diffusers(dict(original), config)
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(original))
    assert {key: tuple(t.shape) for key, t in ours.items()} == {key: tuple(t.shape) for key, t in theirs.items()}


def test_sd_and_sdxl_files_and_other_files_are_not_claimed(arch_model: ArchModels, tmp_path: Path) -> None:
    assert detect(arch_model("sd1").safetensors) is None
    assert detect(arch_model("sdxl").safetensors) is None
    assert detect(arch_model("sd1").ckpt) is None  # never unpickled here
    lora = tmp_path / "flux-lora.safetensors"
    save_file({"diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight": torch.zeros(4, 8)}, lora)
    assert detect(lora) is None


@pytest.mark.parametrize(
    ("marker", "named"),
    [("distilled_guidance_layer.in_proj.weight", "Chroma"), ("single_stream_modulation.lin.weight", "FLUX.2")],
)
def test_related_files_sdserver_cannot_serve_are_named(marker: str, named: str) -> None:
    with pytest.raises(UnsupportedModel, match=named):
        detect_shapes({marker: (8, 8), "double_blocks.0.img_attn.qkv.weight": (9, 3)}, Path("x.safetensors"))


def test_a_flux_control_model_is_named(flow_model: FlowModels) -> None:
    shapes = {key: tuple(t.shape) for key, t in load_file(flow_model("flux").transformer).items()}
    inner = shapes["img_in.weight"][0]
    shapes["img_in.weight"] = (inner, 128)  # latents + the depth/canny image's latents
    with pytest.raises(UnsupportedModel, match="Depth or Canny"):
        detect_shapes(shapes, Path("flux1-depth-dev.safetensors"))


def one_line(error: pytest.ExceptionInfo[Any]) -> str:
    message: str = error.value.message
    assert "\n" not in message and str(error.value) == message
    return message


@pytest.mark.parametrize("form", ["transformer", "gguf"])
def test_a_transformer_alone_without_encoders_says_what_it_lacks_in_one_line(flow_model: FlowModels, form: str) -> None:
    path = path_of(flow_model("flux"), form)
    with pytest.raises(UnsupportedModel) as refused:
        load(path)
    message = one_line(refused)
    assert path.name in message and "only the transformer" in message
    assert "VAE" in message and "CLIP-L" in message and "T5" in message
    assert "`encoders`" in message and "black-forest-labs/FLUX.1-dev" in message


def test_a_file_with_t5_but_no_t5_tokenizer_says_so_in_one_line(flow_model: FlowModels) -> None:
    path = flow_model("sd3").all_in_one
    with pytest.raises(UnsupportedModel) as refused:
        load(path)
    message = one_line(refused)
    assert path.name in message and "T5" in message and "tokenizer" in message and "`encoders`" in message


def test_an_sd3_file_without_t5_runs_without_it(flow_model: FlowModels, tmp_path: Path) -> None:
    model = flow_model("sd3", t5=False)
    pipe = load(model.all_in_one)  # CLIP-L, CLIP-G and the VAE are in the file; tokenizers ship
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    assert same_image(draw(pipe), folder_image(model))
    # A transformer alone with encoders that have no T5: the same.
    assert load(model.transformer, encoders=model.folder).text_encoder_3 is None


def test_encoders_must_be_of_the_same_family_and_have_what_is_missing(flow_model: FlowModels, tmp_path: Path) -> None:
    flux = flow_model("flux").transformer
    with pytest.raises(UnsupportedModel) as wrong_family:
        load(flux, encoders=flow_model("sd3").folder)
    assert "StableDiffusion3Pipeline" in one_line(wrong_family) and "FLUX.1" in wrong_family.value.message

    partial = tmp_path / "partial"
    partial.mkdir()
    index = json.loads((flow_model("flux").folder / "model_index.json").read_text())
    (partial / "model_index.json").write_text(json.dumps(index | {"vae": [None, None]}))
    with pytest.raises(UnsupportedModel) as lacking:
        load(flux, encoders=partial)
    assert "VAE" in one_line(lacking) and str(partial) in lacking.value.message

    empty = tmp_path / "no-vocabulary"
    for file in flow_model("flux").folder.rglob("*"):
        if file.is_file() and file.parent.name != "tokenizer_2":
            target = empty / file.relative_to(flow_model("flux").folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(file.read_bytes())
    (empty / "tokenizer_2").mkdir()
    (empty / "tokenizer_2" / "tokenizer_config.json").write_text('{"tokenizer_class": "T5Tokenizer"}')
    with pytest.raises(ModelLoadError) as no_vocabulary:
        load(flux, encoders=empty)
    assert "tokenizer_2 has no vocabulary" in one_line(no_vocabulary)

    with pytest.raises(ModelLoadError) as unreadable:
        load(flux, encoders=tmp_path / "nothing")
    assert "model_index.json" in one_line(unreadable)


def test_files_that_are_not_flow_models_or_not_readable_fail_clearly(arch_model: ArchModels, tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModel, match=r"not a Stable Diffusion 3 / 3\.5 or FLUX\.1 file"):
        load(arch_model("sd1").safetensors)
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 16)
    with pytest.raises(ModelLoadError, match=r"broken\.gguf"):
        detect(broken)


def test_a_fine_tune_in_half_precision_loads_in_its_own_width(flow_model: FlowModels, tmp_path: Path) -> None:
    """Sizes come from the shapes, dtype from the caller: an fp16 file of the tiny SD3 loads as float32."""
    model = flow_model("sd3")
    pipe = model.pipeline
    half = save_safetensors(all_in_one(pipe), tmp_path / "sd3-fp16.safetensors", dtype=torch.float16)
    loaded = load(half, encoders=model.folder)
    assert loaded.transformer.dtype == torch.float32
    assert loaded.transformer.config.caption_projection_dim == pipe.transformer.config.caption_projection_dim


def test_encoders_may_be_a_hub_id_in_the_local_cache(flow_model: FlowModels, tmp_path: Path) -> None:
    model = flow_model("flux")
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-flux"
    for file in model.folder.rglob("*"):
        if file.is_file():
            target = repo / "snapshots" / revision / file.relative_to(model.folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(file.read_bytes())
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    script = (
        "import sys, torch\nfrom pathlib import Path\nfrom sdserver.engine.flowfiles import load_pipeline\n"
        "pipe = load_pipeline(Path(sys.argv[1]), torch.float32, encoders='someone/tiny-flux')\n"
        "print('LOADED', type(pipe).__name__, type(pipe.text_encoder_2).__name__)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    done = subprocess.run(
        [sys.executable, "-c", script, str(model.gguf)], capture_output=True, text=True, env=env, timeout=300
    )
    assert "LOADED FluxPipeline T5EncoderModel" in done.stdout, done.stderr


def test_gguf_files_hold_quantised_weights_as_city96_writes_them(flow_model: FlowModels) -> None:
    reader = gguf.GGUFReader(str(flow_model("flux").gguf))
    kinds = {tensor.name: tensor.tensor_type for tensor in reader.tensors}
    assert kinds["double_blocks.0.img_attn.qkv.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert kinds["double_blocks.0.img_attn.qkv.bias"] == gguf.GGMLQuantizationType.F32
    assert str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8") == "flux"
