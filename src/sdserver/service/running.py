"""A running set: jobs on one model, one LoRA set and one latent size, denoised together a step at a time.

Step-level batching: each tick the scheduler lets matching waiting jobs join (their prompts are encoded
and their latents prepared on admission), then ONE denoiser forward runs over every member's rows, each
member advancing with its own scheduler, steps, guidance and strength; members whose last step ran are
decoded and answered, cancelled ones leave. A failing member is dropped alone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from PIL import Image

from sdserver.core.errors import GenerationError, OutOfMemory, SDServerError
from sdserver.core.types import GeneratedImage, GenerationRequest, GenerationResult, LoraRef, Progress, Task
from sdserver.service.jobs import Job
from sdserver.service.metrics import Metrics

log = logging.getLogger(__name__)


class StateLike(Protocol):
    """What the service sees of a generation in flight (the engine's families.State)."""

    index: int

    @property
    def total(self) -> int: ...

    @property
    def done(self) -> bool: ...


class SessionLike(Protocol):
    def admit(self, request: Any) -> Any: ...

    def fits(self, states: Sequence[Any], requests: Sequence[Any]) -> bool: ...

    def step(self, states: Sequence[Any]) -> None: ...

    def previews(self, state: Any) -> list[Image.Image]: ...

    def finish(self, states: Sequence[Any]) -> list[list[GeneratedImage]]: ...


class SessionOpener(Protocol):
    def __call__(self, name: str, loras: Sequence[LoraRef] = ()) -> AbstractContextManager[SessionLike]: ...


@dataclass(eq=False)
class Member:
    job: Job
    state: StateLike


def group_key(request: GenerationRequest) -> tuple[object, ...]:
    """Jobs with equal keys can share a running set: same model, LoRA set, latent shape and ControlNets."""
    if request.task is Task.UPSCALE:  # runs alone, never in a set
        return ("upscale", id(request))
    return (request.model, request.loras, request.width, request.height, _controlnets(request))


def _controlnets(request: GenerationRequest) -> tuple[str, ...]:
    """The ControlNets a request's rows go through, in order: one forward per unit over the set's rows."""
    return tuple(unit.name for unit in request.controlnets)


FollowUp = Callable[[Job, list[GeneratedImage]], bool]


def _no_follow_up(job: Job, images: list[GeneratedImage]) -> bool:
    return False


class RunningSet:
    """`follow_up(job, images)` is asked about each finished job: True when the job goes on to another
    pass (a hires fix) instead of being answered with `images`."""

    def __init__(
        self,
        session: SessionLike,
        metrics: Metrics,
        cancelled: Callable[[str], SDServerError],
        follow_up: FollowUp = _no_follow_up,
    ) -> None:
        self.session, self.metrics, self._cancelled, self._follow_up = session, metrics, cancelled, follow_up
        self.members: list[Member] = []

    @property
    def rows(self) -> int:
        return sum(member.job.request.num_images for member in self.members)

    @property
    def jobs(self) -> list[Job]:
        return [member.job for member in self.members]

    def fits(self, requests: Sequence[GenerationRequest]) -> bool:
        """Whether `requests` can join and the next step still be one denoiser forward within memory."""
        return self.session.fits([member.state for member in self.members], requests)

    def admit(self, job: Job) -> None:
        """Encode the job's prompts and prepare its latents; a job that cannot start fails alone."""
        job.mark_running()
        self.metrics.queue_wait_seconds.observe(time.monotonic() - job.enqueued_at)
        try:
            state = self.session.admit(job.request)
        except SDServerError as exc:
            job.fail(exc)
            return
        self.members.append(Member(job, state))
        self.metrics.batch_images.observe(self.rows)

    def tick(self) -> None:
        """One denoising step for every member, then progress, previews and the finished ones."""
        self._drop_cancelled()
        if not self.members:
            return
        started = time.perf_counter()
        try:
            self.session.step([member.state for member in self.members])
        except OutOfMemory as exc:  # no single culprit: every member fails (503); the next request may fit
            self._fail(self.members, exc)
            return
        except SDServerError as exc:
            self._step_one_by_one(exc)
        self.metrics.step_seconds.observe(time.perf_counter() - started)
        self._report()
        self._finish_done()

    def _step_one_by_one(self, error: SDServerError) -> None:
        """The shared step failed: step each member that did not advance alone, and drop those that fail."""
        if len(self.members) == 1:
            self._fail(self.members, error)
            return
        log.warning("a step over %d requests failed (%s); stepping them one by one", len(self.members), error)
        for member in list(self.members):
            try:
                self.session.step([member.state])
            except SDServerError as exc:
                self._fail([member], exc)

    def _report(self) -> None:
        for member in self.members:
            job, state = member.job, member.state
            preview = self.session.previews(state)[0] if job.wants_preview(state.index) else None
            job.report(Progress(step=state.index, total=state.total), preview)

    def _finish_done(self) -> None:
        done = [member for member in self.members if member.state.done]
        if not done:
            return
        self.members = [member for member in self.members if not member.state.done]
        try:
            outputs = self.session.finish([member.state for member in done])
        except SDServerError as exc:
            self._fail(done, exc)
            return
        for member, images in zip(done, outputs, strict=True):
            job = member.job
            if job.cancel_requested:
                job.fail(self._cancelled("cancelled while running"))
                continue
            if self._follow_up(job, images):
                continue
            job.succeed(GenerationResult(model=job.request.model or "", images=images))
            self.metrics.images.labels(model=job.request.model or "").inc(len(images))

    def _drop_cancelled(self) -> None:
        for member in [member for member in self.members if member.job.cancel_requested]:
            self.members.remove(member)
            member.job.fail(self._cancelled("cancelled while running"))

    def _fail(self, members: Sequence[Member], error: SDServerError) -> None:
        for member in list(members):
            if member in self.members:
                self.members.remove(member)
            member.job.fail(error if isinstance(error, SDServerError) else GenerationError(str(error)))
