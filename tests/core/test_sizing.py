"""The size a request will generate (`sdserver.core.sizing`): one rule for every protocol, the limits
applied to it, whatever it came from."""

from __future__ import annotations

import pytest

from sdserver.core.errors import FieldError
from sdserver.core.limits import Limits
from sdserver.core.sizing import output_size

LIMITS = Limits(max_side=256, max_pixels=128 * 256)


def refused(*args: object, **kwargs: object) -> FieldError:
    with pytest.raises(FieldError) as info:
        output_size(*args, **kwargs)  # type: ignore[arg-type]
    return info.value


@pytest.mark.parametrize(
    ("width", "height", "source", "native", "expected"),
    [
        (64, 32, None, None, (64, 32)),  # as sent
        (64, 32, (1000, 10), None, (64, 32)),  # as sent wins over the init image
        (None, None, (80, 50), None, (80, 48)),  # the image's own size, rounded down to a multiple of 8
        (None, None, (3, 3), None, (8, 8)),  # never below 8
        (64, None, (200, 100), None, (64, 32)),  # one side sent: the other keeps the image's aspect
        (None, 64, (100, 200), None, (32, 64)),
        (None, None, None, 128, (128, 128)),  # the model's native size
        (64, None, None, 128, (64, 128)),
        (None, None, None, None, None),  # not known until the model is
    ],
)
def test_where_the_size_comes_from(
    width: int | None,
    height: int | None,
    source: tuple[int, int] | None,
    native: int | None,
    expected: tuple[int, int] | None,
) -> None:
    assert output_size(width, height, source, LIMITS, native=native) == expected


@pytest.mark.parametrize("side", ["width", "height"])
@pytest.mark.parametrize(
    ("value", "words"),
    [
        (0, "at least 8"),
        (-8, "at least 8"),
        (65, "multiple of 8"),
        (264, "over the limit of 256"),
        (1180591620717411303424, "over the limit of 256"),  # a number no image library would take
    ],
)
def test_every_bad_requested_side_is_refused_naming_it(side: str, value: int, words: str) -> None:
    sizes = {"width": 64, "height": 64, side: value}
    for source in (None, (64, 64)):  # with or without an init image: the requested size is checked
        error = refused(sizes["width"], sizes["height"], source, LIMITS)
        assert (error.name, error.value) == (side, value) and words in error.reason


def test_requested_pixels_over_the_limit() -> None:
    error = refused(256, 256, None, LIMITS)
    assert error.name == "width" and "256 x height 256" in error.reason and str(128 * 256) in error.reason


@pytest.mark.parametrize(
    ("source", "words"),
    [
        ((264, 8), "264x8 init image gives a 264x8 output, over the limit of 256 per side"),  # past max_side
        ((8, 2056), "over the limit of 256 per side"),
        ((256, 256), "65536 pixels, over the limit of 32768"),  # past max_pixels
    ],
)
def test_a_size_from_the_init_image_gets_the_same_limits(source: tuple[int, int], words: str) -> None:
    error = refused(None, None, source, LIMITS)
    assert error.name == "init_image" and words in error.reason


def test_a_side_derived_from_the_aspect_gets_the_limits_naming_that_side() -> None:
    error = refused(256, None, (100, 400), LIMITS)  # height would be 1024
    assert error.name == "height" and "over the limit of 256" in error.reason


def test_a_native_size_over_the_limits_is_refused_saying_so() -> None:
    error = refused(None, None, None, Limits(max_side=512), native=1024)
    assert "native size is 1024x1024" in error.reason and "512" in error.reason
