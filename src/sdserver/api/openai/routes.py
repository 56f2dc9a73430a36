"""Routes of the OpenAI Images API (to be written)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/v1", tags=["OpenAI Images API"])
