"""Reading a POST body's fields the same way whether it is a form, multipart or JSON, and the route
class that makes FastAPI's own body parsing read JSON the same guarded way."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.datastructures import UploadFile

from sdserver import safejson
from sdserver.core.errors import InvalidRequest


def parse_json(body: bytes) -> Any:
    """A JSON body, nesting bounded (safejson); any problem is a 400 naming the body."""
    try:
        return safejson.loads(body)
    except ValueError as exc:
        raise InvalidRequest(f"body: {exc}", field="body") from None


async def read_json(request: Request) -> dict[str, Any]:
    """The body as a JSON object (an empty body is an empty object)."""
    body = await request.body()
    if not body.strip():
        return {}
    data = parse_json(body)
    if not isinstance(data, dict):
        raise InvalidRequest(f"body: expected a JSON object, got {type(data).__name__}", field="body")
    return data


async def read_fields(request: Request) -> dict[str, Any]:
    """Return the body's fields; uploaded files become bytes. An empty body is no fields."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json" or content_type.endswith("+json"):
        return await read_json(request)
    try:
        form = await request.form()
    except Exception as exc:  # malformed multipart
        raise InvalidRequest(f"body: could not parse form data ({exc})", field="body") from None
    fields: dict[str, Any] = {}
    for key, value in form.multi_items():
        fields[key] = await value.read() if isinstance(value, UploadFile) else value
    return fields


class GuardedRequest(Request):
    """`await request.json()` through `parse_json`: what FastAPI calls to read a JSON body model."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json(await self.body())
        return self._json


class GuardedRoute(APIRoute):
    """Every router's route class (`APIRouter(route_class=GuardedRoute)`): JSON bodies are read with
    bounded nesting, and a problem is a 400 that names the body (FastAPI keeps it as the cause)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            return await handler(GuardedRequest(request.scope, request.receive))

        return guarded
