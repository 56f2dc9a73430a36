"""The scheduler's queue, batchers and worker, driven by a fake engine that controls timing and faults.

(The real pipelines run through the scheduler in every HTTP test; here we need to hold the worker
still or make it fail on cue.) Behaviour common to both batching modes is tested in both.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from PIL import Image

from sdserver.core.errors import Cancelled, GenerationError, OutOfMemory, Overloaded, Timeout, Unavailable
from sdserver.core.types import GeneratedImage, GenerationRequest, LoraRef
from sdserver.service.jobs import JobStatus
from sdserver.service.scheduler import Scheduler, StepCallback
from tests.conftest import wait_until


@dataclass(eq=False)
class FakeState:
    request: GenerationRequest
    total: int
    index: int = 0

    @property
    def done(self) -> bool:
        return self.index >= self.total


class FakeEngine:
    def __init__(self, steps: int = 3) -> None:
        self.calls: list[list[str]] = []  # request batching: prompts per call; step batching: per step
        self.sessions: list[str] = []  # step batching: the model of each session opened
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.steps = steps
        self.fail_on: str | None = None
        self.oom = False
        self.max_rows: int | None = None
        self.crash_in_finish = False

    def prepare(self, request: GenerationRequest) -> GenerationRequest:
        return request.model_copy(update={"model": request.model or "base", "width": 8, "height": 8})

    def _check(self, requests: Sequence[GenerationRequest]) -> None:
        if self.oom:
            raise OutOfMemory("out of memory")
        if self.fail_on and any(r.prompt == self.fail_on for r in requests):
            raise GenerationError(f"cannot draw {self.fail_on}")

    def run(self, requests: Sequence[GenerationRequest], on_step: StepCallback) -> list[list[GeneratedImage]]:
        self.calls.append([r.prompt for r in requests])
        self.started.set()
        self._check(requests)
        for step in range(1, self.steps + 1):
            self.gate.wait(5)
            on_step(step, self.steps, lambda step=step: [Image.new("RGB", (1, 1), (step, 0, 0))] * 8)
        return [_images(r) for r in requests]

    @contextmanager
    def session(self, name: str, loras: Sequence[LoraRef] = ()) -> Iterator[FakeEngine]:
        self.sessions.append(name)
        yield self

    def admit(self, request: GenerationRequest) -> FakeState:
        return FakeState(request, total=min(request.steps or self.steps, self.steps))

    def fits(self, states: Sequence[FakeState], requests: Sequence[GenerationRequest]) -> bool:
        """A memory budget of `max_rows` images per step (None: no budget)."""
        rows = sum(state.request.num_images for state in states if not state.done)
        return self.max_rows is None or rows + sum(r.num_images for r in requests) <= self.max_rows

    def step(self, states: Sequence[FakeState]) -> None:
        self.calls.append([state.request.prompt for state in states])
        self.started.set()
        self.gate.wait(5)
        self._check([state.request for state in states])
        for state in states:
            state.index += 1

    def previews(self, state: FakeState) -> list[Image.Image]:
        return [Image.new("RGB", (1, 1), (state.index, 0, 0))] * state.request.num_images

    def finish(self, states: Sequence[FakeState]) -> list[list[GeneratedImage]]:
        if self.crash_in_finish:
            raise KeyError("a bug")
        return [_images(state.request) for state in states]


def _images(request: GenerationRequest) -> list[GeneratedImage]:
    return [GeneratedImage(Image.new("RGB", (8, 8)), seed, False) for seed in request.seeds]


def request(prompt: str = "p", **fields: object) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, **fields)  # type: ignore[arg-type]


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture(params=["step", "request"])
def scheduler(engine: FakeEngine, request: Any) -> Iterator[Scheduler]:
    s = Scheduler(engine, max_queue=3, max_batch_size=4, batch_window_s=0.05, batching=request.param)
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


@pytest.fixture
def request_scheduler(engine: FakeEngine) -> Iterator[Scheduler]:
    s = Scheduler(engine, max_queue=3, max_batch_size=4, batch_window_s=0.05, batching="request")
    s.start()
    yield s
    engine.gate.set()
    s.stop()


@pytest.fixture
def step_scheduler(engine: FakeEngine) -> Iterator[Scheduler]:
    s = Scheduler(engine, max_queue=5, max_batch_size=4, batching="step", switch_after_steps=1)
    s.start()
    yield s
    engine.gate.set()
    s.stop()


class TestRequestBatching:
    def test_compatible_requests_share_one_call(self, engine: FakeEngine, request_scheduler: Scheduler) -> None:
        hold(engine, request_scheduler)
        jobs = [request_scheduler.submit(request(f"p{i}")) for i in range(3)]
        engine.gate.set()
        for job in jobs:
            job.wait(5)
        assert engine.calls[1] == ["p0", "p1", "p2"]

    def test_incompatible_requests_run_apart(self, engine: FakeEngine, request_scheduler: Scheduler) -> None:
        hold(engine, request_scheduler)
        a = request_scheduler.submit(request("a", steps=10))
        b = request_scheduler.submit(request("b", steps=20))
        engine.gate.set()
        a.wait(5), b.wait(5)
        assert engine.calls[1:] == [["a"], ["b"]]

    def test_batch_never_exceeds_max_images(self, engine: FakeEngine, request_scheduler: Scheduler) -> None:
        hold(engine, request_scheduler)
        jobs = [request_scheduler.submit(request(f"p{i}", num_images=3)) for i in range(2)]
        engine.gate.set()
        for job in jobs:
            job.wait(5)
        assert engine.calls[1:] == [["p0"], ["p1"]]


class TestStepBatching:
    def test_different_steps_and_guidance_share_every_step(self, engine: FakeEngine, step_scheduler: Scheduler) -> None:
        hold(engine, step_scheduler)
        jobs = [
            step_scheduler.submit(request("a", steps=2, guidance_scale=3)),
            step_scheduler.submit(request("b", steps=3, sampler="Euler a", guidance_scale=9)),
        ]
        engine.gate.set()
        for job in jobs:
            job.wait(5)
        assert engine.calls[1] == ["blocker", "a", "b"]  # joined the running blocker's next step
        assert engine.calls[2:] == [["blocker", "a", "b"], ["b"]]  # a leaves after its 2 steps, b after 3

    def test_progress_is_per_request(self, engine: FakeEngine, step_scheduler: Scheduler) -> None:
        hold(engine, step_scheduler)
        (blocker,) = step_scheduler.jobs.all()
        joiner = step_scheduler.submit(request("joiner", steps=2))
        engine.gate.set()
        joiner.wait(5), blocker.wait(5)
        assert joiner.progress is not None and (joiner.progress.step, joiner.progress.total) == (2, 2)
        assert blocker.progress is not None and (blocker.progress.step, blocker.progress.total) == (3, 3)

    def test_the_running_set_never_exceeds_max_images(self, engine: FakeEngine, step_scheduler: Scheduler) -> None:
        hold(engine, step_scheduler)
        jobs = [step_scheduler.submit(request(f"p{i}", num_images=3)) for i in range(2)]
        engine.gate.set()
        for job in jobs:
            job.wait(5)
        assert all(len([p for p in call if p.startswith("p")]) <= 1 for call in engine.calls)
        assert ["blocker", "p0"] in engine.calls

    def test_the_running_set_grows_only_while_the_engine_says_it_fits(
        self, engine: FakeEngine, step_scheduler: Scheduler
    ) -> None:
        engine.max_rows = 2  # a memory budget of two images per step (max_batch_size allows 4)
        hold(engine, step_scheduler)
        jobs = [step_scheduler.submit(request(f"p{i}")) for i in range(3)]
        engine.gate.set()
        for job in jobs:
            job.wait(5)
        assert all(len(call) <= 2 for call in engine.calls)
        assert ["blocker", "p0"] in engine.calls and ["p1", "p2"] in engine.calls

    def test_another_model_waits_a_bounded_number_of_steps(self, engine: FakeEngine, step_scheduler: Scheduler) -> None:
        engine.steps = 5
        hold(engine, step_scheduler)
        other = step_scheduler.submit(request("other", model="other"))
        later = step_scheduler.submit(request("same model, but later"))
        engine.gate.set()
        other.wait(5), later.wait(5)
        # one step after "other" arrived, the base model's set stopped taking newcomers: "other" went next
        assert engine.sessions == ["base", "other", "base"]
        assert ["blocker", "same model, but later"] not in engine.calls

    def test_a_bug_fails_the_running_set_clearly_and_the_worker_lives(
        self, engine: FakeEngine, step_scheduler: Scheduler
    ) -> None:
        engine.crash_in_finish = True
        with pytest.raises(GenerationError, match="internal error: KeyError"):
            step_scheduler.submit(request("unlucky")).wait(5)
        engine.crash_in_finish = False
        assert step_scheduler.submit(request("next")).wait(5).images

    def test_a_failing_member_leaves_alone_mid_run(self, engine: FakeEngine, step_scheduler: Scheduler) -> None:
        hold(engine, step_scheduler)
        (blocker,) = step_scheduler.jobs.all()
        bad = step_scheduler.submit(request("bad"))
        engine.fail_on = "bad"
        engine.gate.set()
        with pytest.raises(GenerationError, match="cannot draw bad"):
            bad.wait(5)
        assert blocker.wait(5).images and blocker.progress is not None and blocker.progress.step == 3


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


@pytest.mark.parametrize("batching", ["step", "request"])
def test_expired_job_is_dropped_before_running(engine: FakeEngine, batching: Any) -> None:
    scheduler = Scheduler(engine, queue_timeout_s=0.05, batch_window_s=0, batching=batching)
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


@pytest.mark.parametrize("batching", ["step", "request"])
def test_a_dead_worker_fails_waiting_jobs_and_reports_it(engine: FakeEngine, batching: Any) -> None:
    deaths: list[bool] = []
    scheduler = Scheduler(engine, on_worker_death=lambda: deaths.append(True), batching=batching)
    scheduler.start()
    hold(engine, scheduler)
    queued = scheduler.submit(request("queued", model="other"))  # it cannot join the running work
    scheduler._run = scheduler._run_group = None  # type: ignore[assignment, method-assign]  # the next job crashes the worker
    engine.gate.set()
    with pytest.raises(Unavailable, match="worker stopped"):
        queued.wait(5)
    wait_until(lambda: not scheduler.alive)
    assert deaths == [True]
    with pytest.raises(Unavailable):
        scheduler.submit(request("after death"))


class TestCalls:
    """Device work that is not a generation (an upscale) runs on the worker thread, in turn."""

    def test_a_call_runs_on_the_worker_thread_when_idle(self, scheduler: Scheduler) -> None:
        future = scheduler.call(lambda: threading.current_thread().name)
        assert future.result(5) == "sdserver-worker"

    def test_a_call_runs_between_the_steps_of_a_running_job(self, engine: FakeEngine, scheduler: Scheduler) -> None:
        engine.gate.clear()
        job = scheduler.submit(request("long", steps=3))
        assert engine.started.wait(5)
        future = scheduler.call(lambda: "done")
        engine.gate.set()
        assert future.result(5) == "done"
        job.wait(5)

    def test_a_failing_call_fails_alone(self, scheduler: Scheduler) -> None:
        def broken() -> None:
            raise ValueError("bad upscaler")

        with pytest.raises(ValueError, match="bad upscaler"):
            scheduler.call(broken).result(5)
        assert scheduler.submit(request()).wait(5).images

    def test_stop_answers_waiting_calls(self, engine: FakeEngine, scheduler: Scheduler) -> None:
        hold(engine, scheduler)
        future = scheduler.call(lambda: "never")
        scheduler.stop(timeout=0.1)
        with pytest.raises(Unavailable):
            future.result(5)
