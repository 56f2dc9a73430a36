"""ControlNet preprocessors: what each module draws, processor_res, defaults, and modules refused by name."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdserver import preprocessors
from sdserver.core.errors import InvalidRequest


def square(size: int = 128, inner: tuple[int, int] = (32, 96)) -> Image.Image:
    """A white square on black."""
    image = Image.new("RGB", (size, size), (0, 0, 0))
    image.paste((255, 255, 255), (inner[0], inner[0], inner[1], inner[1]))
    return image


def grey(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L"), dtype=np.int16)


def test_modules_by_name_and_by_alias() -> None:
    names = preprocessors.modules()
    assert {"none", "canny", "threshold", "invert", "lineart_standard", "tile_resample", "blur_gaussian"} <= set(names)
    aliases = preprocessors.modules(alias_names=True)
    assert "invert (from white bg & black line)" in aliases and "invert" not in aliases
    assert len(names) == len(aliases)


def test_module_details_in_the_extensions_shape() -> None:
    details = preprocessors.module_details()
    assert details["none"] == {"model_free": False, "sliders": []}
    resolution, low, high = details["canny"]["sliders"]
    assert resolution == {"name": "Preprocessor Resolution", "value": 512, "min": 64, "max": 2048}
    assert (low["value"], high["value"]) == (100, 200)
    assert details["tile_resample"]["sliders"][0] is None  # no resolution slider: it keeps the size
    assert "lineart_standard (from white bg & black line)" in preprocessors.module_details(alias_names=True)


def test_canny_draws_the_border_of_a_square_only() -> None:
    edges = grey(preprocessors.run("canny", square(), res=128))
    assert edges.shape == (128, 128)
    ys, xs = np.nonzero(edges)
    assert len(ys) > 4 * 50  # the four sides
    near_border = (np.minimum(np.abs(ys - 32), np.abs(ys - 95)) <= 2) | (
        np.minimum(np.abs(xs - 32), np.abs(xs - 95)) <= 2
    )
    assert near_border.all()
    assert edges[40:88, 40:88].max() == 0 and edges[:20].max() == 0


def test_canny_thresholds_are_threshold_a_and_b() -> None:
    faint = Image.new("RGB", (128, 128), (0, 0, 0))
    faint.paste((15, 15, 15), (32, 32, 96, 96))  # a weak edge: found with low thresholds, not the defaults
    assert grey(preprocessors.run("canny", faint, 128)).max() == 0
    assert grey(preprocessors.run("canny", faint, 128, threshold_a=10, threshold_b=20)).max() == 255


def test_processor_res_resizes_the_short_side() -> None:
    wide = Image.new("RGB", (200, 100), (10, 10, 10))
    assert preprocessors.run("canny", wide, res=256).size == (512, 256)
    assert preprocessors.run("canny", wide).size == (1024, 512)  # default 512
    assert preprocessors.run("canny", wide, res=-1).size == (1024, 512)  # the extension's "default"
    assert preprocessors.run("canny", wide, res=5000).size == (1024, 512)  # out of range: the default
    assert preprocessors.run("invert", wide, res=256).size == (200, 100)  # no resolution slider


def test_threshold_is_white_where_brighter() -> None:
    image = Image.new("RGB", (64, 64), (100, 100, 100))
    image.paste((200, 200, 200), (32, 0, 64, 64))
    out = grey(preprocessors.run("threshold", image, res=64, threshold_a=150))
    assert out[:, :32].max() == 0 and out[:, 32:].min() == 255
    assert grey(preprocessors.run("threshold", image, res=64)).min() == 0  # default 127: 100 is below


def test_invert_and_its_long_name() -> None:
    image = Image.new("RGB", (10, 10), (255, 250, 0))
    for name in ("invert", "invert (from white bg & black line)", "INVERT"):
        assert preprocessors.run(name, image).getpixel((0, 0)) == (0, 5, 255)


def test_lineart_standard_makes_black_lines_white() -> None:
    drawing = Image.new("RGB", (128, 128), (255, 255, 255))
    drawing.paste((0, 0, 0), (60, 0, 64, 128))  # a black vertical line
    out = grey(preprocessors.run("lineart_standard", drawing, res=128))
    assert out[:, 60:64].mean() > 100 and out[:, :40].max() == 0


def test_tile_resample_downsamples_by_threshold_a() -> None:
    image = Image.new("RGB", (128, 64), (1, 2, 3))
    assert preprocessors.run("tile_resample", image, threshold_a=2).size == (64, 32)
    assert preprocessors.run("tile_resample", image).size == (128, 64)  # rate 1: unchanged
    assert preprocessors.run("tile_resample", image, threshold_a=64).size == (128, 64)  # webuiapi's 64: default


def test_color_is_a_grid_of_flat_cells() -> None:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8))
    out = np.asarray(preprocessors.run("color", image, res=128))
    assert out.shape == (128, 128, 3)
    for y, x in ((0, 0), (0, 64), (64, 64)):
        cell = out[y : y + 64, x : x + 64].reshape(-1, 3)
        assert (cell == cell[0]).all()


@pytest.mark.parametrize("name", ["blur_gaussian", "scribble_xdog", "shuffle", "recolor_luminance", "none"])
def test_every_module_runs(name: str) -> None:
    out = preprocessors.run(name, square(64), res=64)
    assert out.mode == "RGB" and out.size == (64, 64)


def test_shuffle_is_repeatable() -> None:
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    first, second = preprocessors.run("shuffle", image, 64), preprocessors.run("shuffle", image, 64)
    assert np.array_equal(np.asarray(first), np.asarray(second))


@pytest.mark.parametrize(
    "name", ["openpose", "depth_midas", "depth", "softedge_hed", "lineart", "mlsd", "ip-adapter_clip_sd15"]
)
def test_modules_that_need_weights_are_refused_by_name(name: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        preprocessors.run(name, square(), names={"module": "controlnet_module"})
    assert caught.value.field == "controlnet_module"
    assert f"{name!r}" in caught.value.message and "needs a model file" in caught.value.message
    assert "canny" in caught.value.message  # what to use instead


def test_unsupported_and_unknown_modules() -> None:
    with pytest.raises(InvalidRequest, match="not supported"):
        preprocessors.run("reference_only", square())
    with pytest.raises(InvalidRequest, match="unknown module") as caught:
        preprocessors.run("cany", square())
    assert caught.value.field == "module"


def test_pixel_perfect_resolution() -> None:
    # a 1000x500 picture for a 512x512 output: cropping fills (scale 1.024), filling fits (0.512)
    assert preprocessors.pixel_perfect_resolution((1000, 500), (512, 512), "Crop and Resize") == 512
    assert preprocessors.pixel_perfect_resolution((1000, 500), (512, 512), "Resize and Fill") == 256
