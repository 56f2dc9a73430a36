"""The ingress's scheduler: the surface of service.scheduler.Scheduler that the routes use, with the
jobs on the board and the work on the engine replicas.

- `submit` checks what it can without the model (the replica checks the rest: such a job fails with
  the same error), registers the job on the board and dispatches it to the replicas; it returns a
  local mirror Job at once, kept up to date from the board, so waiting clients, event streams and
  webhooks work as in one process.
- A dispatched request waits in Ray Serve's router until a replica has room (--replica-queue), and
  goes to one that has its model loaded (multiplexing). If that replica dies, the board says whether
  the job had started: if not it is sent again (to another replica); if it had, it fails with 503,
  or runs again --retry-running times (it is seeded: the same images).
- `get`, `cancel`, the queue listing: through the board, so any ingress sees any job.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future

from sdserver.core.errors import GenerationError, Unavailable
from sdserver.core.types import GenerationRequest
from sdserver.service.jobs import Job, JobStatus
from sdserver.settings import Settings

from .board import Owner
from .catalog import ClusterEngine
from .state import Cluster
from .views import JobView, Member, Work, apply, light, mirror_of, snapshot_job

log = logging.getLogger(__name__)
DISPATCH_ATTEMPTS = 8  # a queued job is sent again at most this often when replicas die under it
WATCH_S = 10.0
HEARTBEAT_S = 1.0
MIRRORS_KEPT = 64  # finished jobs' mirrors kept here (the board keeps the jobs and their images)


class BoardJobs:
    """`scheduler.jobs`: what the routes read of the job store."""

    def __init__(self, scheduler: ClusterScheduler) -> None:
        self._scheduler = scheduler

    def all(self, owner: Owner | None = None) -> list[Job]:
        """Every job the board keeps (whose owner passes `owner`), as it is now (copies, without images)."""
        views: list[JobView] = self._scheduler.cluster.call(self._scheduler.cluster.board.views.remote(owner))
        self._scheduler.note_positions(views)
        return [snapshot_job(view) for view in views]


class ClusterScheduler:
    def __init__(
        self, cluster: Cluster, catalog: ClusterEngine, settings: Settings, own_metrics: Callable[[], bytes]
    ) -> None:
        self.cluster, self.catalog, self.settings = cluster, catalog, settings
        self.own_metrics = own_metrics  # this ingress's Prometheus text, for the other ingresses' /metrics
        self.jobs = BoardJobs(self)
        self._mirrors: OrderedDict[str, Job] = OrderedDict()
        self._seen_previews: dict[str, int] = {}
        self._versions: dict[str, int] = {}
        self._applying = threading.RLock()  # one view at a time reaches a mirror's listeners
        self._positions: dict[str, int | None] = {}
        self._lock = threading.Lock()
        self._dispatching: set[Future[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self._heartbeat(after=0)
        self._tasks = [asyncio.ensure_future(self._watch()), asyncio.ensure_future(self._heartbeats())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for future in list(self._dispatching):
            future.cancel()

    def stop_accepting(self) -> None:
        self.cluster.draining = True

    def drain(self, timeout: float) -> bool:
        """Stop accepting; wait up to `timeout` for the jobs this ingress dispatched."""
        self.stop_accepting()
        deadline = time.monotonic() + timeout
        while self._dispatching and time.monotonic() < deadline:
            time.sleep(0.1)
        return not self._dispatching

    @property
    def alive(self) -> bool:
        return bool(self.cluster.snapshot.engines_up)

    @property
    def accepting(self) -> bool:
        return self.alive and not self.cluster.draining

    @property
    def queue_depth(self) -> int:
        return self.cluster.snapshot.jobs.get("queued", 0)

    @property
    def running_rows(self) -> int:
        return sum(member.running_rows for member in self.cluster.snapshot.engines_up)

    # -- the Scheduler surface -------------------------------------------------------------------
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
        """Register and dispatch (call from a thread, as the routes do); bad input raises first.
        `owner`, `fingerprint`, `idempotency_key`: as Scheduler.submit."""
        name = self.catalog.check(request)
        if self.cluster.draining:
            raise Unavailable("the server is not accepting work (shutting down)")
        seeded = request.with_seed()
        job_id = uuid.uuid4().hex
        added = self.cluster.board.add.remote(
            job_id,
            light(seeded),
            ingress=self.cluster.ingress_id,
            preview_every=preview_every,
            save=save,
            owner=owner,
            idempotency_key=idempotency_key,
            fingerprint=fingerprint,
        )
        view: JobView = self.cluster.call(added)
        job = self.mirror(view)
        if view.id == job_id:  # new (not an earlier job with the same Idempotency-Key)
            assert self._loop is not None
            work = Work(job_id, seeded, preview_every)
            future = asyncio.run_coroutine_threadsafe(self._dispatch(job, work, name), self._loop)
            with self._lock:
                self._dispatching.add(future)
            future.add_done_callback(self._dispatched)
        return job

    def get(self, job_id: str, owner: Owner | None = None) -> Job:
        """The job (`owner`: a test of its owner; a job that fails it is not found)."""
        view: JobView = self.cluster.call(self.cluster.board.view.remote(job_id, self.cluster.ingress_id, owner))
        return self.mirror(view)

    def cancel(self, job_id: str, owner: Owner | None = None) -> Job:
        """Cancel a queued job now, a running one at its next denoising step (its replica hears of it)."""
        view: JobView = self.cluster.call(self.cluster.board.cancel.remote(job_id, owner))
        return self.mirror(view)

    def queue_position(self, job: Job) -> int | None:
        with self._lock:
            return self._positions.get(job.id) if job.status is JobStatus.QUEUED else None

    # -- mirrors ---------------------------------------------------------------------------------
    def mirror(self, view: JobView) -> Job:
        """The local Job for the view, created or brought up to date (a view older than one already
        applied is skipped, unless it is the outcome: the replica's answer carries no board version)."""
        with self._applying:
            with self._lock:
                job = self._mirrors.get(view.id)
                if job is None:
                    job = self._mirrors[view.id] = mirror_of(view)
                    self._note(view)
                    self._forget_old()
                    return job
                self._mirrors.move_to_end(view.id)
                if view.version < self._versions.get(view.id, 0) and not view.done:
                    return job
                new_preview = self._seen_previews.get(view.id) != view.preview_seq
                self._note(view)
            apply(job, view, new_preview=new_preview)
        return job

    def _note(self, view: JobView) -> None:
        self._versions[view.id] = max(view.version, self._versions.get(view.id, 0))
        self._seen_previews[view.id] = view.preview_seq
        self._positions[view.id] = view.queue_position

    def note_positions(self, views: list[JobView]) -> None:
        with self._lock:
            self._positions.update((view.id, view.queue_position) for view in views)

    def _forget_old(self) -> None:
        """Caller holds the lock; finished mirrors beyond MIRRORS_KEPT go (the board still has the jobs)."""
        excess = len(self._mirrors) - MIRRORS_KEPT
        for job_id in [job_id for job_id, job in self._mirrors.items() if job.done][: max(excess, 0)]:
            del self._mirrors[job_id]
            for seen in (self._seen_previews, self._versions, self._positions):
                seen.pop(job_id, None)

    # -- dispatching -----------------------------------------------------------------------------
    def _dispatched(self, future: Future[None]) -> None:
        with self._lock:
            self._dispatching.discard(future)

    async def _dispatch(self, job: Job, work: Work, model: str) -> None:
        """Send the job to the replicas until it is finished; never leave its waiting clients hanging."""
        try:
            await self._send(job, work, model)
            if not job.done:  # its outcome is on the board (e.g. cancelled while it waited in the ingress)
                view = await self.cluster.board.view.remote(job.id)
                if isinstance(view, JobView):
                    self.mirror(view)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the board unreachable
            log.warning("job %s: %s: %s", job.id, type(exc).__name__, exc)
        if not job.done:
            job.fail(Unavailable("the cluster lost track of this request (its job board restarted); send it again"))

    async def _send(self, job: Job, work: Work, model: str) -> None:
        handle = self.cluster.engines.options(multiplexed_model_id=model)
        board = self.cluster.board
        for attempt in range(DISPATCH_ATTEMPTS):
            try:
                view = await handle.generate.remote(work)
            except Exception as exc:
                if not replica_died(exc):
                    log.exception("job %s: its engine replica failed", job.id)
                    await board.fail.remote(job.id, GenerationError(f"internal error: {type(exc).__name__}"))
                    return
                log.warning("job %s: its engine replica stopped (%s)", job.id, type(exc).__name__)
                if not await board.replica_lost.remote(job.id, self.settings.retry_running):
                    return
                await asyncio.sleep(min(0.25 * 2**attempt, 4.0))
                continue
            if view is not None:
                self.mirror(view)
            return
        reason = f"no engine replica could run it ({DISPATCH_ATTEMPTS} tries); send it again"
        await board.fail.remote(job.id, Unavailable(reason))

    async def _watch(self) -> None:
        """Keep the mirrors that have listeners up to date: the board tells of the jobs that changed."""
        while True:
            try:
                views = await self.cluster.board.watch.remote(self.cluster.ingress_id, WATCH_S)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("cannot reach the job board: %s", exc)
                await asyncio.sleep(1.0)
                continue
            for view in views:
                self.mirror(view)

    async def _heartbeats(self) -> None:
        after = await self.cluster.board.last_command.remote()
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                after = await self._heartbeat(after)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("cannot reach the job board: %s", exc)

    async def _heartbeat(self, after: int) -> int:
        """Tell the board this ingress lives (with its metrics), obey its commands, refresh the snapshot."""
        member = Member(id=self.cluster.ingress_id, kind="ingress", pid=os.getpid(), metrics=self.own_metrics())
        member.node_id, member.node_ip = _node()
        commands = await self.cluster.board.heartbeat.remote(member, after)
        for number, kind, _ in commands:
            after = number
            if kind == "refresh":
                await asyncio.to_thread(self.catalog.catalogue.rescan)
        snapshot = await self.cluster.refresh()
        bases = {member.base for member in snapshot.engines if member.base}
        if len(bases) == 1:
            self.catalog.catalogue.adopt_base(bases.pop())
        return after


def replica_died(exc: BaseException) -> bool:
    """A Ray error that means the replica (its process or node) is gone or unreachable."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

    deaths = (ActorDiedError, ActorUnavailableError, RayActorError)
    return isinstance(exc, deaths) or (isinstance(exc, RayTaskError) and isinstance(exc.cause, deaths))


def _node() -> tuple[str, str]:
    import ray

    return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()
