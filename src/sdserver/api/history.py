"""The history of kept images (`/v1/history`): list with filters and paging, read, fetch the file, delete."""

from __future__ import annotations

import io
import re
from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse, Response
from PIL import Image
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from sdserver.api.deps import HistoryDep, OwnerDep
from sdserver.api.fields import GuardedRoute
from sdserver.core.errors import InvalidRequest
from sdserver.service import history as service

router = APIRouter(prefix="/v1", tags=["history"], route_class=GuardedRoute)
_DATE_ONLY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_IMMUTABLE = {"Cache-Control": "private, max-age=31536000, immutable"}  # an id's image never changes


class HistoryItemOut(BaseModel):
    id: str
    created_at: float = Field(description="Unix seconds")
    job_id: str | None
    owner: str | None = Field(description="The API key that made it; null when made without auth")
    model: str
    task: str
    prompt: str
    negative_prompt: str
    seed: int
    width: int
    height: int
    nsfw: bool
    bytes: int
    parameters: dict[str, Any] = Field(description="The PNG's parameters (as in POST /png-info's parameters_json)")
    image_url: str = Field(description="The PNG, with its parameters; ?size=N gives a WebP thumbnail")


class HistoryPageOut(BaseModel):
    items: list[HistoryItemOut]
    total: int = Field(description="Items matching the filters, over all pages")
    limit: int
    offset: int
    enabled: bool = Field(description="False when the server keeps nothing (--history off)")


def _item(entry: service.Entry) -> HistoryItemOut:
    fields = {name: getattr(entry, name) for name in HistoryItemOut.model_fields if hasattr(entry, name)}
    return HistoryItemOut(**fields, image_url=f"/v1/history/{entry.id}/image")


def _instant(value: str | None, name: str, *, end_of_day: bool = False) -> float | None:
    """ISO 8601 date or date-time (local time unless it says otherwise), or Unix seconds.

    A date alone is its midnight; as the end of a range, the whole day is included."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        if re.fullmatch(r"-?\d+(\.\d+)?", text):
            return float(text)
        moment = datetime.fromisoformat(text)
    except ValueError:
        reason = "must be an ISO 8601 date (2026-11-30), date-time (2026-11-30T14:00:00) or Unix seconds"
        raise InvalidRequest(f"{name}: {reason}, got {value!r}", field=name) from None
    if end_of_day and _DATE_ONLY.match(text):
        moment += timedelta(days=1)
    return moment.timestamp()


@router.get("/history", response_model=HistoryPageOut)
async def list_history(
    history: HistoryDep,
    owner: OwnerDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
    model: Annotated[str | None, Query(max_length=200, description="Only this model's images")] = None,
    prompt: Annotated[str | None, Query(max_length=1000, description="Text in the prompt (any case)")] = None,
    since: Annotated[str | None, Query(description="Made at or after: ISO 8601 date or time, or Unix s")] = None,
    until: Annotated[str | None, Query(description="Made before (a date alone: up to its end)")] = None,
) -> HistoryPageOut:
    """Kept images, newest first, with their parameters."""
    query = service.Query(
        model=model or None,
        text=prompt or None,
        since=_instant(since, "since"),
        until=_instant(until, "until", end_of_day=True),
        owner=owner,
        limit=limit,
        offset=offset,
    )
    page = await run_in_threadpool(history.list, query)
    items = [_item(entry) for entry in page.entries]
    return HistoryPageOut(items=items, total=page.total, limit=limit, offset=offset, enabled=history.enabled)


@router.get("/history/{item_id}", response_model=HistoryItemOut)
async def get_history_item(item_id: str, history: HistoryDep, owner: OwnerDep) -> HistoryItemOut:
    """One kept image's record and parameters."""
    return _item(await run_in_threadpool(history.get, item_id, owner=owner))


@router.get("/history/{item_id}/image", response_class=Response)
async def get_history_image(
    item_id: str,
    history: HistoryDep,
    owner: OwnerDep,
    size: Annotated[int | None, Query(ge=16, le=2048, description="A WebP thumbnail at most this wide/high")] = None,
) -> Response:
    """The PNG as saved (with its parameters), or a WebP thumbnail with `size`."""
    entry = await run_in_threadpool(history.get, item_id, owner=owner)
    path = await run_in_threadpool(history.path, entry)
    if size is None:
        return FileResponse(
            path, media_type="image/png", filename=path.name, content_disposition_type="inline", headers=_IMMUTABLE
        )
    return Response(await run_in_threadpool(_thumbnail, path, size), media_type="image/webp", headers=_IMMUTABLE)


def _thumbnail(path: Any, size: int) -> bytes:
    with Image.open(path) as image:
        image.thumbnail((size, size), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="WEBP", quality=85)
    return buffer.getvalue()


@router.delete("/history/{item_id}", response_model=HistoryItemOut)
async def delete_history_item(item_id: str, history: HistoryDep, owner: OwnerDep) -> HistoryItemOut:
    """Delete a kept image: its record and its file."""
    return _item(await run_in_threadpool(history.delete, item_id, owner=owner))
