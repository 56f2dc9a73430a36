"""`sdserver serve --ray` for real: a Ray cluster of two nodes on this machine (ray.cluster_utils), the
command joined to it with two engine replicas on the CPU and tiny models, the HTTP ingress on Ray
Serve, and a second ingress in this process (an ingress anywhere reads, streams and cancels any job).

One cluster for the module (Ray takes seconds to start); the test that kills a replica runs last.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from sdserver.engine.tiny import make_tiny_model
from sdserver.settings import Settings
from tests.conftest import SIZE, decode_png, wait_until

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'sdserver[ray]' to run the cluster tests")
serve = pytest.importorskip("ray.serve")
from ray.cluster_utils import Cluster  # noqa: E402

from sdserver.api.app import create_app  # noqa: E402
from sdserver.cluster.board import NAMESPACE, board_name  # noqa: E402
from sdserver.cluster.ingress import ClusterBackend  # noqa: E402

pytestmark = pytest.mark.timeout(600)
SLOW_STEPS = 200  # long enough to be caught running (a tiny model step takes milliseconds)


@dataclass
class RayApp:
    http: httpx.Client  # the Serve proxy -> the ingress replica
    other: TestClient  # a second ingress, in this process
    settings: Settings
    board: Any


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def app(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayApp]:
    """`sdserver serve --ray --replicas 2` joined to a two-node cluster (the README's command, with
    --ray-address), and a second ingress in this process."""
    models_dir = tmp_path_factory.mktemp("ray-models")
    make_tiny_model(models_dir / "other", seed=11, safety_checker=False)
    patch = pytest.MonkeyPatch()
    patch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    patch.setenv("RAY_AUTH_MODE", "disabled")
    patch.setenv("RAY_TMPDIR", tempfile.mkdtemp(prefix="sdray"))  # short: Ray's socket paths have a limit
    patch.setenv("RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING", "0")
    # A loaded 2-core machine answers Serve's queue-length probes slower than its 0.1 s default; a late
    # answer would route a request past the replica that has its model (the affinity under test).
    patch.setenv("RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S", "1.0")
    # Settings without a flag yet come from the environment, as a user would give them.
    patch.setenv("SDSERVER_REPLICA_QUEUE", "3")  # two running (a batch), one waiting to join, more in the ingress
    patch.setenv("SDSERVER_MODELS_PER_REPLICA", "2")
    patch.setenv("SDSERVER_LIMITS__MAX_STEPS", str(SLOW_STEPS))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    port = _free_port()
    flags = ["--ray", "--ray-address", cluster.address, "--replicas", "2", "--model", str(tiny_model)]
    flags += ["--models-dir", str(models_dir), "--max-batch-size", "2", "--drain-timeout", "2", "--port", str(port)]
    log = tmp_path_factory.mktemp("ray-cli") / "serve.log"
    with log.open("w") as out:
        cli = subprocess.Popen([sys.executable, "-m", "sdserver", "serve", *flags], stdout=out, stderr=out)
    ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
    settings = Settings(model=str(tiny_model), models_dir=str(models_dir), replicas=2, max_batch_size=2, port=port)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
            wait_until(lambda: _ready(http, cli, log), timeout=300)
            engines = serve.get_deployment_handle("EngineReplica", app_name=settings.ray_app_name)
            with TestClient(create_app(settings, backend=ClusterBackend(settings, engines))) as other:
                board = ray.get_actor(board_name(settings.ray_app_name), namespace=NAMESPACE)
                yield RayApp(http, other, settings, board)
        cli.send_signal(signal.SIGTERM)
        assert cli.wait(120) == 0, log.read_text()[-3000:]
        assert "listening on" in log.read_text()
    finally:
        if cli.poll() is None:
            cli.kill()
        ray.shutdown()
        cluster.shutdown()
        patch.undo()


def _ready(http: httpx.Client, cli: subprocess.Popen[bytes], log: Path) -> bool:
    """Deployed (the command says where it listens) and both replicas heard of."""
    assert cli.poll() is None, f"sdserver serve --ray exited:\n{log.read_text()[-3000:]}"
    if "listening on" not in log.read_text():
        return False
    try:
        response = http.get("/ready", timeout=5)
    except httpx.HTTPError:
        return False
    return response.status_code == 200 and response.json()["replicas"]["up"] == 2


def cluster_state(client: httpx.Client | TestClient) -> dict[str, Any]:
    response = client.get("/v1/cluster")
    assert response.status_code == 200, response.text
    state: dict[str, Any] = response.json()
    return state


def replicas_up(app: RayApp) -> list[dict[str, Any]]:
    return [replica for replica in cluster_state(app.http)["replicas"] if replica["state"] == "up"]


def submit(client: httpx.Client | TestClient, **fields: Any) -> str:
    response = client.post("/v1/jobs", json={"prompt": "a red circle", "steps": 3, **fields})
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


def finished(client: httpx.Client | TestClient, job_id: str, timeout: float = 120) -> dict[str, Any]:
    """The job once it is done (the test fails instead of hanging)."""
    outcome: dict[str, Any] = {}

    def done() -> bool:
        outcome.update(client.get(f"/v1/jobs/{job_id}").json())
        return outcome["status"] in ("succeeded", "failed", "cancelled")

    wait_until(done, timeout=timeout)
    return outcome


def test_every_protocol_is_served_by_the_replicas(app: RayApp) -> None:
    http = app.http
    assert http.get("/ping").json() == {"status": "success"}
    assert "<html" in http.get("/").text.lower() and http.get("/docs").status_code == 200
    assert "/v1/cluster" in http.get("/openapi.json").json()["paths"]
    original = http.post("/txt2img", data={"prompt": "x", "width": SIZE, "height": SIZE, "num_inference_steps": 3})
    assert decode_png(original.json()["images"][0]["base64"]).size == (SIZE, SIZE)
    openai = http.post("/v1/images/generations", json={"prompt": "x", "steps": 3, "response_format": "b64_json"})
    assert decode_png(openai.json()["data"][0]["b64_json"]).size == (SIZE, SIZE)
    a1111 = http.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 3, "width": SIZE, "height": SIZE})
    assert len(a1111.json()["images"]) == 1
    job = finished(http, submit(http, seed=5))
    assert job["status"] == "succeeded" and job["images"][0]["seed"] == 5
    assert {model["name"] for model in http.get("/models").json()} == {"tiny", "other"}
    assert http.get("/ready").json()["replicas"] == {"up": 2, "total": 2}
    metrics = http.get("/metrics").text
    engines = {replica["id"] for replica in replicas_up(app)}
    assert all(f'replica="{replica}"' in metrics for replica in engines), "each replica's metrics, labelled"
    assert 'sdserver_cluster_replicas{state="up"} 2.0' in metrics


def test_requests_spread_over_the_replicas_on_both_nodes(app: RayApp) -> None:
    before = {replica["id"]: replica["jobs_done"] for replica in replicas_up(app)}
    assert len({replica["node_id"] for replica in replicas_up(app)}) == 2, "one replica per node"
    with ThreadPoolExecutor(6) as pool:
        jobs = list(pool.map(lambda _: submit(app.http, steps=30), range(6)))
    assert all(finished(app.http, job_id)["status"] == "succeeded" for job_id in jobs)
    wait_until(lambda: sum(r["jobs_done"] for r in replicas_up(app)) >= sum(before.values()) + 6, timeout=10)
    after = {replica["id"]: replica["jobs_done"] for replica in replicas_up(app)}
    assert all(after[replica] > before[replica] for replica in before), f"{before} -> {after}"


def test_a_models_requests_go_to_the_replica_that_has_it(app: RayApp) -> None:
    def holders() -> list[str]:
        return [replica["id"] for replica in replicas_up(app) if "other" in replica["models"]]

    assert holders() == []
    assert finished(app.http, submit(app.http, model="other"))["status"] == "succeeded"
    wait_until(lambda: len(holders()) == 1, timeout=10)
    (holder,) = holders()
    for _ in range(3):  # one at a time: the replica that has it is never busy
        assert finished(app.http, submit(app.http, model="other"))["status"] == "succeeded"
    time.sleep(1.5)  # a heartbeat
    assert holders() == [holder], "the model was loaded on a second replica"


def test_a_job_is_read_streamed_and_cancelled_through_either_ingress(app: RayApp) -> None:
    # Submitted through the Serve ingress, followed and cancelled through the other one.
    job_id = submit(app.http, steps=SLOW_STEPS, preview_every=50)
    with app.other.stream("GET", f"/v1/jobs/{job_id}/events") as events:
        lines = events.iter_lines()
        assert next(lines) == "event: status"
        for line in lines:
            if line.startswith("data:") and '"progress"' in line:
                assert json.loads(line[5:])["progress"]["step"] >= 1
                break
        cancel = app.other.delete(f"/v1/jobs/{job_id}")
        assert cancel.status_code == 200 and cancel.json()["id"] == job_id
        rest = "\n".join(lines)
    assert "event: cancelled" in rest
    assert finished(app.http, job_id)["status"] == "cancelled"
    # Submitted through this process's ingress, read (with its saved image) through the Serve one.
    job_id = submit(app.other, seed=9)
    outcome = finished(app.http, job_id)
    assert outcome["status"] == "succeeded" and outcome["images"][0]["seed"] == 9
    history = app.http.get("/v1/history", params={"limit": 200}).json()["items"]
    saved = [item for item in history if item["job_id"] == job_id]
    assert len(saved) == 1, "the image is saved once"
    image = app.other.get(saved[0]["image_url"])
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")


def test_a_replica_killed_mid_run_fails_only_its_running_jobs_and_moves_its_queued_ones(app: RayApp) -> None:
    """Last: the cluster loses a replica (Serve starts another)."""
    jobs = [submit(app.http, steps=SLOW_STEPS, seed=index) for index in range(6)]  # three for each replica
    victim: dict[str, Any] = {}

    def one_running_a_batch_and_holding_one_more() -> bool:
        for replica in replicas_up(app):
            if replica["running_jobs"] == 2 and replica["queue_depth"] >= 1:
                victim.update(replica)
                return True
        return False

    wait_until(one_running_a_batch_and_holding_one_more, timeout=60)
    views = {view.id: view for view in ray.get(app.board.views.remote())}
    running_there = {job_id for job_id, view in views.items() if view.replica == victim["id"] and view.started_at}
    os.kill(victim["pid"], signal.SIGKILL)
    outcomes = {job_id: finished(app.http, job_id, timeout=180) for job_id in jobs}
    failed = {job_id for job_id, outcome in outcomes.items() if outcome["status"] == "failed"}
    assert failed <= running_there, "only jobs that were running on the dead replica may fail"
    assert all(outcomes[job_id]["error"]["type"] == "Unavailable" for job_id in failed)
    assert all(outcomes[job_id]["status"] == "succeeded" for job_id in set(jobs) - running_there)
    assert failed, "the jobs that were running on it failed (none is retried by default)"
