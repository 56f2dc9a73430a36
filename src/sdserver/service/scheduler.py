"""One scheduler per device: a bounded queue, a batcher, and the worker thread that owns the device.

Flow: `submit` prepares and seeds the request (bad input fails here, before queueing), stamps a
deadline and enqueues a Job. The worker batches in one of two ways:

- `step` (the default): a running set (service/running.py). The oldest job opens it; between any two
  denoising steps, waiting jobs with the same model, LoRA set and size join it (up to
  `max_batch_size` images) and finished ones leave, whatever their steps, sampler, guidance or
  strength. Fairness: once a job that cannot join (another model, size or LoRA set) has waited
  `switch_after_steps` steps, the set stops admitting and drains, and the oldest job goes next.
- `request`: the oldest job waits up to `batch_window_s` for company with the same batch key (model,
  task, size, steps, sampler, guidance, eta, strength, LoRAs), and the batch runs as one engine call.

Cancelled and expired jobs are dropped when they would start. A failing request fails alone: a
failed batch is retried one by one, a failed step is re-run member by member.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, Literal, Protocol, TypeVar

from PIL import Image

from sdserver.core.errors import (
    Cancelled,
    GenerationError,
    OutOfMemory,
    Overloaded,
    SDServerError,
    Timeout,
    Unavailable,
)
from sdserver.core.types import GeneratedImage, GenerationRequest, GenerationResult, PreparedRequest, Progress, Task
from sdserver.service.jobs import Job, JobStatus, JobStore
from sdserver.service.metrics import Metrics
from sdserver.service.running import RunningSet, SessionOpener, group_key

log = logging.getLogger(__name__)

T = TypeVar("T")


class EngineLike(Protocol):
    def prepare(self, request: GenerationRequest) -> GenerationRequest: ...

    def second_pass(self, request: Any, images: Sequence[GeneratedImage]) -> GenerationRequest: ...

    def upscaled(self, request: Any, images: Sequence[GeneratedImage]) -> list[GeneratedImage]: ...

    def run_upscale(self, request: Any) -> list[GeneratedImage]: ...

    def run(self, requests: Sequence[GenerationRequest], on_step: StepCallback) -> list[list[GeneratedImage]]: ...

    @property
    def session(self) -> SessionOpener: ...


Batching = Literal["step", "request"]


class HistoryLike(Protocol):
    def track(self, job: Job, *, asked: bool) -> None: ...


class StepCallback(Protocol):
    def __call__(self, step: int, total: int, previews: Callable[[], list[Image.Image]]) -> None: ...


class Scheduler:
    def __init__(
        self,
        engine: EngineLike,
        *,
        max_queue: int = 64,
        max_batch_size: int = 8,
        batch_window_s: float = 0.02,
        queue_timeout_s: float | None = None,
        jobs: JobStore | None = None,
        metrics: Metrics | None = None,
        on_worker_death: Callable[[], None] | None = None,
        batching: Batching = "step",
        switch_after_steps: int = 40,
        history: HistoryLike | None = None,
    ) -> None:
        self.engine = engine
        self.batching = batching
        self.switch_after_steps = switch_after_steps
        self.max_queue = max_queue
        self.max_batch_size = max_batch_size
        self.batch_window_s = batch_window_s
        self.queue_timeout_s = queue_timeout_s
        self.jobs = jobs if jobs is not None else JobStore()
        self._queue: deque[Job] = deque()
        self._calls: deque[tuple[Callable[[], Any], Future[Any]]] = deque()  # device work that is not a job
        self.metrics = metrics if metrics is not None else Metrics()
        self._on_worker_death = on_worker_death
        self.history = history  # keeps finished jobs' images (service/history.py)
        self._expect_company = False  # did the last batch have more than one job?
        self._wakeup = threading.Condition()
        self._idempotency = threading.Lock()
        self._accepting = True
        self._stopping = False
        self._running: list[Job] = []
        self._ticks = 0  # denoising steps run by the step batcher: its clock for fairness
        self.last_joins = 0
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="sdserver-worker", daemon=True)
        self._thread.start()

    def stop_accepting(self) -> None:
        """New submissions are refused (503); queued and running work carries on."""
        with self._wakeup:
            self._accepting = False

    def drain(self, timeout: float) -> bool:
        """Stop accepting and wait up to `timeout` for the queue and the worker to empty."""
        self.stop_accepting()
        deadline = time.monotonic() + timeout
        with self._wakeup:
            while (self._queue or self._running) and self.alive and not self._stopping:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._wakeup.wait(remaining)
        return True

    def stop(self, timeout: float = 10.0, *, at_once: bool = False) -> None:
        """Fail whatever is still queued, stop the running batch at its next step, end the worker.

        `at_once`: the running requests are answered (503) now, not after their next step."""
        with self._wakeup:
            self._accepting = False
            self._stopping = True
            leftovers = list(self._queue)
            self._queue.clear()
            calls = self._take_calls()
            for job in self._running:
                job.cancel_requested = True
            running = list(self._running)
            self._wakeup.notify_all()
        for job in leftovers:
            job.fail(Unavailable("the server is shutting down; the request was not run"))
        for future in calls:
            future.set_exception(Unavailable("the server is shutting down; the request was not run"))
        if at_once:
            for job in running:  # the worker's own outcome for them is then ignored
                job.fail(Unavailable("the server shut down before this request finished"))
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def stopping(self) -> bool:
        """stop() was called."""
        return self._stopping

    @property
    def running_count(self) -> int:
        """Jobs in the batch the worker is running."""
        return len(self._running)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def accepting(self) -> bool:
        return self._accepting and self.alive

    # -- submitting ------------------------------------------------------------------------------
    def submit(
        self,
        request: GenerationRequest,
        *,
        idempotency_key: str | None = None,
        preview_every: int = 0,
        save: bool = False,
        owner: str | None = None,
        fingerprint: str | None = None,
    ) -> Job:
        """Queue a request for `owner`; bad input, a full queue or a stopped server raise before
        anything is queued.

        A repeated `idempotency_key` (per owner) returns the job it first created instead of queueing
        another, if `fingerprint` (of the request as sent) matches; another request is refused.
        `save`: the client asks for its images to be kept in the history (the history's mode decides).
        """
        fields = {"preview_every": preview_every, "owner": owner, "fingerprint": fingerprint}
        if not idempotency_key:
            return self._submit(request, None, fields, save)
        with self._idempotency:  # two racing retries must not both create a job
            existing = self.jobs.by_idempotency_key(idempotency_key, owner, fingerprint)
            return existing or self._submit(request, idempotency_key, fields, save)

    def _submit(
        self, request: GenerationRequest, idempotency_key: str | None, fields: dict[str, Any], save: bool
    ) -> Job:
        prepared = self.engine.prepare(request).with_seed()
        deadline = None if self.queue_timeout_s is None else time.monotonic() + self.queue_timeout_s
        job = Job(request=prepared, deadline=deadline, steps_after=_second_pass_steps(prepared), **fields)
        with self._wakeup:
            job.arrival_tick = self._ticks
            if not self.accepting:
                raise Unavailable("the server is not accepting work (starting, shutting down, or its worker stopped)")
            if len(self._queue) >= self.max_queue:
                raise Overloaded(f"the queue is full ({self.max_queue} waiting); retry shortly")
            self._queue.append(job)
            self._wakeup.notify_all()
        job.add_listener(self._count_outcome)
        if self.history is not None:
            self.history.track(job, asked=save)
        self.jobs.add(job, idempotency_key)
        return job

    def _count_outcome(self, job: Job) -> None:
        if job.done:
            job.remove_listener(self._count_outcome)
            self.metrics.jobs.labels(status=job.status.value).inc()

    def get(self, job_id: str, owner: Callable[[str | None], bool] | None = None) -> Job:
        """The job (`owner`: a test of its owner; a job that fails it is not found)."""
        return self.jobs.get(job_id, owner)

    def cancel(self, job_id: str, owner: Callable[[str | None], bool] | None = None) -> Job:
        """Cancel a queued job now, or a running one at its next denoising step."""
        job = self.get(job_id, owner)
        with self._wakeup:
            job.cancel_requested = True
            queued = job in self._queue
            if queued:
                self._queue.remove(job)
        if queued:
            job.fail(self._cancelled("cancelled while queued"))
        return job

    def call(self, fn: Callable[[], T]) -> Future[T]:
        """Run `fn` on the worker thread, the device's only user, between two denoising steps (or
        batches): device work that is not a generation, e.g. an upscale. Its outcome is the future's."""
        future: Future[T] = Future()
        with self._wakeup:
            if not self.accepting:
                raise Unavailable("the server is not accepting work (starting, shutting down, or its worker stopped)")
            if len(self._calls) >= self.max_queue:
                raise Overloaded(f"the queue is full ({self.max_queue} waiting); retry shortly")
            self._calls.append((fn, future))
            self._wakeup.notify_all()
        return future

    def _run_calls(self) -> None:
        """Run the waiting calls (on the worker thread)."""
        while True:
            with self._wakeup:
                if not self._calls:
                    return
                fn, future = self._calls.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except Exception as exc:  # the caller gets it; the worker lives on
                future.set_exception(exc)

    def _take_calls(self) -> list[Future[Any]]:
        """With the lock held: the waiting calls' futures, removed from the queue."""
        futures = [future for _, future in self._calls]
        self._calls.clear()
        return futures

    def _cancelled(self, reason: str) -> SDServerError:
        """Past stop(), a cancelled job was cut short by the shutdown: say so (503), whoever asked."""
        return Unavailable("the server shut down before this request finished") if self._stopping else Cancelled(reason)

    def queue_position(self, job: Job) -> int | None:
        """0-based place in the queue, None once it left it."""
        with self._wakeup:
            try:
                return self._queue.index(job)
            except ValueError:
                return None

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def running_rows(self) -> int:
        """Images being generated right now (the running set's rows, or the batch's)."""
        with self._wakeup:
            return sum(job.request.num_images for job in self._running)

    # -- the worker ------------------------------------------------------------------------------
    def _work(self) -> None:
        batch: list[Job] | None = []
        try:
            while True:
                if self.batching == "step":
                    first = self._next_first()
                    if first is None:
                        return
                    batch = [first]
                    self._run_group(first)
                    continue
                batch = self._next_batch()
                if batch is None:
                    return
                with self._wakeup:
                    self._running = batch
                try:
                    self._run(batch)
                finally:
                    with self._wakeup:
                        self._running = []
                        self._wakeup.notify_all()
        except BaseException:
            log.critical("the worker thread died; no more requests can be served", exc_info=True)
            self._die(batch or [])

    def _die(self, in_hand: list[Job]) -> None:
        with self._wakeup:
            self._accepting = False
            leftovers = list(self._queue) + in_hand
            self._queue.clear()
            calls = self._take_calls()
            self._wakeup.notify_all()
        for job in leftovers:  # already-finished jobs ignore this
            job.fail(Unavailable("the server's worker stopped; the request was not completed"))
        for future in calls:
            future.set_exception(Unavailable("the server's worker stopped; the request was not completed"))
        if self._on_worker_death is not None:
            self._on_worker_death()

    def _wait_for_work(self) -> bool:
        """With the lock held: block until a job waits (running the waiting calls meanwhile). False once
        stopping with no job left."""
        while not self._queue and not self._stopping:
            if self._calls:
                self._wakeup.release()
                try:
                    self._run_calls()
                finally:
                    self._wakeup.acquire()
                continue
            self._wakeup.wait()
        return bool(self._queue)

    # -- step-level batching ----------------------------------------------------------------------
    def _next_first(self) -> Job | None:
        """The oldest job still wanted (blocks until there is one); None once stopping."""
        while True:
            with self._wakeup:
                if not self._wait_for_work():
                    return None
                first = self._queue.popleft()
                self._running = [first]  # out of the queue: from now on stop() must see it here
            if self._still_wanted(first):
                return first
            self._set_running([])

    def _run_group(self, first: Job) -> None:
        """Run a running set opened by `first` until it empties; jobs with its group key join on the way."""
        if first.request.task is Task.UPSCALE:
            self._run_upscale(first)
            self._set_running([])
            return
        key = group_key(first.request)
        running: RunningSet | None = None
        try:
            with self.engine.session(first.request.model or "", first.request.loras) as session:
                running = RunningSet(session, self.metrics, self._cancelled, self._follow_up)
                running.admit(first)
                while running.members:
                    joiners = self._joiners(key, self.max_batch_size - running.rows, running.fits)
                    for job in joiners:
                        running.admit(job)
                    self.metrics.joins_per_step.observe(len(joiners))
                    self._set_running(running.jobs)
                    self._run_calls()
                    running.tick()
                    with self._wakeup:
                        self._ticks += 1
        except SDServerError as exc:  # the model could not be loaded or the LoRAs applied
            for job in [first, *(running.jobs if running is not None else [])]:
                job.fail(exc)
        except Exception as exc:  # a bug of ours: the requests get a clear error, the worker lives on
            log.exception("worker error")
            for job in [first, *(running.jobs if running is not None else [])]:
                job.fail(GenerationError(f"internal error: {type(exc).__name__}: {exc}"))
        finally:
            self._set_running([])

    def _joiners(
        self, key: tuple[object, ...], room: int, fits: Callable[[Sequence[GenerationRequest]], bool]
    ) -> list[Job]:
        """Waiting jobs that can join the running set now, oldest first, up to `room` images and while the
        engine says a step over them all `fits` in memory. None once a job that cannot join has waited
        `switch_after_steps` steps: the set then drains, and it goes next."""
        with self._wakeup:
            if self._stopping:
                return []
            blocked = next((job for job in self._queue if group_key(job.request) != key), None)
            if blocked is not None and self._ticks - blocked.arrival_tick >= self.switch_after_steps:
                return []
            taken: list[Job] = []
            for job in list(self._queue):
                if (
                    group_key(job.request) == key
                    and job.request.num_images <= room
                    and fits([*(taken_job.request for taken_job in taken), job.request])
                ):
                    self._queue.remove(job)
                    taken.append(job)
                    room -= job.request.num_images
        return [job for job in taken if self._still_wanted(job)]

    def _set_running(self, jobs: list[Job]) -> None:
        with self._wakeup:
            self._running = list(jobs)
            self._wakeup.notify_all()

    # -- request-level batching -------------------------------------------------------------------
    def _next_batch(self) -> list[Job] | None:
        with self._wakeup:
            if not self._wait_for_work():
                return None
            first = self._queue.popleft()
            batch, images = [first], first.request.num_images
            # Wait for company only under concurrent load: a lone client pays no batching delay.
            window = self.batch_window_s if (self._expect_company or self._queue) else 0.0
            window_ends = time.monotonic() + window
            while images < self.max_batch_size:
                for job in list(self._queue):
                    if job.batch_key == first.batch_key and images + job.request.num_images <= self.max_batch_size:
                        self._queue.remove(job)
                        batch.append(job)
                        images += job.request.num_images
                remaining = window_ends - time.monotonic()
                if images >= self.max_batch_size or remaining <= 0 or self._stopping:
                    break
                self._wakeup.wait(remaining)
            self._expect_company = len(batch) > 1
            self._running = batch  # out of the queue: from now on stop() must see them here
        return [job for job in batch if self._still_wanted(job)]

    def _still_wanted(self, job: Job) -> bool:
        if job.cancel_requested:
            job.fail(self._cancelled("cancelled while queued"))
            return False
        if job.deadline is not None and time.monotonic() > job.deadline:
            job.fail(Timeout(f"the request waited over {self.queue_timeout_s:g}s in the queue and was dropped"))
            return False
        return True

    def _run(self, batch: list[Job]) -> None:
        if not batch:
            return
        if batch[0].request.task is Task.UPSCALE:  # batched only with upscales (the batch key has the task)
            for job in batch:
                self._run_upscale(job)
            return
        for job in batch:
            job.mark_running()
            self.metrics.queue_wait_seconds.observe(time.monotonic() - job.enqueued_at)
        self.metrics.batch_images.observe(sum(job.request.num_images for job in batch))
        self._run_calls()
        try:
            outputs = self.engine.run([job.request for job in batch], self._progress_reporter(batch))
        except Cancelled as exc:
            error = self._cancelled(exc.message)
            for job in batch:
                job.fail(error)
            return
        except GenerationError as exc:
            if len(batch) > 1 and not isinstance(exc, OutOfMemory):
                log.warning("a batch of %d failed (%s); retrying its requests one by one", len(batch), exc)
                for job in batch:
                    self._run([job])
                return
            for job in batch:
                job.fail(exc)
            return
        except SDServerError as exc:
            for job in batch:
                job.fail(exc)
            return
        except Exception as exc:  # a bug of ours: the request gets a clear error, the worker lives on
            log.exception("worker error")
            for job in batch:
                job.fail(GenerationError(f"internal error: {type(exc).__name__}: {exc}"))
            return
        for job, images in zip(batch, outputs, strict=True):
            if job.cancel_requested:
                job.fail(Cancelled("cancelled while running"))
            elif self._follow_up(job, images):
                continue
            else:
                job.succeed(GenerationResult(model=job.request.model or "", images=images))
                self.metrics.images.labels(model=job.request.model or "").inc(len(images))

    def _run_upscale(self, job: Job) -> None:
        """An upscale task: no denoising, one call on the worker."""
        job.mark_running()
        self.metrics.queue_wait_seconds.observe(time.monotonic() - job.enqueued_at)
        try:
            images = self.engine.run_upscale(job.request)
        except SDServerError as exc:
            job.fail(exc)
            return
        except Exception as exc:  # a bug of ours: the request gets a clear error, the worker lives on
            log.exception("worker error")
            job.fail(GenerationError(f"internal error: {type(exc).__name__}: {exc}"))
            return
        job.report(Progress(step=1, total=1))
        job.succeed(GenerationResult(model=job.request.model or "", images=images))

    def _follow_up(self, job: Job, images: list[GeneratedImage]) -> bool:
        """A hires fix's first pass has run: the job goes on to its second pass, queued first (it was
        accepted long ago, so the queue's bound does not apply). True if it did (or failed trying)."""
        request = job.request
        if not isinstance(request, PreparedRequest) or not request.needs_second_pass:
            return False
        try:
            if _second_pass_steps(request) == 0:  # strength 0: the upscale is the result
                job.succeed(GenerationResult(model=request.model, images=self.engine.upscaled(request, images)))
                return True
            job.next_pass(self.engine.second_pass(request, images))
        except SDServerError as exc:
            job.fail(exc)
            return True
        with self._wakeup:
            if self._stopping:
                job.fail(Unavailable("the server shut down before this request finished"))
                return True
            self._queue.appendleft(job)
            self._wakeup.notify_all()
        return True

    def _progress_reporter(self, batch: list[Job]) -> StepCallback:
        # Output index of each job's first image in the batch, for its preview.
        offsets, offset = [], 0
        for job in batch:
            offsets.append(offset)
            offset += job.request.num_images

        last_step = [time.perf_counter()]

        def on_step(step: int, total: int, previews: Callable[[], list[Image.Image]]) -> None:
            now = time.perf_counter()
            self.metrics.step_seconds.observe(now - last_step[0])
            last_step[0] = now
            images = previews() if any(job.wants_preview(step) for job in batch) else None
            for job, first_image in zip(batch, offsets, strict=True):
                preview = images[first_image] if images is not None and job.wants_preview(step) else None
                job.report(Progress(step=step, total=total), preview)
            if all(job.cancel_requested for job in batch):
                raise Cancelled("cancelled while running")

        return on_step


def _second_pass_steps(request: GenerationRequest) -> int:
    """The steps of a prepared request's second pass still to come (a hires fix's); 0 if none."""
    if isinstance(request, PreparedRequest) and request.needs_second_pass and request.hires is not None:
        return request.hires.denoising_steps
    return 0


__all__ = ["EngineLike", "JobStatus", "Scheduler"]
