"""Reading a POST body's fields the same way whether it is a form, multipart or JSON."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from starlette.datastructures import UploadFile

from sdserver.core.errors import InvalidRequest


async def read_json(request: Request) -> dict[str, Any]:
    """The body as a JSON object (an empty body is an empty object)."""
    body = await request.body()
    if not body.strip():
        return {}
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"body: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InvalidRequest(f"body: expected a JSON object, got {type(data).__name__}")
    return data


async def read_fields(request: Request) -> dict[str, Any]:
    """Return the body's fields; uploaded files become bytes. An empty body is no fields."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json" or content_type.endswith("+json"):
        return await read_json(request)
    try:
        form = await request.form()
    except Exception as exc:  # malformed multipart
        raise InvalidRequest(f"body: could not parse form data ({exc})") from None
    fields: dict[str, Any] = {}
    for key, value in form.multi_items():
        fields[key] = await value.read() if isinstance(value, UploadFile) else value
    return fields
