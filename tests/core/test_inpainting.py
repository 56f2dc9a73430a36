"""core/inpainting.py: A1111's image work around inpainting and img2img, on plain PIL images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdserver.core.inpainting import (
    blurred_mask,
    crop_for_full_res,
    crop_region,
    doubled,
    fill_masked,
    paste_back,
    resized,
)


def mask_with(box: tuple[int, int, int, int], size: tuple[int, int] = (100, 80)) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


def striped(size: tuple[int, int] = (100, 50)) -> Image.Image:
    """Left half red, right half blue: where a crop or a bar lands is visible."""
    image = Image.new("RGB", size, (200, 0, 0))
    image.paste((0, 0, 200), (size[0] // 2, 0, *size))
    return image


def array(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


class TestCropRegion:
    def test_the_masks_box_plus_padding_grown_to_the_aspect(self) -> None:
        mask = mask_with((40, 30, 50, 40))  # 10 x 10 at the centre of 100 x 80
        assert crop_region(mask, 0, (10, 10)) == (40, 30, 50, 40)
        assert crop_region(mask, 5, (10, 10)) == (35, 25, 55, 45)
        left, top, right, bottom = crop_region(mask, 5, (20, 10)) or (0, 0, 0, 0)
        assert (right - left, bottom - top) == (40, 20) and (left, top) == (25, 25)  # wider, about its centre

    def test_grown_box_is_moved_inside_the_image_and_keeps_the_mask(self) -> None:
        mask = mask_with((0, 70, 10, 80))  # the bottom-left corner
        box = crop_region(mask, 4, (1, 1))
        assert box == (0, 66, 14, 80)
        tall = crop_region(mask_with((90, 0, 100, 80)), 0, (1, 2))  # wants 10 x 20, gets 40 x 80 inside 100 x 80
        assert tall == (60, 0, 100, 80)

    def test_never_larger_than_the_image(self) -> None:
        assert crop_region(mask_with((0, 0, 100, 10)), 32, (1, 4)) == (0, 0, 100, 80)

    def test_blank_mask_has_no_box(self) -> None:
        assert crop_region(Image.new("L", (20, 20)), 8, (1, 1)) is None


class TestPasteBack:
    def test_outside_the_blurred_mask_is_exactly_the_original(self) -> None:
        rng = np.random.default_rng(0)
        init = Image.fromarray(rng.integers(0, 256, (80, 100, 3), dtype=np.uint8))
        soft = blurred_mask(mask_with((40, 30, 50, 40)), 4)
        generated = Image.new("RGB", (100, 80), (0, 255, 0))
        out = array(paste_back(generated, init, doubled(soft)))
        outside, inside = array(soft) == 0, array(soft) >= 128
        assert (out[outside] == array(init)[outside]).all()
        assert (out[inside] == (0, 255, 0)).all()  # doubled: the repainted half comes back whole
        edge = (array(soft) > 0) & (array(soft) < 64)
        assert edge.any() and not (out[edge] == array(init)[edge]).all(axis=1).all(), "a blend at the soft edge"

    def test_a_crop_goes_back_to_its_box(self) -> None:
        init = Image.new("RGB", (100, 80), (10, 20, 30))
        mask = mask_with((40, 30, 60, 50))
        box = crop_region(mask, 0, (64, 64))
        assert box == (40, 30, 60, 50)
        work, work_mask = crop_for_full_res(init, mask, box, (64, 64))
        assert work.size == work_mask.size == (64, 64) and array(work_mask).min() == 255
        out = array(paste_back(Image.new("RGB", (64, 64), (255, 255, 255)), init, mask, box))
        assert out.shape == (80, 100, 3)
        assert (out[30:50, 40:60] == 255).all()
        outside = np.ones((80, 100), bool)
        outside[30:50, 40:60] = False
        assert (out[outside] == (10, 20, 30)).all()


class TestMask:
    def test_binarised_then_blurred(self) -> None:
        soft_edged = Image.fromarray(np.array([[0, 100, 130, 255]] * 4, dtype=np.uint8))
        assert array(blurred_mask(soft_edged, 0))[0].tolist() == [0, 0, 255, 255]
        blurred = array(blurred_mask(mask_with((40, 30, 50, 40)), 3))
        assert blurred[35, 45] > 200 and 0 < blurred[35, 52] < 255 and blurred[35, 60] == 0

    def test_doubled_is_clipped(self) -> None:
        assert array(doubled(Image.fromarray(np.array([[0, 60, 128, 255]], dtype=np.uint8))))[0].tolist() == [
            0,
            120,
            255,
            255,
        ]


def test_fill_paints_the_mask_with_the_colours_around_it() -> None:
    init = Image.new("RGB", (64, 64), (0, 0, 200))
    init.paste((255, 255, 255), (16, 16, 48, 48))  # a white square on blue, masked
    mask = mask_with((16, 16, 48, 48), (64, 64))
    out = array(fill_masked(init, mask))
    assert (out[:16] == (0, 0, 200)).all() and (out[48:] == (0, 0, 200)).all(), "outside the mask unchanged"
    assert np.abs(out[16:48, 16:48] - (0, 0, 200)).max() <= 8, "the white is gone: blue from around it"


def test_fill_follows_the_nearest_colours() -> None:
    init = striped((64, 64))  # red left, blue right
    mask = mask_with((16, 16, 48, 48), (64, 64))
    out = array(fill_masked(init, mask))
    assert out[32, 18, 0] > out[32, 18, 2] and out[32, 45, 2] > out[32, 45, 0]


class TestResized:
    @pytest.mark.parametrize("mode", ["just_resize", "crop_and_resize", "resize_and_fill", "latent_upscale"])
    def test_every_mode_gives_the_size(self, mode: str) -> None:
        for size in ((64, 64), (40, 96), (200, 50)):
            assert resized(striped(), mode, size).size == size  # type: ignore[arg-type]

    def test_crop_and_resize_keeps_the_aspect_and_cuts_the_sides(self) -> None:
        picture = Image.new("RGB", (100, 50), (0, 0, 200))
        picture.paste((0, 200, 0), (0, 0, 20, 50))  # a green band on the left, outside the middle 50 x 50
        assert (
            array(resized(picture, "crop_and_resize", (50, 50))).tolist()
            == array(picture.crop((25, 0, 75, 50))).tolist()
        )
        assert array(resized(picture, "crop_and_resize", (20, 20)))[:, :, 1].max() <= 2, "no green: cut off"
        stretched = array(resized(picture, "just_resize", (50, 50)))
        assert (stretched[:, :7, 1] > 190).all(), "just_resize keeps the band, squeezed"

    def test_resize_and_fill_keeps_the_whole_picture_and_stretches_its_edges(self) -> None:
        picture = striped((100, 50))
        picture.paste((0, 200, 0), (0, 0, 100, 1))  # a green top row
        picture.paste((200, 200, 0), (0, 49, 100, 50))  # a yellow bottom row
        out = array(resized(picture, "resize_and_fill", (100, 100)))  # 100 x 50 inside, bars of 25 above and below
        assert (out[:25] == (0, 200, 0)).all(), "the top bar repeats the top row"
        assert (out[75:] == (200, 200, 0)).all(), "the bottom bar repeats the bottom row"
        assert (out[30:70, :45] == (200, 0, 0)).all() and (out[30:70, 55:] == (0, 0, 200)).all()

    def test_resize_and_fill_side_bars(self) -> None:
        out = array(resized(striped((50, 100)), "resize_and_fill", (100, 100)))  # 50 x 100 inside: bars at the sides
        assert (out[:, :25] == (200, 0, 0)).all() and (out[:, 75:] == (0, 0, 200)).all()
