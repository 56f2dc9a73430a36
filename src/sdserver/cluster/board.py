"""The job board: every job of the cluster and the history, in one Ray actor.

Why an actor rather than a store such as Redis: it needs no service beside Ray, it lives and dies with
the cluster, and Ray runs its calls one at a time, so "add unless the Idempotency-Key is known",
"claim unless cancelled" and "requeue unless finished" are atomic without locks. It holds what one
server holds in memory (the jobs kept for --job-ttl, their images) and writes the history, so each
image is saved once, on the node it runs on (the head node). A restarted board has forgotten the jobs
in flight (as a restarted server would); the history on disk stays.

Who calls what:
- ingresses: `add`, `view`, `views`, `cancel`, `watch` (long poll: the jobs they follow that changed),
  `replica_lost` (the replica a dispatched job was on died), the history's reads;
- engine replicas: `claim` (before running a job), `sync` (their jobs' progress and outcomes; the
  answer names the jobs to drop: cancelled, finished, or moved to another replica);
- both: `heartbeat` (state for /v1/cluster, /ready and /metrics; the answer carries commands such as
  "rescan models_dir" or "unload model X").

The class is plain Python (tested in-process); `board_handle` runs it as a named, detached actor.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sdserver.core.errors import (
    Cancelled,
    GenerationError,
    NotFound,
    Overloaded,
    SDServerError,
    Timeout,
    Unavailable,
)
from sdserver.core.types import GenerationRequest
from sdserver.service import history as kept
from sdserver.service.history import History
from sdserver.service.jobs import Job, JobStatus, JobStore
from sdserver.settings import Settings

from .views import Command, JobView, Member, Update, view_of

STALE_S = 5.0  # a member silent this long is down (heartbeats come every second)
FORGET_S = 120.0  # and is forgotten after this long
ORPHAN_S = 30.0  # a job whose ingress and replica have both been silent this long fails
NAMESPACE = "sdserver"
Owner = Callable[[str | None], bool]  # may the caller see a job of this owner? (security.Principal.owns)
LOST = "the engine replica running this request stopped before it finished (its process or node died); send it again"


@dataclass
class _Meta:
    """The board's bookkeeping of one job."""

    ingress: str  # the one that dispatches it to the replicas
    followers: set[str] = field(default_factory=set)  # ingresses to tell of its changes
    replica: str | None = None  # the engine replica that claimed it
    preview_seq: int = 0
    version: int = 0  # changes so far
    reruns: int = 0  # times it was run again after its replica died while running it


@dataclass
class _Inbox:
    """What changed for one ingress since it last asked."""

    changed: set[str] = field(default_factory=set)
    event: asyncio.Event = field(default_factory=asyncio.Event)
    seen: float = field(default_factory=time.time)


class JobBoard:
    def __init__(self, settings: Settings) -> None:
        self._meta: dict[str, _Meta] = {}
        self._inboxes: dict[str, _Inbox] = {}
        self._members: dict[str, Member] = {}
        self._commands: list[Command] = []
        self._reaped_at = 0.0
        self.history: History | None = None
        self.configure(settings)

    def configure(self, settings: Settings) -> None:
        """(Re)apply the settings; a running board keeps its jobs."""
        self.max_queue, self.queue_timeout = settings.max_queue, settings.queue_timeout
        if not hasattr(self, "jobs"):
            self.jobs = JobStore()
        self.jobs.ttl_s, self.jobs.max_kept = settings.job_ttl, settings.max_jobs_kept
        history = History.from_settings(settings)
        if self.history is None or (history.folder, history.mode, history.max_bytes) != (
            self.history.folder,
            self.history.mode,
            self.history.max_bytes,
        ):
            if self.history is not None:
                self.history.close()
            self.history = history

    async def reconfigure(self, settings: Settings) -> None:
        self.configure(settings)

    # -- jobs, for the ingresses ------------------------------------------------------------------
    async def add(
        self,
        job_id: str,
        request: GenerationRequest,
        *,
        ingress: str,
        preview_every: int = 0,
        save: bool = False,
        owner: str | None = None,
        idempotency_key: str | None = None,
        fingerprint: str | None = None,
    ) -> JobView | SDServerError:
        """Register a job an ingress is about to dispatch; an Idempotency-Key its owner used before gives
        that job back (the same request), or is refused (another request)."""
        if idempotency_key:
            try:
                existing = self.jobs.by_idempotency_key(idempotency_key, owner, fingerprint)
            except SDServerError as exc:
                return exc
            if existing is not None:
                return self._view(existing, follower=ingress)
        waiting = sum(job.status is JobStatus.QUEUED for job in self.jobs.all())
        room = self.max_queue * max(1, len(self.engines_up()))
        if waiting >= room:
            return Overloaded(f"the queue is full ({waiting} waiting over the cluster's replicas); retry shortly")
        job = Job(request=request, id=job_id, preview_every=preview_every, owner=owner, fingerprint=fingerprint)
        self._meta[job_id] = _Meta(ingress=ingress, followers={ingress})
        job.add_listener(self._changed)
        assert self.history is not None
        self.history.track(job, asked=save)
        self.jobs.add(job, idempotency_key)
        self._forget_pruned()
        return self._view(job)

    async def view(
        self, job_id: str, follower: str | None = None, owner: Owner | None = None
    ) -> JobView | SDServerError:
        """The job (with its images); `follower` is told of its changes from now on. `owner`: a test of
        the job's owner (the caller's key); a job that fails it is not found."""
        try:
            return self._view(self.jobs.get(job_id, owner), follower=follower)
        except NotFound as exc:
            return exc

    async def views(self, owner: Owner | None = None) -> list[JobView]:
        """Every job kept (whose owner passes `owner`), oldest first, without images."""
        order = self._queue_order()
        return [
            view_of(job, queue_position=order.get(job.id), replica=self._meta_of(job).replica, with_result=False)
            for job in self.jobs.all(owner)
        ]

    async def cancel(self, job_id: str, owner: Owner | None = None) -> JobView | SDServerError:
        """A queued job is cancelled now; a running one at its next step (its replica hears of it)."""
        try:
            job = self.jobs.get(job_id, owner)
        except NotFound as exc:
            return exc
        job.cancel_requested = True
        if job.status is JobStatus.QUEUED:
            job.fail(Cancelled("cancelled while queued"))
        return self._view(job)

    async def fail(self, job_id: str, error: SDServerError) -> None:
        job = self._find(job_id)
        if job is not None:
            job.fail(error)

    async def replica_lost(self, job_id: str, retry_running: int) -> bool:
        """The replica a job was sent to died. True: send it again (it had not started, or may run again);
        False: it is finished (now failed with 503, or it had finished before)."""
        job = self._find(job_id)
        if job is None:
            return True  # the board restarted meanwhile: the dispatching ingress still has it
        if job.done:
            return False
        meta = self._meta_of(job)
        if job.status is JobStatus.RUNNING:
            if meta.reruns >= retry_running:
                job.fail(Unavailable(LOST))
                return False
            meta.reruns += 1
            job.requeue()
        meta.replica = None
        return True

    async def watch(self, ingress: str, timeout: float) -> list[JobView]:
        """Long poll: the jobs `ingress` follows that changed, as soon as one does (or [] after `timeout`)."""
        inbox = self._inboxes.setdefault(ingress, _Inbox())
        inbox.seen = time.time()
        if not inbox.changed:
            inbox.event.clear()
            try:
                await asyncio.wait_for(inbox.event.wait(), timeout)
            except TimeoutError:
                return []
        changed, inbox.changed = inbox.changed, set()
        views = []
        for job_id in changed:
            job = self._find(job_id)
            if job is not None:
                views.append(self._view(job))
                if job.done:
                    self._meta_of(job).followers.discard(ingress)
        return views

    # -- the history (written here only) ----------------------------------------------------------
    async def wait_history(self, job_id: str, timeout: float) -> tuple[list[str | None] | None, list[str]]:
        """Once the job's images are saved (or failed to be): their ids and the job's warnings."""
        job = self._find(job_id)
        if job is None:
            return None, []
        assert self.history is not None
        await asyncio.to_thread(self.history.wait, job, timeout)
        return job.history_ids, list(job.warnings)

    async def history_call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """One of History's reads or deletes (`list`, `get`, `delete`, `read`); its SDServerError is returned."""
        assert self.history is not None
        calls: dict[str, Callable[..., Any]] = {
            "list": self.history.list,
            "get": self.history.get,
            "delete": self.history.delete,
            "read": self._read_image,
        }
        try:
            return await asyncio.to_thread(calls[method], *args, **kwargs)
        except SDServerError as exc:
            return exc

    def _read_image(self, entry: kept.Entry) -> bytes:
        assert self.history is not None
        try:
            return self.history.path(entry).read_bytes()
        except OSError as exc:
            raise NotFound(f"the image file of history item {entry.id!r} cannot be read: {exc}", field="id") from None

    # -- for the engine replicas ------------------------------------------------------------------
    async def claim(self, job_id: str, replica: str) -> bool:
        """May `replica` run the job? No if it was cancelled, finished or waited past --queue-timeout."""
        job = self._find(job_id)
        if job is None:
            return True  # the board restarted meanwhile: the ingress still waits for the outcome
        if job.done or job.cancel_requested:
            return False
        if self.queue_timeout is not None and time.time() - job.created_at > self.queue_timeout:
            job.fail(Timeout(f"the request waited over {self.queue_timeout:g}s in the queue and was dropped"))
            return False
        self._meta_of(job).replica = replica
        return True

    async def sync(self, replica: str, updates: list[Update], live: list[str]) -> list[str]:
        """Apply a replica's news of its jobs; answer which of its `live` jobs it should drop."""
        for update in updates:
            self._apply(replica, update)
        drop = []
        for job_id in live:
            job = self._find(job_id)
            if job is not None and (job.done or job.cancel_requested or self._meta_of(job).replica != replica):
                drop.append(job_id)
        return drop

    def _apply(self, replica: str, update: Update) -> None:
        job = self._find(update.job_id)
        if job is None or job.done or self._meta_of(job).replica != replica:
            return  # unknown, finished, or moved to another replica meanwhile
        meta = self._meta_of(job)
        if update.request is not None:
            job.request = update.request
        if job.status is JobStatus.QUEUED and update.started_at is not None:
            job.mark_running()
            job.started_at = update.started_at
        if update.status is JobStatus.RUNNING and update.progress is not None:
            if update.preview is not None:
                meta.preview_seq += 1
            job.report(update.progress, update.preview)
        if update.status.finished:
            job.progress = update.progress or job.progress
            if update.status is JobStatus.SUCCEEDED and update.result is not None:
                job.succeed(update.result)
            else:
                job.fail(update.error or GenerationError("the engine replica reported a failure without a reason"))
            job.finished_at = update.finished_at or job.finished_at

    # -- members: heartbeats, commands ------------------------------------------------------------
    async def heartbeat(self, member: Member, after: int) -> list[Command]:
        """Record a member's state; answer the commands issued after its last one."""
        member.at = time.time()
        self._members[member.id] = member
        if member.kind == "ingress":
            self._inboxes.setdefault(member.id, _Inbox()).seen = member.at
        self._reap(member.at)
        return [command for command in self._commands if command[0] > after]

    async def command(self, kind: str, argument: str | None = None) -> int:
        """Issue a command to every member (e.g. "refresh", or "unload" a model); returns its number."""
        number = self._commands[-1][0] + 1 if self._commands else 1
        self._commands = [*self._commands[-99:], (number, kind, argument)]
        return number

    async def last_command(self) -> int:
        return self._commands[-1][0] if self._commands else 0

    async def members(self) -> tuple[float, list[Member], dict[str, int]]:
        """(the board's clock, every member's last heartbeat, jobs by status)."""
        counts = {"queued": 0, "running": 0}
        for job in self.jobs.all():
            if job.status.value in counts:
                counts[job.status.value] += 1
        return time.time(), list(self._members.values()), counts

    def engines_up(self, now: float | None = None) -> list[Member]:
        now = time.time() if now is None else now
        return [m for m in self._members.values() if m.kind == "engine" and now - m.at < STALE_S and m.accepting]

    # -- internals --------------------------------------------------------------------------------
    def _find(self, job_id: str) -> Job | None:
        try:
            return self.jobs.get(job_id)
        except NotFound:
            return None

    def _meta_of(self, job: Job) -> _Meta:
        return self._meta.setdefault(job.id, _Meta(ingress=""))

    def _view(self, job: Job, *, follower: str | None = None, with_result: bool = True) -> JobView:
        meta = self._meta_of(job)
        if follower is not None and not job.done:
            meta.followers.add(follower)
        position = self._queue_order().get(job.id) if job.status is JobStatus.QUEUED else None
        return view_of(
            job,
            preview_seq=meta.preview_seq,
            queue_position=position,
            replica=meta.replica,
            with_result=with_result,
            version=meta.version,
        )

    def _queue_order(self) -> dict[str, int]:
        waiting = sorted((job for job in self.jobs.all() if job.status is JobStatus.QUEUED), key=lambda j: j.created_at)
        return {job.id: index for index, job in enumerate(waiting)}

    def _changed(self, job: Job) -> None:
        """Job listener: tell the ingresses that follow it."""
        meta = self._meta.get(job.id)
        if meta is None:
            return
        meta.version += 1
        for ingress in meta.followers:
            inbox = self._inboxes.setdefault(ingress, _Inbox())
            inbox.changed.add(job.id)
            inbox.event.set()

    def _forget_pruned(self) -> None:
        kept_ids = {job.id for job in self.jobs.all()}
        for job_id in [job_id for job_id in self._meta if job_id not in kept_ids]:
            del self._meta[job_id]

    def _reap(self, now: float) -> None:
        """At most once a second: forget long-silent members, and fail the jobs nobody can finish any
        more (their ingress and their replica both silent for ORPHAN_S), so no client waits forever."""
        if now - self._reaped_at < 1.0:
            return
        self._reaped_at = now
        for member_id, member in list(self._members.items()):
            if now - member.at > FORGET_S:
                del self._members[member_id]
        for ingress, inbox in list(self._inboxes.items()):
            if now - inbox.seen > FORGET_S:
                del self._inboxes[ingress]
        for job in self.jobs.all():
            if job.done or now - job.created_at < ORPHAN_S:
                continue
            meta = self._meta_of(job)
            if self._silent(meta.ingress, now) and (meta.replica is None or self._silent(meta.replica, now)):
                job.fail(Unavailable("the parts of the cluster handling this request stopped; send it again"))

    def _silent(self, member_id: str, now: float) -> bool:
        member = self._members.get(member_id)
        return member is None or now - member.at > ORPHAN_S


def board_name(app_name: str) -> str:
    return f"sdserver-board-{app_name}"


def board_handle(settings: Settings) -> Any:
    """The application's board actor, created on the head node by whoever asks first."""
    import ray

    actor = ray.remote(JobBoard).options(
        name=board_name(settings.ray_app_name),
        namespace=NAMESPACE,
        get_if_exists=True,
        lifetime="detached",
        max_restarts=-1,  # restarted empty if it ever dies (jobs in flight still end: see ClusterScheduler)
        num_cpus=0,
        max_concurrency=1000,
        resources={"node:__internal_head__": 0.001},
    )
    return actor.remote(settings)
