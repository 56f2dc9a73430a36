"""Routes of the AUTOMATIC1111 API (to be written)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from sdserver.core.errors import SDServerError

router = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111 API"])


def render_error(error: SDServerError, status: int) -> Response:
    """AUTOMATIC1111's error shape."""
    return JSONResponse(
        {"error": type(error).__name__, "detail": error.message, "errors": error.message}, status_code=status
    )
