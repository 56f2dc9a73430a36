"""Serving the studio: the page at `/` and its files under `/studio/`, open without an API key (the page
asks for the key and sends it with every API call). Nothing is loaded from elsewhere."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"
PREFIX = "/studio"
# The page may talk to this server only: no CDN, no fonts, no analytics, even by mistake.
CSP = (
    "default-src 'self'; img-src 'self' data: blob:; connect-src 'self'; style-src 'self'; script-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)

router = APIRouter(include_in_schema=False)


@router.get("/")
async def studio() -> FileResponse:
    """The studio page."""
    return FileResponse(STATIC / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})


def install(app: FastAPI) -> None:
    """The page (its Content-Security-Policy is sent by api.middleware.PagePolicy) and its files."""
    app.include_router(router)
    app.mount(PREFIX, StaticFiles(directory=STATIC), name="studio")
