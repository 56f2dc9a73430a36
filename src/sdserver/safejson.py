"""JSON from untrusted text with bounded nesting.

`json.loads` recurses once per level: thousands of `[` raise RecursionError, and values a few hundred
levels deep parse but then fail wherever they are serialised again. Every JSON the server reads from
a client (request bodies, metadata inside uploaded PNGs) goes through `loads`, which refuses both with
a ValueError that says why.
"""

from __future__ import annotations

import json
from typing import Any

MAX_DEPTH = 64  # far deeper than any real request (A1111's alwayson_scripts nest about 6)


def loads(text: str | bytes, max_depth: int = MAX_DEPTH) -> Any:
    """Parse `text`; ValueError if it is not JSON or nests deeper than `max_depth` levels."""
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError(f"JSON nested deeper than {max_depth} levels") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
    except ValueError as exc:  # NaN, Infinity
        raise ValueError(str(exc)) from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"not valid JSON (not UTF-8: {exc.reason})") from None
    if _depth_over(value, max_depth):
        raise ValueError(f"JSON nested deeper than {max_depth} levels")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"not valid JSON ({name} is not a JSON number)")


def _depth_over(value: Any, max_depth: int) -> bool:
    """Iterative (a recursive walk would hit the same recursion limit), visiting containers only."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        for child in children:
            if isinstance(child, dict | list):
                if depth + 1 > max_depth:
                    return True
                stack.append((child, depth + 1))
    return False
