"""The ControlNet library (controlnet_dir): listing without loading, loading folders and single files,
base-model checks, one ControlNet step whose residuals fit the UNet, and control-image resizing."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image
from safetensors.torch import save_file

from sdserver.core.errors import InvalidRequest, UnsupportedModel
from sdserver.engine import controlnets
from sdserver.engine.controlnets import ControlNetLibrary, active, prepare_image, residuals
from tests.conftest import ArchModels
from tests.support.controlnets import make_tiny_controlnet, save_original

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, arch_model: ArchModels) -> Path:
    root = tmp_path_factory.mktemp("controlnets")
    canny = make_tiny_controlnet(tiny_model / "unet", root / "tiny-canny")
    save_original(canny, root / "tiny-file.safetensors")
    save_original(canny, root / "tiny-pickle.pth", prefix="control_model.")
    shutil.copy(canny / "diffusion_pytorch_model.safetensors", root / "tiny-diffusers-layout.safetensors")
    make_tiny_controlnet(arch_model("sdxl").folder / "unet", root / "xl-canny")
    save_file({"lora_unet_down.weight": torch.zeros(2, 2)}, str(root / "not-a-controlnet.safetensors"))
    (root / "notes.txt").write_text("not a model")
    return root


@pytest.fixture(scope="module")
def unet(tiny_model: Path) -> Any:
    return UNet2DConditionModel.from_pretrained(tiny_model / "unet")


def test_lists_folders_and_files_by_name_without_loading(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(controlnets, "load", lambda *args: pytest.fail("listing loaded a model"))
    library = ControlNetLibrary(folder)
    assert library.names() == [
        "not-a-controlnet", "tiny-canny", "tiny-diffusers-layout", "tiny-file", "tiny-pickle", "xl-canny",
    ]  # fmt: skip
    titles = library.model_list()["model_list"]
    assert titles[1].startswith("tiny-canny [") and all(len(title.rsplit("[", 1)[1]) == 9 for title in titles)
    assert library.kind("tiny-canny") == "sd1" and library.kind("tiny-file") == "sd1"
    assert library.kind("tiny-diffusers-layout") == "sd1"
    assert library.kind("xl-canny") == "sdxl"


def test_the_hash_is_a1111s_short_model_hash(folder: Path) -> None:
    data = (folder / "tiny-file.safetensors").read_bytes()
    assert ControlNetLibrary(folder).short_hash("tiny-file") == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def test_names_with_the_hash_or_another_case_and_unknown_names(folder: Path) -> None:
    library = ControlNetLibrary(folder)
    assert library.entry("tiny-canny [0badf00d]").name == "tiny-canny"
    assert library.entry("TINY-CANNY").name == "tiny-canny"
    with pytest.raises(InvalidRequest) as caught:
        library.entry("openpose", field="alwayson_scripts.controlnet.args[0].model")
    assert caught.value.field == "alwayson_scripts.controlnet.args[0].model"
    assert "'openpose'" in caught.value.message and "tiny-canny" in caught.value.message
    with pytest.raises(InvalidRequest, match="no controlnet_dir"):
        ControlNetLibrary(None).entry("x")


def test_a_new_file_is_found_without_a_restart(folder: Path, tmp_path: Path) -> None:
    library = ControlNetLibrary(tmp_path)
    assert library.names() == []
    (tmp_path / "late.safetensors").write_bytes((folder / "tiny-file.safetensors").read_bytes())
    assert library.entry("late").path.name == "late.safetensors"


def test_a_controlnet_for_another_base_is_refused(folder: Path) -> None:
    library = ControlNetLibrary(folder)
    library.check_fits("tiny-canny", "tiny", "sd1")
    with pytest.raises(InvalidRequest) as caught:
        library.check_fits("xl-canny", "tiny", "sd1", field="args[0].model")
    assert caught.value.message == "args[0].model: controlnet 'xl-canny' is for sdxl; model 'tiny' is sd1"


def test_a_file_that_is_no_controlnet_is_refused_by_name(folder: Path) -> None:
    library = ControlNetLibrary(folder)
    with pytest.raises(UnsupportedModel, match=r"not-a-controlnet\.safetensors is not a ControlNet"):
        library.kind("not-a-controlnet")
    with pytest.raises(UnsupportedModel, match=r"not-a-controlnet\.safetensors"):
        library.get("not-a-controlnet", CPU, torch.float32)


def inputs(unet: Any, rows: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(rows, 4, 8, 8, generator=generator)
    context = torch.randn(rows, 5, unet.config.cross_attention_dim, generator=generator)
    edges = Image.new("RGB", (64, 64))
    edges.paste((255, 255, 255), (16, 16, 48, 48))
    return latents, torch.tensor([10, 500][:rows]), context, prepare_image(edges, 64, 64)


def test_residuals_fit_the_unets_blocks_and_change_its_output(folder: Path, unet: Any) -> None:
    library = ControlNetLibrary(folder)
    controlnet = library.get("tiny-canny", CPU, torch.float32)
    assert library.get("tiny-canny [12345678]", CPU, torch.float32) is controlnet  # loaded once
    latents, timesteps, context, image = inputs(unet)
    with torch.no_grad():
        down, mid = residuals(controlnet, latents, timesteps, context, image, 1.0)
        plain = unet(latents, timesteps, context).sample
        controlled = unet(
            latents, timesteps, context, down_block_additional_residuals=down, mid_block_additional_residual=mid
        ).sample
        half, _ = residuals(controlnet, latents, timesteps, context, image, 0.5)
    assert len(down) == 4 and all(r.shape[0] == 2 for r in down) and mid.shape == (2, 64, 4, 4)
    assert (controlled - plain).abs().max() > 1e-3
    assert torch.allclose(half[-1], down[-1] * 0.5, atol=1e-6)  # scale multiplies every residual


def test_single_files_load_to_the_same_controlnet(folder: Path, unet: Any) -> None:
    library = ControlNetLibrary(folder)
    latents, timesteps, context, image = inputs(unet, rows=1)
    results = []
    with torch.no_grad():
        for name in ("tiny-canny", "tiny-file", "tiny-pickle", "tiny-diffusers-layout"):
            results.append(residuals(library.get(name, CPU, torch.float32), latents, timesteps, context, image, 1.0))
    for down, mid in results[1:]:
        assert torch.allclose(mid, results[0][1], atol=1e-5)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(down, results[0][0], strict=True))


def test_sdxl_controlnet_takes_the_added_conditions(folder: Path, arch_model: ArchModels) -> None:
    xl = UNet2DConditionModel.from_pretrained(arch_model("sdxl").folder / "unet")
    controlnet = ControlNetLibrary(folder).get("xl-canny", CPU, torch.float32)
    latents, timesteps = torch.randn(1, 4, 8, 8), torch.tensor([10])
    context = torch.randn(1, 5, xl.config.cross_attention_dim)
    pooled = xl.config.projection_class_embeddings_input_dim - 6 * xl.config.addition_time_embed_dim
    added = {"text_embeds": torch.randn(1, pooled), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        down, mid = residuals(controlnet, latents, timesteps, context, torch.zeros(1, 3, 64, 64), 1.0, added)
        xl(latents, timesteps, context, added_cond_kwargs=added, down_block_additional_residuals=down,
           mid_block_additional_residual=mid)  # fmt: skip


def halves(size: tuple[int, int] = (200, 100)) -> Image.Image:
    """Left half red, right half blue."""
    image = Image.new("RGB", size, (255, 0, 0))
    image.paste((0, 0, 255), (size[0] // 2, 0, *size))
    return image


def rgb(tensor: torch.Tensor, x: int, y: int) -> tuple[int, ...]:
    return tuple(round(float(v) * 255) for v in tensor[0, :, y, x])


@pytest.mark.parametrize("mode", ["Just Resize", "Crop and Resize", "Resize and Fill", 0, 1, 2])
def test_prepare_image_gives_the_requested_size_in_0_to_1(mode: Any) -> None:
    tensor = prepare_image(halves(), 64, 48, mode)
    assert tensor.shape == (1, 3, 48, 64) and tensor.dtype == torch.float32
    assert float(tensor.min()) >= 0.0 and float(tensor.max()) <= 1.0


def test_resize_modes() -> None:
    stretched = prepare_image(halves(), 64, 64, "Just Resize")  # the whole picture, squashed
    assert rgb(stretched, 4, 32) == (255, 0, 0) and rgb(stretched, 60, 32) == (0, 0, 255)
    cropped = prepare_image(halves((100, 200)), 64, 64, "Crop and Resize")  # a tall picture: top and bottom go
    assert rgb(cropped, 4, 0) == (255, 0, 0) and rgb(cropped, 60, 63) == (0, 0, 255)
    filled = prepare_image(halves((200, 100)), 64, 64, 2)  # a wide picture: bands above and below
    assert rgb(filled, 4, 32) == (255, 0, 0) and rgb(filled, 60, 32) == (0, 0, 255)
    band = np.array([rgb(filled, x, 2) for x in range(64)])
    assert (band == band[0]).all()  # one fill colour, from the picture's border
    with pytest.raises(ValueError, match="unknown resize mode"):
        prepare_image(halves(), 64, 64, 5)


def test_a_unit_is_active_between_guidance_start_and_end() -> None:
    assert [active(0.0, 1.0, step, 10) for step in range(10)] == [True] * 10
    assert [active(0.2, 0.6, step, 10) for step in range(10)] == [False, False, True, True, True, True] + [False] * 4
