"""The container image: CPU by default (CUDA by build argument), the demo model served with no network,
as a non-root user, with a HEALTHCHECK on /ready and volumes for models, outputs and the HF cache."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from sdserver.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
VOLUMES = ["/data/models", "/data/outputs", "/data/hf-cache"]


def instruction(name: str) -> list[str]:
    """The arguments of each `NAME ...` line of the Dockerfile (continuation lines joined)."""
    text = DOCKERFILE.replace("\\\n", " ")
    return [match.strip() for match in re.findall(rf"^{name}\s+(.*)$", text, flags=re.MULTILINE)]


def test_cpu_by_default_and_cuda_by_build_argument() -> None:
    assert "TORCH=cpu" in instruction("ARG")
    assert any("download.pytorch.org/whl/${TORCH}" in run for run in instruction("RUN"))
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert compose["services"]["sdserver"]["build"]["args"]["TORCH"].startswith("cu")


def test_the_image_serves_the_demo_as_a_non_root_user_with_a_healthcheck_and_volumes() -> None:
    assert instruction("USER") == ["sdserver"]
    assert json.loads(instruction("CMD")[-1]) == ["serve", "--model", "demo"]
    assert json.loads(instruction("ENTRYPOINT")[-1]) == ["sdserver"]
    (healthcheck,) = instruction("HEALTHCHECK")
    assert "http://127.0.0.1:1337/ready" in healthcheck
    assert json.loads(instruction("VOLUME")[-1]) == VOLUMES
    environment = " ".join(instruction("ENV"))
    assert "SDSERVER_HOST=0.0.0.0" in environment and "HF_HOME=/data/hf-cache" in environment
    assert "SDSERVER_MODELS_DIR=/data/models" in environment


def test_compose_reserves_a_gpu_mounts_the_volumes_and_outwaits_the_drain() -> None:
    service = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]["sdserver"]
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert sorted(volume.split(":")[1] for volume in service["volumes"]) == sorted(VOLUMES)
    assert service["ports"] == ["127.0.0.1:1337:1337"]
    grace = int(str(service["stop_grace_period"]).rstrip("s"))
    assert grace > Settings.model_fields["drain_timeout"].default


def docker_unavailable() -> str | None:
    if shutil.which("docker") is None:
        return "no docker command"
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "`docker info` timed out"
    if info.returncode != 0:
        return "no Docker engine: " + (info.stderr.strip().splitlines() or ["docker info failed"])[-1]
    return None


@pytest.fixture(scope="module")
def container() -> Iterator[str]:
    reason = docker_unavailable()
    if reason is not None:
        pytest.skip(f"Docker is not available here ({reason}); the image is built and run where it is")
    tag = f"sdserver-test:{uuid.uuid4().hex[:8]}"
    subprocess.run(["docker", "build", "-t", tag, str(ROOT)], check=True, timeout=3600)
    name = f"sdserver-test-{uuid.uuid4().hex[:8]}"
    subprocess.run(["docker", "run", "-d", "--network", "none", "--name", name, tag], check=True, timeout=120)
    try:
        yield name
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=120)
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True, timeout=120)


def docker(*args: str) -> str:
    return subprocess.run(["docker", *args], check=True, capture_output=True, text=True, timeout=300).stdout.strip()


def test_the_image_serves_the_demo_offline_and_stops_cleanly(container: str) -> None:
    deadline = time.monotonic() + 300
    while docker("inspect", "--format", "{{.State.Health.Status}}", container) != "healthy":
        assert time.monotonic() < deadline, docker("logs", container)
        time.sleep(2)
    assert docker("exec", container, "id", "-u") != "0"
    generate = (
        "import json, urllib.request, urllib.parse\n"
        "data = urllib.parse.urlencode({'prompt': 'a red circle on a blue background', 'seed': 1}).encode()\n"
        "body = json.load(urllib.request.urlopen('http://127.0.0.1:1337/txt2img', data, timeout=120))\n"
        "print(body['images'][0]['width'], body['images'][0]['height'])\n"
    )
    assert docker("exec", container, "python", "-c", generate) == "64 64"
    docker("stop", "-t", "40", container)
    assert docker("inspect", "--format", "{{.State.ExitCode}}", container) == "0"
