"""An engine replica: one device, with its own Engine and Scheduler (step-level batching), on Ray Serve.

A request arrives as `generate(Work)`. The replica claims the job on the board (a job cancelled while
it waited in the ingress is dropped here), makes sure its model is loaded (Ray Serve's model
multiplexing: the loaded models are reported to Serve's router, which sends a model's requests to the
replicas that have it), queues it on its own scheduler, and reports its progress and outcome to the
board (the Reporter, coalesced every 0.1 s). The answer to the ingress is the finished job.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import threading
import time
from functools import partial
from typing import Any

from PIL import Image

from sdserver.api.app import add_engine_gauges
from sdserver.core.errors import NotFound, SDServerError
from sdserver.engine import Engine
from sdserver.engine.device import describe_device
from sdserver.engine.registry import Registry
from sdserver.service.jobs import Job, JobStatus, JobStore
from sdserver.service.metrics import Metrics
from sdserver.service.scheduler import Scheduler
from sdserver.settings import Settings

from .board import board_handle
from .views import JobView, Member, Update, Work, light, view_of

log = logging.getLogger(__name__)
HEARTBEAT_S = 1.0


class Resident:
    """A model Ray Serve counts as loaded on this replica. When Serve's least-recently-used policy drops
    it (past --models-per-replica), it is unloaded, unless it is the base model or a batch is on it."""

    def __init__(self, registry: Registry, name: str) -> None:
        self.registry, self.name, self._released = registry, name, False

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        try:
            self.registry.unload(self.name)
        except SDServerError as exc:  # the base model, or in use: the registry's own budget decides later
            log.debug("model %r stays loaded: %s", self.name, exc.message)

    def __del__(self) -> None:  # Serve calls it when it drops the model
        self.release()


class Reporter:
    """Sends the board the news of this replica's jobs (coalesced, every PERIOD_S) and drops the jobs
    the board says are no longer wanted here (cancelled through any ingress, or moved elsewhere)."""

    PERIOD_S = 0.1

    def __init__(self, board: Any, replica: str, scheduler: Scheduler) -> None:
        self.board, self.replica, self.scheduler = board, replica, scheduler
        self._live: dict[str, Job] = {}  # the board's job id -> the job in this replica's scheduler
        self._dirty: set[str] = set()
        self._previews: dict[str, Image.Image | None] = {}  # the last preview sent of each job
        self._lock = threading.Lock()  # listeners run on the worker thread
        self._sending = asyncio.Lock()

    def track(self, job_id: str, local: Job) -> None:
        with self._lock:
            self._live[job_id] = local
            self._dirty.add(job_id)
        local.add_listener(lambda _: self._mark(job_id))

    def _mark(self, job_id: str) -> None:
        with self._lock:
            self._dirty.add(job_id)

    @property
    def running(self) -> int:
        with self._lock:
            return sum(job.status is JobStatus.RUNNING for job in self._live.values())

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.PERIOD_S)
            try:
                await self.flush()
            except Exception as exc:  # the board restarting: the news waits for the next round
                log.warning("cannot reach the job board: %s", exc)

    async def flush(self) -> None:
        async with self._sending:
            with self._lock:
                dirty, self._dirty = self._dirty, set()
                live = dict(self._live)
            if not live:
                return
            updates = [self._update(job_id, live[job_id]) for job_id in dirty if job_id in live]
            try:
                drop = await self.board.sync.remote(self.replica, updates, list(live))
            except BaseException:
                self._mark_all(dirty)
                raise
            for job_id in drop:
                with contextlib.suppress(NotFound):  # already gone from this replica's store
                    self.scheduler.cancel(live[job_id].id)
            with self._lock:
                for update in updates:
                    if update.status.finished:
                        self._live.pop(update.job_id, None)
                        self._previews.pop(update.job_id, None)

    def _mark_all(self, job_ids: set[str]) -> None:
        with self._lock:
            self._dirty |= job_ids

    def _update(self, job_id: str, job: Job) -> Update:
        preview = job.preview if job.preview is not self._previews.get(job_id) else None
        if preview is not None:
            self._previews[job_id] = preview
        return Update(
            job_id=job_id,
            status=job.status,
            started_at=job.started_at,
            finished_at=job.finished_at,
            progress=job.progress,
            preview=preview,
            result=job.result if job.status is JobStatus.SUCCEEDED else None,
            error=job.error,
            request=light(job.request),
        )


class EngineReplica:
    """The deployment's class (app.py adds the multiplexed `resident` loader with the model budget)."""

    async def __init__(self, settings: Settings) -> None:  # type: ignore[misc]  # Serve awaits it
        from ray import serve

        _log_to_stderr(settings)
        self.settings = settings
        self.id = serve.get_replica_context().replica_id.unique_id
        budget = settings.models_per_replica or settings.max_loaded_models
        # Room for the base model beyond Serve's budget: the registry never unloads it.
        local = settings.model_copy(update={"max_loaded_models": budget + 1})
        self.engine = await asyncio.to_thread(_load_engine, local)
        self.metrics = Metrics()
        self.scheduler = Scheduler(
            self.engine,
            max_queue=max(settings.max_queue, replica_queue(settings)),
            max_batch_size=settings.max_batch_size,
            batch_window_s=settings.batch_window_ms / 1000,
            queue_timeout_s=settings.queue_timeout,
            jobs=JobStore(ttl_s=60.0, max_kept=replica_queue(settings)),
            metrics=self.metrics,
            batching=settings.batching,
            switch_after_steps=settings.switch_after_steps,
        )
        add_engine_gauges(self.metrics, self.scheduler, self.engine)
        self.scheduler.start()
        self.board = board_handle(settings)
        self.reporter = Reporter(self.board, self.id, self.scheduler)
        self.jobs_done = 0
        self._tasks = [asyncio.ensure_future(self.reporter.run()), asyncio.ensure_future(self._heartbeats())]
        await self.resident(self.engine.registry.base_name)  # so Serve routes the base model here too
        log.info("engine replica %s ready on %s", self.id, describe_device(self.engine.registry.device))

    async def resident(self, name: str) -> Resident:  # replaced by the multiplexed loader (app.py)
        return await self._load_resident(name)

    async def _load_resident(self, name: str) -> Resident:
        await asyncio.to_thread(self.engine.registry.get, name)
        return Resident(self.engine.registry, name)

    async def generate(self, work: Work) -> JobView | None:
        """Run one job; the finished job (None: it was no longer wanted when it arrived)."""
        if not await self.board.claim.remote(work.job_id, self.id):
            return None
        try:
            await self.resident(work.request.model or self.engine.registry.base_name)
            submit = partial(self.scheduler.submit, work.request, preview_every=work.preview_every)
            local = await asyncio.to_thread(submit)
        except SDServerError as error:  # bad input for this model, or the model failed to load
            failed = Update(work.job_id, JobStatus.FAILED, finished_at=time.time(), error=error)
            await self.board.sync.remote(self.id, [failed], [])
            return JobView(work.job_id, JobStatus.FAILED, light(work.request), None, time.time(), error=error)
        self.reporter.track(work.job_id, local)
        try:
            await local.wait_async()
        except SDServerError:
            pass  # the outcome goes to the board and back in the view
        except asyncio.CancelledError:  # the ingress gave up on it (its shutdown)
            self.scheduler.cancel(local.id)
            raise
        await self.reporter.flush()
        self.jobs_done += 1
        return dataclasses.replace(view_of(local), id=work.job_id, replica=self.id)

    async def load(self, name: str) -> None:
        """Load a model here (POST /models/{name}/load reaches a replica chosen by model affinity)."""
        await self.resident(name)

    def check_health(self) -> None:
        """Serve restarts a replica whose worker thread died."""
        if not self.scheduler.alive:
            raise RuntimeError("the engine's worker thread stopped")

    async def _heartbeats(self) -> None:
        after = await self.board.last_command.remote()
        while True:
            try:
                commands = await self.board.heartbeat.remote(self.member(), after)
            except Exception as exc:
                log.warning("cannot reach the job board: %s", exc)
                commands = []
            for number, kind, argument in commands:
                after = number
                await asyncio.to_thread(self._obey, kind, argument)
            await asyncio.sleep(HEARTBEAT_S)

    def _obey(self, kind: str, argument: str | None) -> None:
        registry = self.engine.registry
        try:
            if kind == "refresh":
                registry.refresh()
            elif kind == "unload" and argument is not None and registry.is_loaded(argument):
                registry.unload(argument)
        except SDServerError as exc:
            log.info("%s %s: %s", kind, argument or "", exc.message)

    def member(self) -> Member:
        import ray

        registry = self.engine.registry
        loaded = registry.loaded_names()
        return Member(
            id=self.id,
            kind="engine",
            node_id=ray.get_runtime_context().get_node_id(),
            node_ip=ray.util.get_node_ip_address(),
            pid=os.getpid(),
            device=describe_device(registry.device),
            base=registry.base_name,
            models=loaded,
            native_sizes={name: self.engine.native_size(name) or 0 for name in loaded},
            hashes={name: registry.weights_hash(name) or "" for name in loaded},
            queue_depth=self.scheduler.queue_depth,
            running_jobs=self.reporter.running,
            running_rows=self.scheduler.running_rows,
            accepting=self.scheduler.accepting,
            jobs_done=self.jobs_done,
            metrics=self.metrics.render(),
        )

    def __del__(self) -> None:
        """Serve's graceful shutdown: finish what is queued here (up to --drain-timeout), then stop."""
        scheduler: Scheduler | None = getattr(self, "scheduler", None)
        if scheduler is not None:
            scheduler.drain(self.settings.drain_timeout)
            scheduler.stop()


def replica_queue(settings: Settings) -> int:
    """Requests one replica holds at once (Serve's max_ongoing_requests)."""
    return settings.replica_queue or 2 * settings.max_batch_size


def _load_engine(settings: Settings) -> Engine:
    engine = Engine.from_settings(settings)
    engine.load()
    return engine


def _log_to_stderr(settings: Settings) -> None:
    """sdserver's log lines go to the worker's stderr (Ray forwards them to the driver and log files);
    no progress bars from the libraries (as `sdserver serve`)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    logger = logging.getLogger("sdserver")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
