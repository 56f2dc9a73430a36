"""JSON from clients (`sdserver.safejson`): bounded nesting, no RecursionError, no NaN."""

from __future__ import annotations

import pytest

from sdserver.safejson import MAX_DEPTH, loads


def nested(depth: int, opening: str = "[", closing: str = "]") -> str:
    return opening * depth + closing * depth


@pytest.mark.parametrize(
    "text",
    [
        nested(5000),  # past Python's recursion limit: json.loads raises RecursionError
        nested(MAX_DEPTH + 1),  # parses, but would fail where it is serialised again
        '{"a":' * 3000 + "1" + "}" * 3000,
        '{"a": [' + nested(200, '{"b": ', "}").replace("}", "1}", 1) + "]}",
    ],
    ids=["5000 lists", "one level too deep", "3000 objects", "deep inside a field"],
)
def test_deep_nesting_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError, match="nested deeper"):
        loads(text)


def test_nesting_up_to_the_limit_parses() -> None:
    assert loads(nested(MAX_DEPTH))
    assert loads('{"a": {"b": [1, 2, {"c": null}]}}') == {"a": {"b": [1, 2, {"c": None}]}}


@pytest.mark.parametrize("text", ["[NaN]", '{"x": Infinity}', "-Infinity", "{oops", b"\xff\xfe", ""])
def test_what_is_not_json_is_a_value_error(text: str | bytes) -> None:
    with pytest.raises(ValueError, match="not valid JSON"):
        loads(text)
