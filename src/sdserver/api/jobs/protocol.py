"""Shapes of the jobs API, and the mapping from a Job to them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, Field, HttpUrl, ValidationError

from sdserver.core.errors import InvalidRequest, SDServerError
from sdserver.core.types import GenerationRequest, Limits, validate_request
from sdserver.imaging import png_base64
from sdserver.service.jobs import Job


class JobOptions(BaseModel):
    """Fields of a job submission that are about the job, not the picture."""

    preview_every: int = Field(default=0, ge=0, description="Send a low-resolution preview every N steps (0: none)")
    webhook_url: HttpUrl | None = Field(default=None, description="POSTed the finished job (needs --allow-webhooks)")
    save: bool = Field(default=True, description="Keep the images in the server's history (unless --history off)")


def request_body_schema() -> dict[str, Any]:
    """The submission's JSON schema: the core GenerationRequest plus JobOptions (for /docs)."""
    schema = GenerationRequest.model_json_schema()
    options = JobOptions.model_json_schema()
    schema["properties"].update(options["properties"])
    for name in ("init_image", "mask_image"):
        schema["properties"][name] = {"type": "string", "description": "base64 PNG/JPEG/WebP, data URL allowed"}
    schema["properties"]["task"]["default"] = "txt2img"
    schema.setdefault("example", {"prompt": "a red circle on a blue background", "steps": 20, "seed": 42})
    return schema


def parse_submission(body: Mapping[str, Any], limits: Limits) -> tuple[GenerationRequest, JobOptions]:
    option_names = set(JobOptions.model_fields)
    try:
        options = JobOptions(**{k: v for k, v in body.items() if k in option_names})
    except ValidationError as exc:
        error = exc.errors()[0]
        name = str(error["loc"][0])
        raise InvalidRequest(f"{name}: {error['msg']}, got {error.get('input')!r}", field=name) from None
    generation = validate_request({k: v for k, v in body.items() if k not in option_names}, limits=limits)
    return generation, options


class ProgressOut(BaseModel):
    step: int
    total: int
    percent: float
    eta_s: float | None = Field(description="Seconds left, extrapolated from the steps so far")


class ImageOut(BaseModel):
    base64: str
    seed: int
    nsfw: bool
    mime_type: str = "image/png"
    history_id: str | None = Field(default=None, description="Its id in /v1/history once saved; null until then")


class ErrorOut(BaseModel):
    type: str
    message: str


class Timings(BaseModel):
    queued_s: float | None = None
    running_s: float | None = None


class JobOut(BaseModel):
    id: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    model: str | None
    task: str
    width: int | None = Field(default=None, description="The size used (absent in the request: the model's native)")
    height: int | None = None
    steps: int | None = Field(default=None, description="The steps used (absent in the request: the model's default)")
    queue_position: int | None = Field(description="0 is next; null once it left the queue")
    progress: ProgressOut | None = None
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    timings: Timings
    images: list[ImageOut] | None = None
    error: ErrorOut | None = None
    warnings: list[str] = Field(default_factory=list, description="Problems that did not fail it (e.g. not saved)")


class JobCreated(BaseModel):
    id: str
    status: str
    queue_position: int | None


class QueueOut(BaseModel):
    queued: int
    running: int
    jobs: list[JobOut]


def error_out(error: SDServerError) -> ErrorOut:
    return ErrorOut(type=type(error).__name__, message=error.message)


def progress_out(job: Job) -> ProgressOut | None:
    if job.progress is None:
        return None
    step, total = job.progress.step, job.progress.total
    return ProgressOut(step=step, total=total, percent=round(100 * step / max(total, 1), 1), eta_s=job.eta_s)


def job_out(job: Job, queue_position: int | None, *, with_images: bool = True) -> JobOut:
    started = job.started_at
    images = None
    if with_images and job.result is not None:
        saved = job.history_ids or []
        images = [
            ImageOut(
                base64=png_base64(image.image),
                seed=image.seed,
                nsfw=image.nsfw,
                history_id=saved[index] if index < len(saved) else None,
            )
            for index, image in enumerate(job.result.images)
        ]
    return JobOut(
        id=job.id,
        status=job.status.value,
        model=job.request.model,
        task=job.request.task.value,
        width=job.request.width,
        height=job.request.height,
        steps=job.request.steps,
        queue_position=queue_position,
        progress=progress_out(job),
        created_at=job.created_at,
        started_at=started,
        finished_at=job.finished_at,
        timings=Timings(
            queued_s=None if started is None else round(started - job.created_at, 4),
            running_s=None if started is None or job.finished_at is None else round(job.finished_at - started, 4),
        ),
        images=images,
        error=None if job.error is None else error_out(job.error),
        warnings=list(job.warnings),
    )
