"""The scheduler's queue, batcher and worker, driven by a fake engine that controls timing and faults.

(The real pipelines run through the scheduler in every HTTP test; here we need to hold the worker
still or make it fail on cue.)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence

import pytest
from PIL import Image

from sdserver.core.errors import Cancelled, GenerationError, OutOfMemory, Overloaded, Timeout, Unavailable
from sdserver.core.types import GeneratedImage, GenerationRequest
from sdserver.service.jobs import JobStatus
from sdserver.service.scheduler import Scheduler, StepCallback
from tests.conftest import wait_until


class FakeEngine:
    def __init__(self, steps: int = 3) -> None:
        self.calls: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.steps = steps
        self.fail_on: str | None = None
        self.oom = False

    def prepare(self, request: GenerationRequest) -> GenerationRequest:
        return request.model_copy(update={"model": request.model or "base", "width": 8, "height": 8})

    def run(self, requests: Sequence[GenerationRequest], on_step: StepCallback) -> list[list[GeneratedImage]]:
        self.calls.append([r.prompt for r in requests])
        self.started.set()
        if self.oom:
            raise OutOfMemory("out of memory")
        if self.fail_on and any(r.prompt == self.fail_on for r in requests):
            raise GenerationError(f"cannot draw {self.fail_on}")
        for step in range(1, self.steps + 1):
            self.gate.wait(5)
            on_step(step, self.steps, lambda step=step: [Image.new("RGB", (1, 1), (step, 0, 0))] * 8)
        return [[GeneratedImage(Image.new("RGB", (8, 8)), seed, False) for seed in r.seeds] for r in requests]


def request(prompt: str = "p", **fields: object) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, **fields)  # type: ignore[arg-type]


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def scheduler(engine: FakeEngine) -> Iterator[Scheduler]:
    s = Scheduler(engine, max_queue=3, max_batch_size=4, batch_window_s=0.05)
    s.start()
    yield s
    engine.gate.set()
    s.stop()


def hold(engine: FakeEngine, scheduler: Scheduler) -> None:
    """Occupy the worker with a running job, so later submissions stay queued."""
    engine.gate.clear()
    scheduler.submit(request("blocker", steps=99))
    assert engine.started.wait(5)


def test_seed_is_fixed_at_submit(scheduler: Scheduler) -> None:
    job = scheduler.submit(request(num_images=3))
    assert job.request.seed is not None
    assert [image.seed for image in job.wait(5).images] == job.request.seeds


def test_compatible_requests_share_one_call(engine: FakeEngine, scheduler: Scheduler) -> None:
    hold(engine, scheduler)
    jobs = [scheduler.submit(request(f"p{i}")) for i in range(3)]
    engine.gate.set()
    for job in jobs:
        job.wait(5)
    assert engine.calls[1] == ["p0", "p1", "p2"]


def test_incompatible_requests_run_apart(engine: FakeEngine, scheduler: Scheduler) -> None:
    hold(engine, scheduler)
    a = scheduler.submit(request("a", steps=10))
    b = scheduler.submit(request("b", steps=20))
    engine.gate.set()
    a.wait(5), b.wait(5)
    assert engine.calls[1:] == [["a"], ["b"]]


def test_batch_never_exceeds_max_images(engine: FakeEngine, scheduler: Scheduler) -> None:
    hold(engine, scheduler)
    jobs = [scheduler.submit(request(f"p{i}", num_images=3)) for i in range(2)]
    engine.gate.set()
    for job in jobs:
        job.wait(5)
    assert engine.calls[1:] == [["p0"], ["p1"]]


def test_full_queue_is_refused(engine: FakeEngine, scheduler: Scheduler) -> None:
    hold(engine, scheduler)
    for i in range(3):
        scheduler.submit(request(f"q{i}"))
    with pytest.raises(Overloaded, match="queue is full"):
        scheduler.submit(request("one too many"))


def test_failing_request_does_not_fail_its_neighbours(engine: FakeEngine, scheduler: Scheduler) -> None:
    hold(engine, scheduler)
    engine.fail_on = "bad"
    good, bad, other = (scheduler.submit(request(p)) for p in ("good", "bad", "other"))
    engine.gate.set()
    assert good.wait(5).images and other.wait(5).images
    with pytest.raises(GenerationError, match="cannot draw bad"):
        bad.wait(5)
    assert bad.status is JobStatus.FAILED
    assert scheduler.submit(request("after")).wait(5).images  # the worker lives on


def test_out_of_memory_fails_the_batch_and_the_next_request_works(engine: FakeEngine, scheduler: Scheduler) -> None:
    engine.oom = True
    with pytest.raises(OutOfMemory):
        scheduler.submit(request("big")).wait(5)
    engine.oom = False
    assert scheduler.submit(request("small")).wait(5).images


def test_cancel_queued_job(engine: FakeEngine, scheduler: Scheduler) -> None:
    hold(engine, scheduler)
    job = scheduler.submit(request("waiting"))
    scheduler.cancel(job.id)
    assert job.status is JobStatus.CANCELLED
    engine.gate.set()
    with pytest.raises(Cancelled):
        job.wait(5)
    assert ["waiting"] not in engine.calls


def test_cancel_running_job_stops_at_next_step(engine: FakeEngine, scheduler: Scheduler) -> None:
    engine.gate.clear()
    job = scheduler.submit(request("long", steps=50))
    assert engine.started.wait(5)
    scheduler.cancel(job.id)
    engine.gate.set()
    with pytest.raises(Cancelled):
        job.wait(5)
    assert job.progress is not None and job.progress.step == 1


def test_expired_job_is_dropped_before_running(engine: FakeEngine) -> None:
    scheduler = Scheduler(engine, queue_timeout_s=0.05, batch_window_s=0)
    scheduler.start()
    try:
        hold(engine, scheduler)
        job = scheduler.submit(request("late"))
        time.sleep(0.1)
        engine.gate.set()
        with pytest.raises(Timeout, match="waited"):
            job.wait(5)
        assert ["late"] not in engine.calls
    finally:
        scheduler.stop()


def test_drain_finishes_queued_and_running_work_and_refuses_new(engine: FakeEngine, scheduler: Scheduler) -> None:
    hold(engine, scheduler)
    (running,) = scheduler.jobs.all()
    queued = scheduler.submit(request("queued", steps=7))
    drained: list[bool] = []
    drainer = threading.Thread(target=lambda: drained.append(scheduler.drain(timeout=10)))
    drainer.start()
    with pytest.raises(Unavailable):
        wait_for_refusal(scheduler)
    engine.gate.set()
    drainer.join(10)
    assert drained == [True]
    assert running.wait(5).images and queued.wait(5).images


def wait_for_refusal(scheduler: Scheduler) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        scheduler.submit(request("late"))  # raises Unavailable once draining has begun
        time.sleep(0.01)


def test_drain_gives_up_after_its_timeout(engine: FakeEngine, scheduler: Scheduler) -> None:
    hold(engine, scheduler)
    assert scheduler.drain(timeout=0.1) is False


def test_stop_fails_queued_jobs_and_stops_the_running_one_clearly(engine: FakeEngine, scheduler: Scheduler) -> None:
    hold(engine, scheduler)
    (running,) = scheduler.jobs.all()
    queued = scheduler.submit(request("queued"))
    stopper = threading.Thread(target=scheduler.stop)
    stopper.start()
    with pytest.raises(Unavailable, match="shutting down"):
        queued.wait(5)
    engine.gate.set()
    stopper.join(5)
    with pytest.raises(Unavailable, match="shut down before"):
        running.wait(5)
    with pytest.raises(Unavailable):
        scheduler.submit(request("after stop"))


def test_a_dead_worker_fails_waiting_jobs_and_reports_it(engine: FakeEngine) -> None:
    deaths: list[bool] = []
    scheduler = Scheduler(engine, on_worker_death=lambda: deaths.append(True))
    scheduler.start()
    hold(engine, scheduler)
    queued = scheduler.submit(request("queued"))
    scheduler._run = None  # type: ignore[assignment, method-assign]  # the next batch crashes the worker loop
    engine.gate.set()
    with pytest.raises(Unavailable, match="worker stopped"):
        queued.wait(5)
    wait_until(lambda: not scheduler.alive)
    assert deaths == [True]
    with pytest.raises(Unavailable):
        scheduler.submit(request("after death"))
