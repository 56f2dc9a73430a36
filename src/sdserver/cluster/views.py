"""What travels between the ingresses, the engine replicas and the job board: plain, picklable data.

No Ray here: the board's logic and these conversions are tested in-process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from PIL import Image

from sdserver.core.errors import SDServerError
from sdserver.core.types import GenerationRequest, GenerationResult, Progress
from sdserver.service.jobs import Job, JobStatus


@dataclass(frozen=True)
class Work:
    """One request on its way from an ingress to an engine replica."""

    job_id: str
    request: GenerationRequest  # seeded, its model named
    preview_every: int = 0


@dataclass
class JobView:
    """A job as the board knows it, for an ingress to show (its images only once it is done)."""

    id: str
    status: JobStatus
    request: GenerationRequest  # without its input images
    owner: str | None
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    progress: Progress | None = None
    preview: Image.Image | None = None
    preview_seq: int = 0  # changes with each new preview, so streams send each one once
    result: GenerationResult | None = None
    error: SDServerError | None = None
    warnings: list[str] = field(default_factory=list)
    history_ids: list[str | None] | None = None
    queue_position: int | None = None
    replica: str | None = None  # the engine replica that has it
    version: int = 0  # the board's count of its changes: an older view never undoes a newer one

    @property
    def done(self) -> bool:
        return self.status.finished


@dataclass(frozen=True)
class Update:
    """A job's state on the engine replica running it, sent to the board (coalesced: the latest)."""

    job_id: str
    status: JobStatus
    started_at: float | None = None  # on the replica's clock
    finished_at: float | None = None
    progress: Progress | None = None
    preview: Image.Image | None = None  # only when it is new
    result: GenerationResult | None = None
    error: SDServerError | None = None
    request: GenerationRequest | None = None  # as the replica prepared it (the model's size, steps...)


@dataclass
class Member:
    """A heartbeat: one engine replica's or ingress's state, for /v1/cluster, /ready and /metrics."""

    id: str
    kind: Literal["engine", "ingress"]
    node_id: str = ""
    node_ip: str = ""
    pid: int = 0
    device: str = ""
    base: str = ""  # the base model's name (the demo model when the default could not be loaded)
    models: list[str] = field(default_factory=list)  # loaded, least recently used first
    native_sizes: dict[str, int] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)
    queue_depth: int = 0
    running_jobs: int = 0
    running_rows: int = 0
    accepting: bool = True
    jobs_done: int = 0
    metrics: bytes = b""  # Prometheus text of its own registry
    at: float = 0.0  # time.time() of the heartbeat (the board's clock)


Command = tuple[int, str, str | None]  # (sequence number, "refresh" | "unload", model name)


def light(request: GenerationRequest) -> GenerationRequest:
    """The request without its input images (what ingresses need to show the job)."""
    if request.init_image is None and request.mask_image is None:
        return request
    return request.model_copy(update={"init_image": None, "mask_image": None})


def view_of(
    job: Job,
    *,
    preview_seq: int = 0,
    queue_position: int | None = None,
    replica: str | None = None,
    with_result: bool = True,
    version: int = 0,
) -> JobView:
    return JobView(
        id=job.id,
        status=job.status,
        request=job.request,
        owner=job.owner,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        progress=job.progress,
        preview=job.preview if with_result else None,
        preview_seq=preview_seq,
        result=job.result if with_result else None,
        error=job.error,
        warnings=list(job.warnings),
        history_ids=None if job.history_ids is None else list(job.history_ids),
        queue_position=queue_position,
        replica=replica,
        version=version,
    )


def snapshot_job(view: JobView) -> Job:
    """A Job showing the view as it is, for a listing (it never changes; no listener hears of it)."""
    return Job(
        request=view.request,
        id=view.id,
        owner=view.owner,
        created_at=view.created_at,
        status=view.status,
        progress=view.progress,
        started_at=view.started_at,
        finished_at=view.finished_at,
        result=view.result,
        error=view.error,
        warnings=list(view.warnings),
        history_ids=view.history_ids,
    )


def mirror_of(view: JobView) -> Job:
    """A local Job showing the view; `apply` keeps it up to date (its listeners hear every change)."""
    job = Job(request=view.request, id=view.id, owner=view.owner, created_at=view.created_at)
    apply(job, view, new_preview=True)
    return job


def apply(job: Job, view: JobView, *, new_preview: bool) -> None:
    """Bring a mirror to the view's state through Job's own transitions, so its listeners (event
    streams, waiting clients, webhooks) see what they would see in one process."""
    job.request = view.request
    if job.done:
        _settle(job, view)
        return
    if view.status is JobStatus.QUEUED and job.status is JobStatus.RUNNING:
        job.requeue()  # its replica stopped; it waits for another
    elif job.status is JobStatus.QUEUED and view.started_at is not None:
        job.mark_running()
    if view.started_at is not None:
        job.started_at = view.started_at
    preview = view.preview if new_preview else None
    if not view.done and view.progress is not None and (view.progress != job.progress or preview is not None):
        job.report(view.progress, preview)
    if view.done:
        job.progress = view.progress
        _settle(job, view)
        if view.result is not None and view.status is JobStatus.SUCCEEDED:
            job.succeed(view.result)
        else:
            job.fail(view.error or SDServerError("the job failed"))
        job.finished_at = view.finished_at or job.finished_at


def _settle(job: Job, view: JobView) -> None:
    """What may still change after a job is done: the history's ids and warnings."""
    if view.history_ids is not None:
        job.history_ids = view.history_ids
    if view.warnings:
        job.warnings[:] = view.warnings
