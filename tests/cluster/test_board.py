"""The job board's rules, in-process (no Ray): claims, updates, cancels, replicas dying, followers,
the history written once, jobs nobody can finish any more. The Ray tests (test_ray.py) run it for real."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
from PIL import Image

from sdserver.cluster import board as board_module
from sdserver.cluster.board import JobBoard
from sdserver.cluster.scheduler import ClusterScheduler
from sdserver.cluster.views import JobView, Member, Update, apply, mirror_of
from sdserver.core.errors import Cancelled, InvalidRequest, NotFound, Overloaded, Unavailable
from sdserver.core.types import GeneratedImage, GenerationRequest, GenerationResult, Progress
from sdserver.metadata import attach
from sdserver.service.history import Query
from sdserver.service.jobs import JobStatus
from sdserver.settings import Settings

T = TypeVar("T")


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


@pytest.fixture
def board(tmp_path: Path) -> JobBoard:
    return JobBoard(Settings(outputs_dir=str(tmp_path / "outputs"), max_queue=3, queue_timeout=60))


REQUEST = GenerationRequest(prompt="a red circle", seed=7, model="tiny")


def add(board: JobBoard, job_id: str, *, save: bool = False, key: str | None = None) -> JobView:
    view = run(board.add(job_id, REQUEST, ingress="ingress-a", save=save, idempotency_key=key))
    assert isinstance(view, JobView)
    return view


def engine_up(board: JobBoard, replica: str = "replica-1") -> None:
    run(board.heartbeat(Member(id=replica, kind="engine"), after=0))


def image() -> Image.Image:
    picture = Image.new("RGB", (8, 8), (200, 30, 30))
    attach(picture, {"prompt": "a red circle", "model": "tiny", "seed": 7})
    return picture


def test_a_claimed_job_runs_and_succeeds_with_the_replicas_news(board: JobBoard) -> None:
    add(board, "j1")
    assert run(board.claim("j1", "replica-1"))
    started = time.time()
    news = [Update("j1", JobStatus.RUNNING, started_at=started, progress=Progress(1, 4))]
    assert run(board.sync("replica-1", news, ["j1"])) == []
    view = run(board.view("j1"))
    assert isinstance(view, JobView)
    assert (view.status, view.progress, view.started_at, view.replica) == (
        JobStatus.RUNNING,
        Progress(1, 4),
        started,
        "replica-1",
    )
    result = GenerationResult("tiny", [GeneratedImage(image(), 7, False)])
    done = Update("j1", JobStatus.SUCCEEDED, started, started + 1, Progress(4, 4), result=result)
    run(board.sync("replica-1", [done], ["j1"]))
    view = run(board.view("j1"))
    assert isinstance(view, JobView)
    assert view.status is JobStatus.SUCCEEDED and view.result is not None and view.finished_at == started + 1


def test_news_from_a_replica_that_no_longer_has_the_job_is_ignored(board: JobBoard) -> None:
    add(board, "j1")
    run(board.claim("j1", "replica-1"))
    assert run(board.replica_lost("j1", retry_running=0))  # had not started: sent again
    run(board.claim("j1", "replica-2"))
    late = Update("j1", JobStatus.FAILED, finished_at=time.time(), error=InvalidRequest("stale"))
    assert run(board.sync("replica-1", [late], ["j1"])) == ["j1"]  # and replica-1 is told to drop it
    view = run(board.view("j1"))
    assert isinstance(view, JobView) and view.status is JobStatus.QUEUED and view.replica == "replica-2"


def test_cancelling_a_queued_job_ends_it_at_once_and_no_replica_may_claim_it(board: JobBoard) -> None:
    add(board, "j1")
    view = run(board.cancel("j1"))
    assert isinstance(view, JobView) and view.status is JobStatus.CANCELLED
    assert not run(board.claim("j1", "replica-1"))


def test_cancelling_a_job_queued_on_a_replica_tells_that_replica_to_drop_it(board: JobBoard) -> None:
    add(board, "j1")
    run(board.claim("j1", "replica-1"))
    run(board.cancel("j1"))
    assert run(board.sync("replica-1", [], ["j1"])) == ["j1"]


def test_cancelling_a_running_job_waits_for_its_replica_to_stop_it(board: JobBoard) -> None:
    add(board, "j1")
    run(board.claim("j1", "replica-1"))
    run(board.sync("replica-1", [Update("j1", JobStatus.RUNNING, time.time(), progress=Progress(1, 9))], ["j1"]))
    view = run(board.cancel("j1"))
    assert isinstance(view, JobView) and view.status is JobStatus.RUNNING
    assert run(board.sync("replica-1", [], ["j1"])) == ["j1"]
    stopped = Update("j1", JobStatus.CANCELLED, time.time(), time.time(), error=Cancelled("cancelled while running"))
    run(board.sync("replica-1", [stopped], ["j1"]))
    view = run(board.view("j1"))
    assert isinstance(view, JobView) and view.status is JobStatus.CANCELLED


def test_a_replica_dying_under_a_running_job_fails_it_with_503_unless_it_may_run_again(board: JobBoard) -> None:
    for job_id in ("once", "twice"):
        add(board, job_id)
        run(board.claim(job_id, "replica-1"))
        run(board.sync("replica-1", [Update(job_id, JobStatus.RUNNING, time.time(), progress=Progress(1, 9))], []))
    assert not run(board.replica_lost("once", retry_running=0))
    failed = run(board.view("once"))
    assert isinstance(failed, JobView) and failed.status is JobStatus.FAILED
    assert isinstance(failed.error, Unavailable) and "send it again" in failed.error.message
    assert run(board.replica_lost("twice", retry_running=1))  # back in the queue, for another replica
    again = run(board.view("twice"))
    assert isinstance(again, JobView) and again.status is JobStatus.QUEUED and again.replica is None
    run(board.claim("twice", "replica-2"))
    run(board.sync("replica-2", [Update("twice", JobStatus.RUNNING, time.time(), progress=Progress(1, 9))], []))
    assert not run(board.replica_lost("twice", retry_running=1))  # only once


def test_a_finished_job_is_not_run_again_when_its_replica_dies_afterwards(board: JobBoard) -> None:
    add(board, "j1")
    run(board.cancel("j1"))
    assert not run(board.replica_lost("j1", retry_running=3))


def test_the_queue_limit_counts_waiting_jobs_over_the_replicas_up(board: JobBoard) -> None:
    for index in range(3):  # max_queue=3, no replica heard of yet: room for one replica's queue
        add(board, f"j{index}")
    assert isinstance(run(board.add("j3", REQUEST, ingress="ingress-a")), Overloaded)
    engine_up(board, "replica-1")
    engine_up(board, "replica-2")
    add(board, "j3")


def test_an_idempotency_key_gives_back_the_job_it_made(board: JobBoard) -> None:
    first = add(board, "j1", key="retry-me")
    again = add(board, "j2", key="retry-me")
    assert again.id == first.id == "j1"


def test_an_unknown_job_is_not_found(board: JobBoard) -> None:
    assert isinstance(run(board.view("nope")), NotFound)
    assert isinstance(run(board.cancel("nope")), NotFound)


def test_a_job_waiting_past_the_queue_timeout_is_not_claimed(tmp_path: Path) -> None:
    board = JobBoard(Settings(outputs_dir=str(tmp_path), queue_timeout=0.01))
    add(board, "j1")
    time.sleep(0.05)
    assert not run(board.claim("j1", "replica-1"))
    view = run(board.view("j1"))
    assert isinstance(view, JobView) and view.status is JobStatus.FAILED and "waited over" in str(view.error)


def test_followers_hear_of_each_change_of_their_jobs(board: JobBoard) -> None:
    async def scenario() -> list[list[str]]:
        await board.add("j1", REQUEST, ingress="ingress-a")
        await board.add("j2", REQUEST, ingress="ingress-b")
        await board.view("j2", follower="ingress-a")  # ingress-a streams j2 too
        waiting = asyncio.ensure_future(board.watch("ingress-a", timeout=5))
        await asyncio.sleep(0.01)
        await board.claim("j2", "replica-1")
        await board.sync("replica-1", [Update("j2", JobStatus.RUNNING, time.time(), progress=Progress(1, 2))], [])
        first = [view.id for view in await waiting]
        await board.cancel("j1")
        second = [view.id for view in await board.watch("ingress-a", timeout=5)]
        quiet = [view.id for view in await board.watch("ingress-a", timeout=0.05)]
        return [first, second, quiet]

    assert run(scenario()) == [["j2"], ["j1"], []]


def test_images_are_saved_once_in_the_boards_history(board: JobBoard) -> None:
    add(board, "j1", save=True)
    run(board.claim("j1", "replica-1"))
    result = GenerationResult("tiny", [GeneratedImage(image(), 7, False)])
    run(board.sync("replica-1", [Update("j1", JobStatus.SUCCEEDED, 1.0, 2.0, result=result)], []))
    ids, warnings = run(board.wait_history("j1", timeout=10))
    assert ids is not None and ids[0] is not None and warnings == []
    page = run(board.history_call("list", Query()))
    assert [entry.job_id for entry in page.entries] == ["j1"]
    entry = run(board.history_call("get", ids[0]))
    assert run(board.history_call("read", entry)).startswith(b"\x89PNG")
    assert isinstance(run(board.history_call("get", "missing")), NotFound)


def test_jobs_nobody_can_finish_fail_rather_than_wait(board: JobBoard, monkeypatch: pytest.MonkeyPatch) -> None:
    run(board.heartbeat(Member(id="ingress-a", kind="ingress"), after=0))
    add(board, "orphan")
    run(board.claim("orphan", "replica-1"))
    add(board, "fine")
    monkeypatch.setattr(board_module, "ORPHAN_S", 0.0)
    time.sleep(0.01)
    run(board.heartbeat(Member(id="ingress-a", kind="ingress"), after=0))  # ingress-a lives: nothing reaped
    assert all(view.status is JobStatus.QUEUED for view in run(board.views()))
    board._members.clear()  # ingress-a and replica-1 both gone
    board._reaped_at = 0.0
    run(board.heartbeat(Member(id="ingress-b", kind="ingress"), after=0))
    statuses = {view.id: view.status for view in run(board.views())}
    assert statuses == {"orphan": JobStatus.FAILED, "fine": JobStatus.FAILED}


def test_commands_reach_each_member_once(board: JobBoard) -> None:
    run(board.command("refresh"))
    number = run(board.command("unload", "other"))
    commands = run(board.heartbeat(Member(id="r", kind="engine"), after=0))
    assert commands == [(1, "refresh", None), (2, "unload", "other")]
    assert run(board.heartbeat(Member(id="r", kind="engine"), after=number)) == []


# -- mirrors: an ingress's local Job follows the board's ------------------------------------------
def test_a_mirror_goes_through_the_jobs_own_transitions(board: JobBoard) -> None:
    add(board, "j1")
    heard: list[JobStatus] = []
    mirror = mirror_of(_view(board, "j1"))
    mirror.add_listener(lambda job: heard.append(job.status))
    run(board.claim("j1", "replica-1"))
    run(board.sync("replica-1", [Update("j1", JobStatus.RUNNING, time.time(), progress=Progress(1, 4))], []))
    apply(mirror, _view(board, "j1"), new_preview=False)
    assert run(board.replica_lost("j1", retry_running=1))
    apply(mirror, _view(board, "j1"), new_preview=False)
    assert mirror.status is JobStatus.QUEUED and mirror.progress is None
    run(board.claim("j1", "replica-2"))
    result = GenerationResult("tiny", [GeneratedImage(image(), 7, False)])
    run(board.sync("replica-2", [Update("j1", JobStatus.SUCCEEDED, 5.0, 6.0, Progress(4, 4), result=result)], []))
    apply(mirror, _view(board, "j1"), new_preview=False)
    changes = [status for index, status in enumerate(heard) if index == 0 or heard[index - 1] is not status]
    assert changes == [JobStatus.RUNNING, JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.SUCCEEDED]
    assert mirror.wait(0).images[0].seed == 7
    assert (mirror.started_at, mirror.finished_at) == (5.0, 6.0)


def test_a_mirror_of_a_cancelled_job_raises_its_error_to_waiting_clients(board: JobBoard) -> None:
    add(board, "j1")
    mirror = mirror_of(_view(board, "j1"))
    run(board.cancel("j1"))
    apply(mirror, _view(board, "j1"), new_preview=False)
    assert mirror.status is JobStatus.CANCELLED and mirror.started_at is None
    with pytest.raises(Cancelled):
        mirror.wait(0)


def _view(board: JobBoard, job_id: str) -> JobView:
    view = run(board.view(job_id))
    assert isinstance(view, JobView)
    return view


def test_an_older_view_never_undoes_a_newer_one_but_the_outcome_always_lands(board: JobBoard) -> None:
    scheduler = ClusterScheduler(cast(Any, None), cast(Any, None), Settings(), lambda: b"")
    add(board, "j1")
    queued = _view(board, "j1")
    run(board.claim("j1", "replica-1"))
    run(board.sync("replica-1", [Update("j1", JobStatus.RUNNING, time.time(), progress=Progress(1, 4))], []))
    running = _view(board, "j1")
    mirror = scheduler.mirror(running)
    assert scheduler.mirror(queued) is mirror and mirror.status is JobStatus.RUNNING
    result = GenerationResult("tiny", [GeneratedImage(image(), 7, False)])
    answer = JobView("j1", JobStatus.SUCCEEDED, REQUEST, None, 0.0, 1.0, 2.0, result=result)  # a replica's, no version
    scheduler.mirror(answer)
    assert mirror.status is JobStatus.SUCCEEDED and mirror.wait(0) is result
