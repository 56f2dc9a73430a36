"""Upscalers: the built-in resamplers and the model files of upscalers_dir (tiny random-weight ESRGAN
and SwinIR models, read by spandrel), listed without loading, run tiled, to exactly the size asked."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdserver.core.errors import InvalidRequest, UnsupportedModel
from sdserver.engine.upscalers import Upscalers, import_spandrel
from tests.conftest import max_pixel_diff, pixels, scene
from tests.support.upscalers import make_tiny_upscaler


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("upscalers")
    make_tiny_upscaler(folder / "tiny-esrgan.safetensors")
    make_tiny_upscaler(folder / "tiny-esrgan-pth.pth", seed=1)
    make_tiny_upscaler(folder / "4x-tiny-swinir.pth", scale=4, arch="swinir")
    (folder / "broken.pth").write_bytes(b"not a pickle at all")
    (folder / "README.txt").write_text("not a model")
    return folder


@pytest.fixture
def library(folder: Path) -> Upscalers:
    return Upscalers(str(folder))


def picture(width: int = 48, height: int = 40) -> Image.Image:
    return scene(64).resize((width, height))


class TestListing:
    def test_the_builtins_come_first_then_each_model_file_by_name(self, library: Upscalers) -> None:
        assert library.names() == [
            "None",
            "Lanczos",
            "Nearest",
            "4x-tiny-swinir",
            "broken",
            "tiny-esrgan",
            "tiny-esrgan-pth",
        ]

    def test_listing_reads_no_weights(self, library: Upscalers) -> None:
        described = {item["name"]: item for item in library.describe()}
        assert library._loaded is None  # a corrupt file is listed too: nothing was read
        assert described["broken"]["model_path"].endswith("broken.pth")
        assert described["Lanczos"] == {
            "name": "Lanczos", "model_name": None, "model_path": None, "model_url": None, "scale": 4
        }  # fmt: skip

    def test_the_scale_is_guessed_from_the_name_until_the_model_loads(self, library: Upscalers) -> None:
        scales = {item["name"]: item["scale"] for item in library.describe()}
        assert scales["4x-tiny-swinir"] == 4 and scales["tiny-esrgan"] == 4  # no scale in its name: 4
        library.upscale(picture(), "tiny-esrgan", 96, 80)
        assert {item["name"]: item["scale"] for item in library.describe()}["tiny-esrgan"] == 2

    def test_the_usual_names_tell_the_scale(self, tmp_path: Path) -> None:
        names = ["RealESRGAN_x2plus", "4xNomos8kSC", "ESRGAN_4x", "1x-Refiner", "SwinIR-L_x4_GAN", "BSRGAN"]
        for name in names:
            (tmp_path / f"{name}.pth").write_bytes(b"")  # listing never opens a file
        scales = {item["name"]: item["scale"] for item in Upscalers(str(tmp_path)).describe()}
        assert [scales[name] for name in names] == [2, 4, 4, 1, 4, 4]

    def test_no_folder_offers_the_builtins(self) -> None:
        assert Upscalers(None).names() == ["None", "Lanczos", "Nearest"]
        assert Upscalers("/no/such/folder").names() == ["None", "Lanczos", "Nearest"]


class TestBuiltins:
    @pytest.mark.parametrize("name", ["None", "Lanczos", "Nearest"])
    @pytest.mark.parametrize("size", [(150, 90), (77, 33), (20, 10)])
    def test_exactly_the_size_asked(self, library: Upscalers, name: str, size: tuple[int, int]) -> None:
        result = library.upscale(picture(100, 60), name, *size)
        assert result.size == size and result.mode == "RGB"

    def test_nearest_repeats_pixels(self, library: Upscalers) -> None:
        image = picture()
        assert max_pixel_diff(library.upscale(image, "Nearest", 96, 80), image.resize((96, 80), Image.NEAREST)) == 0


class TestModels:
    def test_a_2x_model_doubles_with_the_models_pixels(self, library: Upscalers) -> None:
        image = picture()
        result = library.upscale(image, "tiny-esrgan", 96, 80)
        assert result.size == (96, 80)
        descriptor = library._loaded.model if library._loaded else None
        tensor = torch.from_numpy(pixels(image).astype(np.float32) / 255).permute(2, 0, 1)[None]
        direct = (descriptor(tensor)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.int16)  # type: ignore[misc]
        assert np.abs(pixels(result) - direct).max() <= 1
        assert pixels(result).std() > 2, "a model whose output is flat would prove nothing"
        assert max_pixel_diff(result, image.resize((96, 80), Image.LANCZOS)) > 20

    def test_a_larger_target_runs_the_model_again_then_resamples(
        self, library: Upscalers, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        passes: list[tuple[int, int]] = []
        real = Upscalers._pass

        def counting(self: Upscalers, model: object, image: Image.Image) -> Image.Image:
            passes.append(image.size)
            return real(self, model, image)

        monkeypatch.setattr(Upscalers, "_pass", counting)
        assert library.upscale(picture(), "tiny-esrgan", 130, 100).size == (130, 100)
        assert passes == [(48, 40), (96, 80)]  # 96x80 is short of 130x100: once more, to 192x160

    def test_a_smaller_target_needs_no_model_pass(self, library: Upscalers) -> None:
        assert library.upscale(picture(), "tiny-esrgan", 30, 20).size == (30, 20)
        assert library._loaded is None

    @pytest.mark.parametrize("name", ["tiny-esrgan-pth", "4x-tiny-swinir"])
    def test_pth_files_and_other_architectures(self, library: Upscalers, name: str) -> None:
        result = library.upscale(picture(), name, 150, 110)
        assert result.size == (150, 110)
        assert library._loaded is not None and library._loaded.name == name

    def test_tiles_meet_without_seams(self, folder: Path) -> None:
        image = picture(64, 48)  # 3 x 2 tiles of 24 px

        def run(tile: int, overlap: int) -> Image.Image:
            library = Upscalers(str(folder))
            library.tile, library.overlap = tile, overlap
            return library.upscale(image, "tiny-esrgan", 128, 96)

        whole = run(4096, 0)
        assert max_pixel_diff(run(24, 12), whole) <= 1
        assert max_pixel_diff(run(24, 0), whole) > 2, "without context the tiles' edges show"


class TestRefusals:
    def test_an_unknown_name_lists_the_valid_ones(self, library: Upscalers) -> None:
        with pytest.raises(InvalidRequest) as caught:
            library.check("ESRGAN_4x", "upscaler_1")
        assert caught.value.field == "upscaler_1"
        assert "'ESRGAN_4x'" in caught.value.message
        assert "valid: None, Lanczos, Nearest, 4x-tiny-swinir, broken, tiny-esrgan" in caught.value.message

    def test_names_match_in_any_case(self, library: Upscalers) -> None:
        assert library.resolve("lanczos") == "Lanczos"
        assert library.resolve("TINY-ESRGAN") == "tiny-esrgan"

    def test_a_file_spandrel_cannot_read_is_refused_by_name_when_used(self, library: Upscalers) -> None:
        library.check("broken")  # listed and valid as a name
        with pytest.raises(UnsupportedModel, match=r"upscaler 'broken': broken\.pth is not a model spandrel can read"):
            library.upscale(picture(), "broken", 96, 80)

    def test_weights_of_no_known_architecture_are_refused_by_name(self, tmp_path: Path) -> None:
        from safetensors.torch import save_file

        save_file({"weight": torch.zeros(3, 3)}, tmp_path / "mystery.safetensors")
        with pytest.raises(UnsupportedModel, match=r"mystery\.safetensors"):
            Upscalers(str(tmp_path)).upscale(picture(), "mystery", 96, 80)


def test_spandrel_imports_without_torchvision_and_leaves_no_placeholder() -> None:
    """A fresh import of spandrel (ours is set aside meanwhile): torchvision is exactly as findable
    afterwards as before (transformers asks find_spec), and the two architectures that need it fail
    clearly if ever run."""
    ours = {name: module for name, module in sys.modules.items() if name.split(".")[0] == "spandrel"}
    findable = importlib.util.find_spec("torchvision") is not None
    for name in ours:
        del sys.modules[name]
    try:
        spandrel = import_spandrel()
        assert spandrel is not ours.get("spandrel") and hasattr(spandrel, "ModelLoader")
        assert (importlib.util.find_spec("torchvision") is not None) == findable
        if not findable:
            assert not [name for name in sys.modules if name.split(".")[0] == "torchvision"], "a placeholder was left"
            lama = sys.modules["spandrel.architectures.LaMa.__arch.LaMa"]
            with pytest.raises(RuntimeError, match="install torchvision"):
                lama.rotate(None, 0.0)
    finally:
        for name in [name for name in sys.modules if name.split(".")[0] == "spandrel"]:
            del sys.modules[name]
        sys.modules.update(ours)
