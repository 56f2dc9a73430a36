"""Stopping `sdserver serve`: the first Ctrl-C or SIGTERM drains (reads still served, new work 503),
the second Ctrl-C answers every unfinished request with our JSON 503 at once, quietly."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import wait_until
from tests.test_startup import start, wait_for

# Every denoising step waits at a gate (a file) before it runs, so the tests decide when work finishes.
GATED_RUN = """
import os, time
import sdserver.engine.session as session
real_denoise = session.denoise
def gated(*args, **kwargs):
    gate = os.environ["SDSERVER_TEST_RUN_GATE"]
    open(gate + ".entered", "a").close()
    while not os.path.exists(gate):
        time.sleep(0.05)
    return real_denoise(*args, **kwargs)
session.denoise = gated
"""
JOB = {"prompt": "x", "width": 64, "height": 64, "steps": 2}
TXT2IMG = {"prompt": "x", "width": 64, "height": 64, "num_inference_steps": 2}


class Gated:
    """A server process whose denoising steps wait for `release()`."""

    def __init__(self, tiny_model: Path, tmp_path: Path) -> None:
        hook = tmp_path / "hook"
        hook.mkdir()
        (hook / "sitecustomize.py").write_text(GATED_RUN)
        self.gate = tmp_path / "gate"
        self.log = tmp_path / "log"
        env = {
            "PYTHONPATH": f"{hook}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "SDSERVER_TEST_RUN_GATE": str(self.gate),
        }
        args = ("--model", str(tiny_model), "--max-batch-size", "1", "--drain-timeout", "120")
        self.process, self.url = start(*args, env=env, log=self.log)
        wait_for(f"{self.url}/ready", self.process, 200)

    def running(self) -> bool:
        return Path(f"{self.gate}.entered").exists()

    def release(self) -> None:
        self.gate.touch()

    def output(self) -> str:
        return self.log.read_text()


@pytest.fixture
def server(tiny_model: Path, tmp_path: Path) -> Iterator[Gated]:
    gated = Gated(tiny_model, tmp_path)
    yield gated
    if gated.process.poll() is None:
        gated.process.kill()
        gated.process.wait()


def post_in_thread(url: str, fields: dict[str, object], out: list[httpx.Response]) -> threading.Thread:
    thread = threading.Thread(target=lambda: out.append(httpx.post(f"{url}/txt2img", data=fields, timeout=120)))
    thread.start()
    return thread


def test_sigterm_drains_while_reads_are_still_served(server: Gated) -> None:
    url = server.url
    job = httpx.post(f"{url}/v1/jobs", json=JOB, timeout=60).json()
    wait_until(server.running, timeout=60)
    server.process.send_signal(signal.SIGTERM)
    wait_until(lambda: "stopping: waiting for 1 running and 0 queued" in server.output(), timeout=30)

    assert httpx.get(f"{url}/ready", timeout=30).json() == {"status": "draining"}
    assert httpx.get(f"{url}/health", timeout=30).status_code == 200
    assert httpx.get(f"{url}/v1/jobs/{job['id']}", timeout=30).json()["status"] == "running"
    refused = httpx.post(f"{url}/v1/jobs", json=JOB, timeout=30)
    assert refused.status_code == 503 and refused.json()["error"]["type"] == "Unavailable"
    assert httpx.post(f"{url}/txt2img", data=TXT2IMG, timeout=30).status_code == 503

    server.release()  # the job finishes during the drain, and its client can still fetch it
    wait_until(lambda: httpx.get(f"{url}/v1/jobs/{job['id']}", timeout=30).json()["status"] == "succeeded", 60)
    image = httpx.get(f"{url}/v1/jobs/{job['id']}/images/0", timeout=30)
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    assert server.process.wait(60) == 0
    assert "stopping: all work finished" in server.output()


def test_the_first_ctrl_c_says_what_it_waits_for_and_the_second_stops_at_once(server: Gated) -> None:
    responses: list[httpx.Response] = []
    threads = [post_in_thread(server.url, {**TXT2IMG, "seed": seed}, responses) for seed in (1, 2, 3)]
    wait_until(server.running, timeout=60)
    wait_until(lambda: httpx.get(f"{server.url}/ready", timeout=30).json().get("queue_depth") == 2, timeout=60)

    server.process.send_signal(signal.SIGINT)
    wait_until(lambda: "Press Ctrl-C again to stop now" in server.output(), timeout=30)
    said = next(line for line in server.output().splitlines() if "stopping: waiting for" in line)
    assert "1 running and 2 queued" in said and "at most 120s" in said
    stopped_at = time.monotonic()
    server.process.send_signal(signal.SIGINT)  # the batch is still held at the gate: it never finishes
    for thread in threads:
        thread.join(60)
    assert server.process.wait(60) == 0
    print(f"second Ctrl-C: clients answered and the process gone in {time.monotonic() - stopped_at:.1f}s")

    assert len(responses) == 3, "every client got an answer"
    for response in responses:
        assert response.status_code == 503 and response.headers["content-type"] == "application/json"
        assert response.json()["status"] == "failure" and "shut" in response.json()["message"]
    output = server.output()
    assert "stopping now: unfinished requests get 503" in output
    for noise in ("Traceback", "CancelledError", "Internal Server Error", "Exception in ASGI"):
        assert noise not in output, output


def test_ctrl_c_on_an_idle_server_exits_at_once(tiny_model: Path, tmp_path: Path) -> None:
    process, url = start("--model", str(tiny_model), log=tmp_path / "log")
    wait_for(f"{url}/ready", process, 200)
    process.send_signal(signal.SIGINT)
    assert process.wait(30) == 0
    assert "stopping: no work in progress" in (tmp_path / "log").read_text()


def test_ctrl_c_while_the_models_load_exits_cleanly(tiny_model: Path, tmp_path: Path) -> None:
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import time\nimport sdserver.engine.engine as e\nreal = e.Engine.load\n"
        "def slow(self):\n    time.sleep(600)\ne.Engine.load = slow\n"
    )
    env = {"PYTHONPATH": f"{hook}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    process, url = start("--model", str(tiny_model), env=env, log=tmp_path / "log")
    wait_for(f"{url}/health", process, 200)
    process.send_signal(signal.SIGINT)
    assert process.wait(30) == 0, (tmp_path / "log").read_text()
    assert "stopping (the models were still loading)" in (tmp_path / "log").read_text()
