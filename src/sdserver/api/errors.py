"""Errors to HTTP, in one place: the status of each error type, and each protocol's error shape."""

from __future__ import annotations

import logging
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from sdserver.core import errors as e

log = logging.getLogger(__name__)

STATUS: dict[type[e.SDServerError], int] = {
    e.InvalidRequest: 400,
    e.PayloadTooLarge: 413,
    e.IdempotencyKeyReused: 422,
    e.Unauthorized: 401,
    e.Forbidden: 403,
    e.NotFound: 404,
    e.Overloaded: 429,
    e.Cancelled: 499,  # the client went away or asked to stop (nginx's convention)
    e.OutOfMemory: 503,
    e.Unavailable: 503,
    e.ModelLoadError: 503,
    e.Timeout: 504,
    e.GenerationError: 500,
    e.ConfigError: 500,
    e.StorageError: 500,
}

Renderer = Callable[[e.SDServerError, int], Response]
_renderers: dict[str, Renderer] = {}


def status_for(error: e.SDServerError) -> int:
    for cls in type(error).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def register_renderer(path_prefix: str, renderer: Renderer) -> None:
    """A protocol renders errors under its path prefix in its own shape (longest prefix wins)."""
    _renderers[path_prefix] = renderer


def render_original(error: e.SDServerError, status: int) -> Response:
    """The original server's failure body; the default for paths no other protocol claims."""
    return JSONResponse({"status": "failure", "message": error.message}, status_code=status)


def render_v1(error: e.SDServerError, status: int) -> Response:
    """The `/v1` APIs' error shape (OpenAI's): {"error": {"message", "type", "param", "code"}}."""
    body = {"message": error.message, "type": type(error).__name__, "param": error.field, "code": status}
    return JSONResponse({"error": body}, status_code=status)


def render(request: Request, error: e.SDServerError, status: int | None = None) -> Response:
    status = status or status_for(error)
    prefixes = sorted((p for p in _renderers if request.url.path.startswith(p)), key=len, reverse=True)
    renderer = _renderers[prefixes[0]] if prefixes else render_original
    response = renderer(error, status)
    if isinstance(error, e.Overloaded):
        response.headers["Retry-After"] = str(error.retry_after_s)
    return response


def install(app: FastAPI) -> None:
    async def on_sdserver_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, e.SDServerError)
        return render(request, exc)

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(part) for part in first["loc"] if part not in ("body", "query", "path"))
        message = f"{where}: {first['msg']}" if where else str(first["msg"])
        return render(request, e.InvalidRequest(message, field=where or None))

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if isinstance(exc.__cause__, e.SDServerError):  # FastAPI's "error parsing the body", from ours
            return render(request, exc.__cause__)
        error_type: type[e.SDServerError] = e.NotFound if exc.status_code == 404 else e.InvalidRequest
        detail = exc.detail if exc.status_code != 404 else f"no route {request.method} {request.url.path}"
        response = render(request, error_type(str(detail)), exc.status_code)
        response.headers.update(exc.headers or {})
        return response

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return render(request, e.GenerationError(f"internal error: {type(exc).__name__}"), 500)

    app.add_exception_handler(e.SDServerError, on_sdserver_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
