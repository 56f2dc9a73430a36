"""A Job wraps one GenerationRequest on its way through the queue: status, progress, result, cancel."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from PIL import Image

from sdserver.core.errors import Cancelled, IdempotencyKeyReused, NotFound, SDServerError
from sdserver.core.types import GenerationRequest, GenerationResult, Progress


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


Listener = Callable[["Job"], None]


@dataclass(eq=False)
class Job:
    request: GenerationRequest  # prepared and seeded
    deadline: float | None = None  # time.monotonic() by which it must have started
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    status: JobStatus = JobStatus.QUEUED
    progress: Progress | None = None
    result: GenerationResult | None = None
    error: SDServerError | None = None
    created_at: float = field(default_factory=time.time)
    enqueued_at: float = field(default_factory=time.monotonic)
    arrival_tick: int = 0  # the step batcher's step count when it was queued (its fairness clock)
    started_at: float | None = None
    finished_at: float | None = None
    cancel_requested: bool = False
    preview_every: int = 0  # steps between previews; 0: none
    preview: Image.Image | None = None  # the latest preview of the first image
    owner: str | None = None  # name of the API key that submitted it; None: no auth
    fingerprint: str | None = None  # of the request as sent, to tell a retry from a reused Idempotency-Key
    warnings: list[str] = field(default_factory=list)  # problems that did not fail it (an image not saved)
    history_ids: list[str | None] | None = None  # each image's id in the history, once it is saved
    steps_before: int = 0  # steps of the passes already run (a hires fix's first pass)
    steps_after: int = 0  # steps of the passes still to come, so progress spans the whole job
    _done: threading.Event = field(default_factory=threading.Event, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _listeners: list[Listener] = field(default_factory=list, repr=False)

    @property
    def batch_key(self) -> tuple[object, ...]:
        """Jobs with equal keys can share one pipeline call."""
        r = self.request
        sampling = (r.steps, r.guidance_scale, r.eta, r.strength, r.sampler, r.clip_skip)
        controls = tuple(unit.name for unit in r.controlnets)
        return (r.model, r.task, r.width, r.height, *sampling, r.loras, controls)  # LoRAs apply to a whole batch

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def add_listener(self, listener: Listener) -> None:
        """Called (from the worker thread) on every progress update and once at the end."""
        with self._lock:
            self._listeners.append(listener)
        if self.done:
            listener(self)

    def remove_listener(self, listener: Listener) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def mark_running(self) -> None:
        self.status, self.started_at = JobStatus.RUNNING, self.started_at or time.time()
        self._notify()

    def next_pass(self, request: GenerationRequest, steps_after: int = 0) -> None:
        """Go on to the job's next pass (a hires fix's second): it runs `request`, queued again but no
        longer subject to the start deadline it already met."""
        done = self.progress.total - self.steps_after if self.progress is not None else self.steps_before
        self.request, self.deadline = request, None
        self.steps_before, self.steps_after = done, steps_after

    def requeue(self) -> None:
        """Back to waiting: the device running it stopped, and it will run again elsewhere (sdserver.cluster)."""
        self.status, self.started_at, self.progress, self.preview = JobStatus.QUEUED, None, None, None
        self._notify()

    def report(self, progress: Progress, preview: Image.Image | None = None) -> None:
        """`progress` within the pass running; the job's progress spans its passes."""
        before = self.steps_before
        self.progress = Progress(step=before + progress.step, total=before + progress.total + self.steps_after)
        if preview is not None:
            self.preview = preview
        self._notify()

    def wants_preview(self, step: int) -> bool:
        return self.preview_every > 0 and step % self.preview_every == 0

    @property
    def eta_s(self) -> float | None:
        """Seconds left, extrapolated from the steps done so far."""
        if self.progress is None or self.started_at is None or self.progress.step == 0 or self.done:
            return None
        per_step = (time.time() - self.started_at) / self.progress.step
        return per_step * (self.progress.total - self.progress.step)

    def succeed(self, result: GenerationResult) -> None:
        self.result = result
        self._finish(JobStatus.SUCCEEDED)

    def fail(self, error: SDServerError) -> None:
        self.error = error
        self._finish(JobStatus.CANCELLED if isinstance(error, Cancelled) else JobStatus.FAILED)

    def _finish(self, status: JobStatus) -> None:
        with self._lock:
            if self._done.is_set():
                return
            self.status, self.finished_at = status, time.time()
            self._done.set()
        self._notify()

    def _notify(self) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            listener(self)

    def wait(self, timeout: float | None = None) -> GenerationResult:
        """Block until finished; return the result or raise the job's error."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"job {self.id} still {self.status}")
        return self._outcome()

    async def wait_async(self) -> GenerationResult:
        loop = asyncio.get_running_loop()
        finished: asyncio.Future[None] = loop.create_future()

        def on_change(job: Job) -> None:
            if job.done:
                loop.call_soon_threadsafe(_resolve, finished)

        self.add_listener(on_change)
        try:
            await finished
        finally:
            self.remove_listener(on_change)
        return self._outcome()

    def _outcome(self) -> GenerationResult:
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class JobStore:
    """Every known job by id. Finished jobs are kept `ttl_s` seconds and at most `max_kept` of them,
    so memory stays bounded however long the server runs."""

    def __init__(self, *, ttl_s: float = 3600.0, max_kept: int = 1000) -> None:
        self.ttl_s, self.max_kept = ttl_s, max_kept
        self._jobs: dict[str, Job] = {}
        self._by_key: dict[tuple[str | None, str], str] = {}  # (owner, Idempotency-Key) -> job id
        self._lock = threading.Lock()

    def add(self, job: Job, idempotency_key: str | None = None) -> None:
        with self._lock:
            self._jobs[job.id] = job
            if idempotency_key:
                self._by_key[job.owner, idempotency_key] = job.id
        self.prune()

    def get(self, job_id: str, owner: Callable[[str | None], bool] | None = None) -> Job:
        """The job; with `owner` (a test of the job's owner), a job that fails it is not found either:
        another key's job is a 404, as if it did not exist."""
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None or (owner is not None and not owner(job.owner)):
            raise NotFound(f"job {job_id!r} not found (finished jobs are kept for a limited time)")
        return job

    def by_idempotency_key(self, key: str, owner: str | None = None, fingerprint: str | None = None) -> Job | None:
        """The job `owner` made with this key; a different request under the same key is an error."""
        with self._lock:
            job_id = self._by_key.get((owner, key))
            job = self._jobs.get(job_id) if job_id else None
        if job is not None and fingerprint is not None and job.fingerprint not in (None, fingerprint):
            raise IdempotencyKeyReused(
                f"Idempotency-Key: {key!r} was already used for another request (job {job.id}); "
                "send a new key for a new request",
                field="Idempotency-Key",
            )
        return job

    def all(self, owner: Callable[[str | None], bool] | None = None) -> list[Job]:
        """Every job, or those whose owner passes the `owner` test."""
        with self._lock:
            return [job for job in self._jobs.values() if owner is None or owner(job.owner)]

    def prune(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._lock:
            finished = [job for job in self._jobs.values() if job.done]
            finished.sort(key=lambda job: job.finished_at or 0.0)
            excess = len(finished) - self.max_kept
            for index, job in enumerate(finished):
                if index < excess or (job.finished_at or now) < now - self.ttl_s:
                    del self._jobs[job.id]
            live = set(self._jobs)
            self._by_key = {key: job_id for key, job_id in self._by_key.items() if job_id in live}

    def __len__(self) -> int:
        return len(self._jobs)
