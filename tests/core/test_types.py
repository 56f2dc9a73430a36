"""Validation of the protocol-independent generation request (`sdserver.core.types`)."""

from __future__ import annotations

import base64
import io
import secrets
from typing import Any

import pytest
from PIL import Image
from pydantic import ValidationError

from sdserver.core.errors import InvalidRequest
from sdserver.core.types import MAX_SEED, GenerationRequest, Limits, Task, validate_request

# The original API's names for two core fields, as a protocol adapter passes them.
CLIENT_NAMES = {"num_images": "num_outputs", "steps": "num_inference_steps"}
PROMPT = "a lighthouse at dusk"


def rejection(
    data: dict[str, Any], *, names: dict[str, str] | None = None, limits: Limits | None = None
) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        validate_request(data, names=names, limits=limits)
    return info.value


def picture(size: tuple[int, int] = (16, 8), color: tuple[int, int, int] = (10, 120, 230)) -> Image.Image:
    return Image.new("RGB", size, color)


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def img2img(**fields: Any) -> dict[str, Any]:
    return {"prompt": PROMPT, "task": "img2img", "init_image": picture(), **fields}


def inpaint(**fields: Any) -> dict[str, Any]:
    return {"prompt": PROMPT, "task": "inpaint", "init_image": picture(), "mask_image": picture(), **fields}


# --- defaults and messages -------------------------------------------------------------------------


def test_a_prompt_alone_is_a_valid_txt2img_request_with_defaults() -> None:
    request = validate_request({"prompt": PROMPT})

    assert request.task is Task.TXT2IMG
    assert request.prompt == PROMPT
    assert request.num_images == 1
    assert request.seed is None
    assert request.steps is None and request.guidance_scale is None  # the model's own (engine.prepare)
    assert request.width is None and request.height is None
    assert request.init_image is None and request.mask_image is None


def test_a_missing_prompt_is_rejected_naming_the_prompt() -> None:
    error = rejection({})

    assert error.field == "prompt"
    assert error.message.startswith("prompt: ")
    assert "required" in error.message


def test_an_empty_prompt_is_rejected_showing_the_empty_value() -> None:
    error = rejection({"prompt": ""})

    assert error.field == "prompt"
    assert error.message.startswith("prompt: ")
    assert "''" in error.message


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("width", 65),
        ("height", 100),
        ("width", 0),
        ("height", -8),
        ("steps", 0),
        ("guidance_scale", float("nan")),
        ("guidance_scale", float("inf")),
        ("guidance_scale", float("-inf")),
        ("guidance_scale", "nan"),
        ("guidance_scale", "inf"),
        ("eta", 2.0),
        ("seed", -1),
        ("seed", MAX_SEED + 1),
        ("strength", 1.5),
        ("strength", -0.1),
        ("num_images", 0),
        ("num_images", "many"),
    ],
)
def test_a_bad_value_is_rejected_with_a_message_naming_the_field_and_the_value(field: str, value: Any) -> None:
    error = rejection({"prompt": PROMPT, field: value})

    assert error.field == field
    assert error.message.startswith(f"{field}: ")
    assert f"got {value!r}" in error.message
    assert str(error) == error.message


@pytest.mark.parametrize(
    ("field", "value", "client_name"),
    [("num_images", 0, "num_outputs"), ("num_images", 9, "num_outputs"), ("steps", 0, "num_inference_steps")],
)
def test_messages_use_the_clients_own_field_name(field: str, value: int, client_name: str) -> None:
    error = rejection({"prompt": PROMPT, field: value}, names=CLIENT_NAMES)

    assert error.field == client_name
    assert error.message.startswith(f"{client_name}: ")
    assert f"{field}:" not in error.message.removeprefix(f"{client_name}:")
    assert f"got {value!r}" in error.message


def test_fields_the_names_mapping_does_not_mention_keep_their_own_name() -> None:
    error = rejection({"prompt": PROMPT, "width": 65}, names=CLIENT_NAMES)

    assert error.field == "width"
    assert error.message == "width: must be a multiple of 8, got 65"


def test_an_unknown_field_is_rejected_by_name() -> None:
    error = rejection({"prompt": PROMPT, "hires_fix": "euler"})  # (sampler became a real field in issue 5)

    assert error.field == "hires_fix"
    assert "'euler'" in error.message


def test_an_unknown_task_is_rejected() -> None:
    error = rejection({"prompt": PROMPT, "task": "outpaint"})  # (upscale is a task now)

    assert error.field == "task"
    assert "'outpaint'" in error.message


# --- width and height ------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["width", "height"])
@pytest.mark.parametrize("value", [12, 65, 100, 516])
def test_sides_must_be_multiples_of_8(field: str, value: int) -> None:
    error = rejection({"prompt": PROMPT, field: value})

    assert error.message == f"{field}: must be a multiple of 8, got {value}"


@pytest.mark.parametrize("field", ["width", "height"])
@pytest.mark.parametrize("value", [0, -8, -64])
def test_sides_must_be_positive(field: str, value: int) -> None:
    error = rejection({"prompt": PROMPT, field: value})

    assert error.field == field
    assert f"got {value}" in error.message


@pytest.mark.parametrize("field", ["width", "height"])
@pytest.mark.parametrize("value", [8, 64, 512, 2048])
def test_positive_multiples_of_8_up_to_the_side_limit_are_accepted(field: str, value: int) -> None:
    request = validate_request({"prompt": PROMPT, field: value})

    assert getattr(request, field) == value


# --- strength, guidance, seed ----------------------------------------------------------------------


@pytest.mark.parametrize("strength", [0.02, 0.5, 1.0])
def test_img2img_accepts_strength_above_0_up_to_1(strength: float) -> None:
    assert validate_request(img2img(strength=strength, steps=50)).strength == strength


@pytest.mark.parametrize("make", [img2img, inpaint])
@pytest.mark.parametrize(("strength", "steps"), [(0, 50), (0.01, 50), (0.3, 3)])
def test_img2img_and_inpaint_reject_a_strength_that_leaves_no_step(make: Any, strength: float, steps: int) -> None:
    """img2img denoises int(steps * strength) steps: zero steps would return the input unchanged."""
    error = rejection(make(strength=strength, steps=steps))

    assert error.field == "strength"
    assert f"steps {steps} gives no denoising step" in error.message
    assert f"got {float(strength)}" in error.message


def test_txt2img_ignores_a_strength_of_0() -> None:
    assert validate_request({"prompt": PROMPT, "strength": 0}).strength == 0.0


@pytest.mark.parametrize("guidance", [0.0, 1.0, 7.5, 30.0])  # 30: the default max_guidance
def test_finite_guidance_in_range_is_accepted(guidance: float) -> None:
    assert validate_request({"prompt": PROMPT, "guidance_scale": guidance}).guidance_scale == guidance


@pytest.mark.parametrize("seed", [0, 1, 2**32, MAX_SEED])
def test_any_seed_from_0_to_max_seed_is_accepted(seed: int) -> None:
    assert validate_request({"prompt": PROMPT, "seed": seed}).seed == seed


# --- required images -------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["img2img", "inpaint"])
def test_img2img_and_inpaint_require_an_init_image(task: str) -> None:
    error = rejection({"prompt": PROMPT, "task": task, "mask_image": picture()})

    assert error.field == "init_image"
    assert error.message == f"init_image: is required for {task}"


def test_inpaint_requires_a_mask_image() -> None:
    error = rejection({"prompt": PROMPT, "task": "inpaint", "init_image": picture()})

    assert error.field == "mask_image"
    assert error.message == "mask_image: is required for inpaint"


def test_img2img_does_not_require_a_mask_image() -> None:
    assert validate_request(img2img()).mask_image is None


def test_an_empty_mask_field_counts_as_a_missing_mask() -> None:
    error = rejection(inpaint(mask_image=""))

    assert error.field == "mask_image"


def test_the_image_field_names_are_mapped_too() -> None:
    error = rejection({"prompt": PROMPT, "task": "img2img"}, names={"init_image": "image"})

    assert error.field == "image"
    assert error.message == "image: is required for img2img"


# --- limits ----------------------------------------------------------------------------------------


def test_max_images_caps_the_number_of_images() -> None:
    limits = Limits(max_images=2)

    assert validate_request({"prompt": PROMPT, "num_images": 2}, limits=limits).num_images == 2
    error = rejection({"prompt": PROMPT, "num_images": 3}, names=CLIENT_NAMES, limits=limits)
    assert error.field == "num_outputs"
    assert error.message == "num_outputs: is over the limit of 2, got 3"


def test_max_steps_caps_the_number_of_steps() -> None:
    limits = Limits(max_steps=10)

    assert validate_request({"prompt": PROMPT, "steps": 10}, limits=limits).steps == 10
    error = rejection({"prompt": PROMPT, "steps": 11}, names=CLIENT_NAMES, limits=limits)
    assert error.message == "num_inference_steps: is over the limit of 10, got 11"


@pytest.mark.parametrize("field", ["width", "height"])
def test_max_side_caps_each_side(field: str) -> None:
    limits = Limits(max_side=64)

    assert getattr(validate_request({"prompt": PROMPT, field: 64}, limits=limits), field) == 64
    error = rejection({"prompt": PROMPT, field: 72}, limits=limits)
    assert error.message == f"{field}: is over the limit of 64, got 72"


def test_max_pixels_caps_width_times_height() -> None:
    limits = Limits(max_pixels=64 * 64)

    assert validate_request({"prompt": PROMPT, "width": 64, "height": 64}, limits=limits).width == 64
    error = rejection({"prompt": PROMPT, "width": 64, "height": 72}, limits=limits)
    assert error.field == "width"
    assert "height 72" in error.message
    assert str(64 * 64) in error.message


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_max_prompt_chars_caps_both_prompts_without_echoing_them(field: str) -> None:
    limits = Limits(max_prompt_chars=5)

    assert validate_request({"prompt": "abcde", field: "abcde"}, limits=limits)
    error = rejection({"prompt": "abc", field: "abcdef"}, limits=limits)
    assert error.field == field
    assert error.message == f"{field}: is 6 characters, over the limit of 5"


def test_the_default_limits_apply_when_none_are_given() -> None:
    defaults = Limits()

    assert validate_request({"prompt": PROMPT, "steps": defaults.max_steps}).steps == defaults.max_steps
    assert rejection({"prompt": PROMPT, "steps": defaults.max_steps + 1}).field == "steps"
    assert rejection({"prompt": PROMPT, "num_images": defaults.max_images + 1}).field == "num_images"
    assert rejection({"prompt": "x" * (defaults.max_prompt_chars + 1)}).field == "prompt"
    assert rejection({"prompt": PROMPT, "width": defaults.max_side + 8}).field == "width"


@pytest.mark.parametrize(
    "bad", [{"max_images": 0}, {"max_steps": 0}, {"max_side": 4}, {"max_pixels": 10}, {"max_prompt_chars": 0}]
)
def test_limits_themselves_must_be_sensible(bad: dict[str, int]) -> None:
    with pytest.raises(ValidationError):
        Limits(**bad)


# --- form values -----------------------------------------------------------------------------------


def test_numbers_sent_as_form_strings_are_coerced() -> None:
    request = validate_request(
        {
            "prompt": PROMPT,
            "width": "64",
            "height": "128",
            "num_images": "2",
            "steps": " 20 ",
            "seed": "5",
            "guidance_scale": "7.5",
            "eta": "0.25",
        }
    )

    assert (request.width, request.height, request.num_images, request.steps) == (64, 128, 2, 20)
    assert request.seed == 5
    assert request.guidance_scale == 7.5
    assert request.eta == 0.25


def test_the_task_may_be_given_as_a_string() -> None:
    assert validate_request(img2img(task="img2img")).task is Task.IMG2IMG


def test_requests_are_immutable() -> None:
    request = validate_request({"prompt": PROMPT})

    with pytest.raises(ValidationError):
        request.prompt = "something else"


# --- seeds -----------------------------------------------------------------------------------------


def test_with_seed_keeps_a_seed_the_client_gave() -> None:
    request = validate_request({"prompt": PROMPT, "seed": 42, "num_images": 3})

    assert request.with_seed() is request
    assert request.seeds == [42, 43, 44]


def test_seed_0_is_a_real_seed_and_kept() -> None:
    request = validate_request({"prompt": PROMPT, "seed": 0}).with_seed()

    assert request.seed == 0
    assert request.seeds == [0]


def test_with_seed_picks_a_seed_only_when_none_was_given() -> None:
    request = validate_request({"prompt": PROMPT, "num_images": 4})

    seeded = request.with_seed()

    assert request.seed is None  # the original is unchanged
    assert seeded.seed is not None
    assert seeded.seeds == [seeded.seed + i for i in range(4)]
    assert seeded.with_seed() is seeded
    assert seeded.model_dump(exclude={"seed"}) == request.model_dump(exclude={"seed"})


@pytest.mark.parametrize("pick", ["lowest", "highest"])
def test_picked_seeds_stay_between_1_and_2_to_the_32(monkeypatch: pytest.MonkeyPatch, pick: str) -> None:
    monkeypatch.setattr(secrets, "randbelow", lambda n: 0 if pick == "lowest" else n - 1)
    request = validate_request({"prompt": PROMPT, "num_images": 8}).with_seed()

    assert request.seeds[0] >= 1
    assert request.seeds[-1] < 2**32


def test_seeds_are_unknown_before_with_seed() -> None:
    request = validate_request({"prompt": PROMPT})

    with pytest.raises(RuntimeError, match="with_seed"):
        _ = request.seeds


def test_every_reported_seed_can_be_sent_back_to_reproduce_its_image() -> None:
    try:
        request = validate_request({"prompt": PROMPT, "seed": MAX_SEED, "num_images": 2})
    except InvalidRequest:
        return  # rejecting the request up front is a fine fix too
    for seed in request.seeds:
        assert validate_request({"prompt": PROMPT, "seed": seed}).seed == seed


# --- image fields ----------------------------------------------------------------------------------


def _as_base64(image: Image.Image) -> str:
    return base64.b64encode(png_bytes(image)).decode("ascii")


IMAGE_FORMS: dict[str, Any] = {
    "base64": _as_base64,
    "data URL": lambda image: "data:image/png;base64," + _as_base64(image),
    "raw bytes": png_bytes,
    "PIL image": lambda image: image,
}


@pytest.mark.parametrize("form", IMAGE_FORMS)
@pytest.mark.parametrize("field", ["init_image", "mask_image"])
def test_image_fields_accept_base64_data_urls_bytes_and_pil_images(field: str, form: str) -> None:
    source = picture((24, 16), (200, 40, 90))

    request = validate_request(inpaint(**{field: IMAGE_FORMS[form](source)}))

    image = getattr(request, field)
    assert isinstance(image, Image.Image)
    assert image.size == (24, 16)
    assert image.convert("RGB").getpixel((3, 3)) == (200, 40, 90)


def test_decoded_images_are_rgb() -> None:
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))

    request = validate_request(img2img(init_image=_as_base64(rgba)))

    assert request.init_image.mode == "RGB"
    assert request.init_image.getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("empty", ["", b""])
def test_an_empty_image_field_means_not_given(empty: str | bytes) -> None:
    request = validate_request({"prompt": PROMPT, "init_image": empty, "mask_image": empty})

    assert request.init_image is None
    assert request.mask_image is None


def test_invalid_base64_is_rejected_naming_the_image_field() -> None:
    error = rejection(img2img(init_image="this is not an image!"), names={"init_image": "image"})

    assert error.field == "image"
    assert error.message.startswith("image: not valid base64")


def test_a_long_bad_image_value_is_shortened_in_the_message() -> None:
    error = rejection(img2img(init_image="!" * 500))

    assert error.message.startswith("init_image: ")
    assert len(error.message) < 200
    assert error.message.endswith("...")


def test_an_image_of_an_unsupported_format_is_rejected() -> None:
    gif = base64.b64encode(png_bytes(picture(), "GIF")).decode()

    error = rejection(img2img(init_image=gif))

    assert error.field == "init_image"
    assert "not a PNG, JPEG or WebP" in error.message


def test_an_image_field_of_another_type_is_rejected() -> None:
    error = rejection(img2img(init_image=12))

    assert error.field == "init_image"
    assert error.message == "init_image: expected a base64-encoded image, got 12"


def test_the_request_class_can_be_built_directly() -> None:
    request = GenerationRequest(prompt=PROMPT, num_images=2, seed=7)

    assert request.seeds == [7, 8]


def test_max_guidance_caps_guidance_scale() -> None:
    limits = Limits(max_guidance=10)

    assert validate_request({"prompt": PROMPT, "guidance_scale": 10}, limits=limits).guidance_scale == 10
    error = rejection({"prompt": PROMPT, "guidance_scale": 12.5}, limits=limits)
    assert error.field == "guidance_scale"
    assert "over the limit of 10" in error.message and "12.5" in error.message
