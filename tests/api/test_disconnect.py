"""A synchronous client that hangs up cancels its request (needs a real server and socket)."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlencode

import pytest

from sdserver.core.types import GenerationRequest
from sdserver.service.jobs import Job, JobStatus
from tests.conftest import SIZE, LiveServer, spying, wait_until


class HangingUpServer(LiveServer):
    def job(self, prompt: str) -> Job | None:
        return next((job for job in self.scheduler.jobs.all() if job.request.prompt == prompt), None)

    def post_and_hang_up(self, path: str, fields: dict[str, object], until: Callable[[Job], bool]) -> Job:
        """Send the request, wait until its job satisfies `until`, then close the connection."""
        body = urlencode(fields).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        with socket.create_connection(("127.0.0.1", self.port)) as conn:
            conn.sendall(head + body)
            wait_until(lambda: (job := self.job(str(fields["prompt"]))) is not None and until(job))
        found = self.job(str(fields["prompt"]))
        assert found is not None
        return found


@pytest.fixture
def live(tiny_model: Path) -> Iterator[HangingUpServer]:
    server = HangingUpServer(model=str(tiny_model)).start()
    yield server
    server.stop()


def test_hanging_up_while_queued_removes_the_request(live: HangingUpServer) -> None:
    with spying(live.app) as spy:
        spy.gate.clear()
        blocker = live.scheduler.submit(GenerationRequest(prompt="blocker", width=SIZE, height=SIZE, steps=2))
        assert spy.entered.wait(30)
        fields = {"prompt": "abandoned", "width": SIZE, "height": SIZE}
        job = live.post_and_hang_up("/txt2img", fields, until=lambda job: job.status is JobStatus.QUEUED)
        wait_until(lambda: job.status is JobStatus.CANCELLED)
    blocker.wait(30)
    assert all("abandoned" not in call for call in spy.calls)


def test_hanging_up_while_running_stops_the_pipeline(live: HangingUpServer) -> None:
    fields = {"prompt": "long", "width": SIZE, "height": SIZE, "num_inference_steps": 150}
    job = live.post_and_hang_up("/txt2img", fields, until=lambda job: job.progress is not None)
    wait_until(lambda: job.done)
    assert job.status is JobStatus.CANCELLED
    assert job.progress is not None and job.progress.step < job.progress.total
