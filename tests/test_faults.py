"""Fault injection: out-of-memory, a hung pipeline, SIGTERM with work in flight. Never a hung request."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import httpx
import torch
from fastapi.testclient import TestClient

from tests.conftest import SIZE, STEPS, ClientFactory, GatedFamily, spying, wait_until
from tests.test_cli import free_port, wait_for_ping

TXT2IMG = {"prompt": "x", "width": SIZE, "height": SIZE, "num_inference_steps": STEPS}


def test_out_of_memory_is_503_and_the_next_request_works(client: TestClient) -> None:
    class OutOfMemoryFamily(GatedFamily):
        def forward(self, *args: Any) -> Any:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    with spying(client.app, OutOfMemoryFamily):
        response = client.post("/txt2img", data=TXT2IMG)
    assert response.status_code == 503 and "ran out of memory" in response.json()["message"]
    assert client.post("/txt2img", data=TXT2IMG).status_code == 200


def test_a_hung_pipeline_times_out_the_queue_and_health_still_answers(
    make_client: ClientFactory, tiny_model: Path
) -> None:
    client = make_client(model=str(tiny_model), queue_timeout=0.5, max_queue=50)
    statuses: list[int] = []
    with spying(client.app) as spy:
        spy.gate.clear()  # the denoiser hangs until the test lets it go
        client.post("/v1/jobs", json={"prompt": "hangs", "width": SIZE, "height": SIZE, "steps": STEPS})
        assert spy.entered.wait(30)
        threads = [
            threading.Thread(target=lambda: statuses.append(client.post("/txt2img", data=TXT2IMG).status_code))
            for _ in range(5)
        ]
        for thread in threads:
            thread.start()
        wait_until(lambda: client.app.state.scheduler.queue_depth == 5)  # type: ignore[attr-defined]
        assert client.get("/health").status_code == 200
        threading.Event().wait(0.6)  # past every queued request's deadline
    for thread in threads:
        thread.join(30)
    assert statuses == [504] * 5


def serve(*args: str) -> tuple[subprocess.Popen[str], str]:
    """Start a server process; its log goes to a temporary file (a pipe nobody reads would fill up
    under load and block the server's logging)."""
    port = free_port()
    log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - lives as long as the process
    process = subprocess.Popen(
        [sys.executable, "-m", "sdserver", "serve", "--port", str(port), *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    process.log = log  # type: ignore[attr-defined]
    url = f"http://127.0.0.1:{port}"
    wait_for_ping(url, process)
    return process, url


def output_of(process: subprocess.Popen[str]) -> str:
    log = process.log  # type: ignore[attr-defined]
    log.seek(0)
    return str(log.read())


def post_in_thread(url: str, fields: dict[str, Any], out: list[httpx.Response]) -> threading.Thread:
    thread = threading.Thread(target=lambda: out.append(httpx.post(f"{url}/txt2img", data=fields, timeout=120)))
    thread.start()
    return thread


def queue_depth(url: str) -> int:
    return int(httpx.get(f"{url}/ready", timeout=5).json().get("queue_depth", -1))


def test_sigterm_finishes_the_work_in_flight_then_exits_0(tiny_model: Path) -> None:
    process, url = serve("--model", str(tiny_model), "--max-batch-size", "1", "--drain-timeout", "300")
    responses: list[httpx.Response] = []
    fields = {**TXT2IMG, "num_inference_steps": 60}
    threads = [post_in_thread(url, {**fields, "seed": seed}, responses) for seed in (1, 2, 3)]
    wait_until(lambda: queue_depth(url) >= 2)  # one running, two waiting: all three accepted
    process.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(120)
    assert process.wait(timeout=60) == 0, output_of(process)
    assert [r.status_code for r in responses] == [200, 200, 200], [r.text for r in responses]


def test_sigterm_past_the_drain_timeout_answers_what_is_left_clearly(tiny_model: Path) -> None:
    process, url = serve("--model", str(tiny_model), "--max-batch-size", "1", "--drain-timeout", "1")
    responses: list[httpx.Response] = []
    fields = {**TXT2IMG, "num_inference_steps": 150, "width": 128, "height": 128}
    threads = [post_in_thread(url, {**fields, "seed": seed}, responses) for seed in range(4)]
    wait_until(lambda: queue_depth(url) >= 3)
    process.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(120)
    assert process.wait(timeout=60) == 0, output_of(process)
    assert len(responses) == 4, "every client got an answer"
    failed = [r for r in responses if r.status_code != 200]
    assert failed, "the drain timeout should have cut some work short"
    for response in failed:
        assert response.status_code == 503 and "shut" in response.json()["message"], response.text


def test_a_dead_worker_makes_the_process_exit_non_zero(tiny_model: Path, tmp_path: Path) -> None:
    # A sitecustomize hook breaks the worker loop inside the real server process.
    (tmp_path / "sitecustomize.py").write_text(
        "import sdserver.service.scheduler as s\n"
        "def broken(self):\n    raise SystemError('worker bug')\n"
        "s.Scheduler._next_batch = s.Scheduler._next_first = broken\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    process = subprocess.Popen(
        [sys.executable, "-m", "sdserver", "serve", "--model", str(tiny_model), "--port", str(free_port())],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 1, output
    assert "worker thread died" in output
