"""The Ray Serve application's sizes, the start-up errors of `sdserver serve --ray`, and the ingress's
stand-ins keeping the surface of the single server's objects (no Ray started here)."""

from __future__ import annotations

import importlib
import inspect
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sdserver.cluster.app import plan
from sdserver.cluster.history import RemoteHistory
from sdserver.cluster.launch import unreachable
from sdserver.cluster.scheduler import ClusterScheduler
from sdserver.core.errors import ConfigError
from sdserver.service.history import History
from sdserver.service.scheduler import Scheduler
from sdserver.settings import Settings


def test_one_replica_per_visible_gpu_by_default_or_one_on_cpus() -> None:
    assert plan(Settings(), gpus_visible=4).replicas == 4
    assert plan(Settings(), gpus_visible=4).gpus_per_replica == 1
    assert plan(Settings(gpus_per_replica=2), gpus_visible=4).replicas == 2
    assert plan(Settings(gpus_per_replica=0.5), gpus_visible=2).replicas == 4  # two replicas share a GPU
    cpu = plan(Settings(), gpus_visible=0)
    assert (cpu.replicas, cpu.gpus_per_replica) == (1, 0)
    assert plan(Settings(replicas=3), gpus_visible=0).replicas == 3


def test_autoscaling_between_min_and_max_on_queue_depth() -> None:
    sizes = plan(Settings(min_replicas=1, max_replicas=4, max_batch_size=8), gpus_visible=4)
    assert (sizes.replicas, sizes.min_replicas, sizes.max_replicas, sizes.target_queue) == (None, 1, 4, 8.0)
    assert plan(Settings(max_replicas=3, target_queue=2), gpus_visible=0).target_queue == 2
    assert "1-4 engine replicas" in sizes.describe()


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        (Settings(replicas=2, max_replicas=3), "either --replicas"),
        (Settings(min_replicas=3, max_replicas=2), "--min-replicas 3 is more than --max-replicas 2"),
        (Settings(gpus_per_replica=1), "sees no GPU"),
    ],
)
def test_sizes_that_cannot_work_stop_start_up_with_one_line(settings: Settings, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        plan(settings, gpus_visible=0)


def test_a_cluster_address_nobody_answers_at_is_said_at_once() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        problem = unreachable(f"127.0.0.1:{port}")
        assert problem is not None and f"no Ray cluster answers at 127.0.0.1:{port}" in problem
        assert unreachable(f"ray://127.0.0.1:{port}") is not None
    assert unreachable(None) is None and unreachable("auto") is None


def test_serve_ray_with_an_unreachable_head_exits_with_one_line() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "sdserver", "serve", "--ray", "--ray-address", f"127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "COLUMNS": "200"},
        )
    assert done.returncode == 2
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot start: no Ray cluster answers at" in lines[0], lines


@pytest.mark.parametrize("name", ["submit", "get", "cancel", "queue_position", "drain", "stop_accepting"])
def test_the_ingress_scheduler_takes_what_the_local_one_takes(name: str) -> None:
    """The routes call either; a parameter added to one must be added to the other."""
    local = inspect.signature(getattr(Scheduler, name))
    cluster = inspect.signature(getattr(ClusterScheduler, name))
    assert list(local.parameters) == list(cluster.parameters)
    for prop in ("alive", "accepting", "queue_depth", "running_rows"):
        assert isinstance(getattr(ClusterScheduler, prop), property)


@pytest.mark.parametrize("name", ["track", "wait", "close", "list", "get", "delete", "path"])
def test_the_remote_history_takes_what_the_local_one_takes(name: str) -> None:
    assert list(inspect.signature(getattr(History, name)).parameters) == list(
        inspect.signature(getattr(RemoteHistory, name)).parameters
    )


def test_the_readme_shows_the_kuberay_manifest_and_its_settings_are_valid() -> None:
    root = Path(__file__).resolve().parents[2]
    manifest = (root / "deploy" / "rayservice.yaml").read_text()
    assert f"```yaml\n{manifest}```" in (root / "README.md").read_text()
    service = yaml.safe_load(manifest)
    (application,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    module, name = application["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), name))
    settings = Settings(**application["args"])
    sizes = plan(settings, gpus_visible=4)
    assert (sizes.min_replicas, sizes.max_replicas, sizes.gpus_per_replica) == (1, 4, 1)
    workers = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert workers["maxReplicas"] >= sizes.max_replicas, "a GPU pod for each replica at most"


def test_the_single_process_server_imports_nothing_of_ray() -> None:
    code = (
        "import sys; from sdserver.api.app import create_app; from sdserver.cli import app;"
        "from sdserver.settings import Settings; create_app(Settings(model='demo'));"
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith(('ray.', 'sdserver.cluster'))))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert done.stdout.strip() == "[]"
