"""ControlNet units read from A1111's `alwayson_scripts`, as the sd-webui-controlnet extension reads them."""

from __future__ import annotations

import base64
import io
from typing import Any

import pytest
from PIL import Image

from sdserver.core.control import MAX_UNITS, ControlUnit, model_name, units_from_alwayson_scripts
from sdserver.core.errors import InvalidRequest
from sdserver.core.limits import Limits


def b64(size: tuple[int, int] = (16, 8), mode: str = "RGB") -> str:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def units(*args: dict[str, Any], key: str = "controlnet", limits: Limits | None = None) -> list[ControlUnit]:
    return units_from_alwayson_scripts({key: {"args": list(args)}}, limits)


def refusal(*args: dict[str, Any]) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        units(*args)
    return caught.value


def test_a_unit_as_webuiapi_sends_it() -> None:
    sent = {
        "image": b64(), "mask": None, "module": "canny", "model": "control_v11p_sd15_canny [d14c016b]",
        "weight": 0.8, "resize_mode": "Resize and Fill", "low_vram": False, "processor_res": 512,
        "threshold_a": 64, "threshold_b": 64, "guidance_start": 0.1, "guidance_end": 0.9,
        "control_mode": "My prompt is more important", "pixel_perfect": False, "hr_option": "Both", "enabled": True,
    }  # fmt: skip
    (unit,) = units(sent, key="ControlNet")  # webuiapi's key
    assert unit.name == "control_v11p_sd15_canny" and unit.model == sent["model"]
    assert (unit.module, unit.weight, unit.guidance_start, unit.guidance_end) == ("canny", 0.8, 0.1, 0.9)
    assert (unit.control_mode, unit.resize_mode) == ("prompt", "Resize and Fill")
    assert (unit.processor_res, unit.threshold_a, unit.threshold_b) == (512, 64, 64)
    assert isinstance(unit.image, Image.Image) and unit.image.mode == "RGB" and unit.image.size == (16, 8)
    assert unit.mask is None


@pytest.mark.parametrize(
    ("sent", "expected"),
    [(0, "balanced"), (1, "prompt"), (2, "controlnet"), ("Balanced", "balanced"),
     ("ControlNet is more important", "controlnet"), ("prompt", "prompt")],
)  # fmt: skip
def test_control_mode_by_the_extensions_names_and_ints(sent: Any, expected: str) -> None:
    (unit,) = units({"model": "m", "control_mode": sent})
    assert unit.control_mode == expected


@pytest.mark.parametrize(
    ("sent", "expected"),
    [(0, "Just Resize"), (1, "Crop and Resize"), (2, "Resize and Fill"), ("Just Resize", "Just Resize"),
     ("Inner Fit (Scale to Fit)", "Crop and Resize"), ("Envelope (Outer Fit)", "Resize and Fill")],
)  # fmt: skip
def test_resize_mode_by_the_extensions_names_and_ints(sent: Any, expected: str) -> None:
    (unit,) = units({"model": "m", "resize_mode": sent})
    assert unit.resize_mode == expected


def test_defaults_are_the_extensions() -> None:
    (unit,) = units({"model": "m", "module": "canny", "threshold_a": -1})
    assert (unit.enabled, unit.weight, unit.control_mode, unit.resize_mode) == (
        True, 1.0, "balanced", "Crop and Resize",
    )  # fmt: skip
    assert (unit.processor_res, unit.threshold_a, unit.threshold_b) == (512, 100, 200)
    (tile,) = units({"model": "m", "module": "tile_resample", "threshold_a": 64})  # out of range: the default
    assert tile.threshold_a == 1.0


def test_disabled_units_and_model_none_are_dropped() -> None:
    kept = units(
        {"model": "a", "enabled": False, "weight": 99},  # disabled: not even validated
        {"model": "None", "module": "canny"},
        {"model": "", "module": "canny"},
        {"module": "canny"},
        {"model": "b", "enabled": "true"},
    )
    assert [unit.name for unit in kept] == ["b"]


def test_old_field_names_and_image_forms() -> None:
    (unit,) = units({"model": "m", "input_image": b64((8, 8)), "guidance": 0.5})
    assert unit.image is not None and unit.image.size == (8, 8) and unit.guidance_end == 0.5
    (pair,) = units({"model": "m", "image": {"image": b64(), "mask": b64(mode="L")}})
    assert pair.mask is not None and pair.mask.mode == "L"
    (empty,) = units({"model": "m", "image": ""})  # webuiapi's "no image"
    assert empty.image is None


def test_a_bad_weight_is_named_with_its_index() -> None:
    error = refusal({"model": "a"}, {"model": "b", "weight": 3})
    assert error.field == "alwayson_scripts.controlnet.args[1].weight"
    assert error.message.startswith("alwayson_scripts.controlnet.args[1].weight:") and "got 3" in error.message


@pytest.mark.parametrize(
    ("sent", "field", "words"),
    [
        ({"control_mode": "loud"}, "control_mode", "unknown control mode"),
        ({"resize_mode": 7}, "resize_mode", "unknown resize mode"),
        ({"guidance_start": 0.8, "guidance_end": 0.2}, "guidance_start", "after guidance_end"),
        ({"module": "openpose"}, "module", "needs a model file"),
        ({"input_image": "not base64!"}, "input_image", "base64"),
        ({"enabled": "maybe"}, "enabled", "true or false"),
    ],
)
def test_bad_values_are_named(sent: dict[str, Any], field: str, words: str) -> None:
    error = refusal({"model": "m", **sent})
    assert error.field == f"alwayson_scripts.controlnet.args[0].{field}"
    assert words in error.message


def test_input_image_pixel_limit_is_checked_before_decoding() -> None:
    with pytest.raises(InvalidRequest, match="over the limit") as caught:
        units({"model": "m", "image": b64((64, 64))}, limits=Limits(max_input_pixels=100))
    assert caught.value.field == "alwayson_scripts.controlnet.args[0].image"


def test_no_controlnet_script_is_no_units_and_a_malformed_one_is_refused() -> None:
    assert units_from_alwayson_scripts(None) == []
    assert units_from_alwayson_scripts({"ADetailer": {"args": []}}) == []
    with pytest.raises(InvalidRequest) as caught:
        units_from_alwayson_scripts({"controlnet": {"args": "canny"}})
    assert caught.value.field == "alwayson_scripts.controlnet.args"
    with pytest.raises(InvalidRequest, match="over the limit"):
        units(*[{"model": "m"}] * (MAX_UNITS + 1))


def test_model_name_drops_the_hash() -> None:
    assert model_name("control_v11p_sd15_canny [d14c016b]") == "control_v11p_sd15_canny"
    assert model_name("my [style] net") == "my [style] net"
