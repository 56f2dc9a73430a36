"""The command line: `sdserver serve` as a real process, and `make-tiny-model`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from sdserver.cli import app
from tests.conftest import SIZE, STEPS


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve(*args: str, cwd: Path | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "sdserver", "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=cwd,
        env={**os.environ, "COLUMNS": "200"},
    )


def wait_for_ping(url: str, process: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read() if process.stdout else ""
        try:
            if httpx.get(f"{url}/ping", timeout=1).json() == {"status": "success"}:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise AssertionError("server did not answer /ping")


def test_serve_with_config_file_then_stop_cleanly(tmp_path: Path, tiny_model: Path) -> None:
    config = tmp_path / "config.json"
    custom = {
        "model_path": str(tiny_model),
        "ui_label": "Tiny",
        "url_path": "tiny2",
        "requires_safety_checker": True,
    }
    config.write_text(json.dumps({"hf_token": "unused", "model": str(tiny_model), "custom_models": [custom]}))
    port = free_port()
    process = serve("--config", str(config), "--port", str(port))
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_ping(url, process)
        assert httpx.get(f"{url}/custom_models").json() == [custom]
        fields = {"prompt": "x", "width": SIZE, "height": SIZE, "num_inference_steps": STEPS, "seed": 1}
        response = httpx.post(f"{url}/custom/tiny2", data=fields, timeout=60)
        assert response.json()["images"][0]["seed"] == 1
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    assert "loading model 'tiny'" in output and "listening on" in output


@pytest.mark.parametrize(
    "config_text,words",
    [
        ("{not json", ["not valid JSON"]),
        (
            '{"custom_models": [{"model_path": "/no/such/dir", "ui_label": "x", "url_path": "x"}]}',
            ["/no/such/dir"],
        ),
        (
            '{"custom_models": [{"model_path": "/tmp", "ui_label": "x", "url_path": "a"},'
            ' {"model_path": "/tmp", "ui_label": "y", "url_path": "a"}]}',
            ["duplicate url_path", "'a'"],
        ),
    ],
)
def test_bad_config_stops_start_up_with_one_clear_line(
    tmp_path: Path, tiny_model: Path, config_text: str, words: list[str]
) -> None:
    config = tmp_path / "config.json"
    config.write_text(config_text)
    process = serve("--config", str(config), "--model", str(tiny_model), "--port", str(free_port()))
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 2
    errors = [line for line in output.splitlines() if "cannot start" in line]
    assert len(errors) == 1, output
    for word in words:
        assert word in errors[0]
    assert "Traceback" not in output


def test_missing_model_folder_stops_start_up(tmp_path: Path) -> None:
    process = serve("--model", str(tmp_path / "nothing-here"), "--port", str(free_port()))
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 2 and "cannot start" in output and "nothing-here" in output


def test_make_tiny_model_writes_a_diffusers_folder(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["make-tiny-model", str(tmp_path / "m"), "--inpainting"])
    assert result.exit_code == 0, result.output
    index = json.loads((tmp_path / "m" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionInpaintPipeline"
    for component in (
        "unet",
        "vae",
        "text_encoder",
        "tokenizer",
        "scheduler",
        "safety_checker",
        "feature_extractor",
    ):
        assert (tmp_path / "m" / component).is_dir()
    unet = json.loads((tmp_path / "m" / "unet" / "config.json").read_text())
    assert unet["in_channels"] == 9


def test_make_tiny_model_writes_each_architecture(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["make-tiny-model", str(tmp_path / "xl"), "--arch", "sdxl"])
    assert result.exit_code == 0, result.output
    index = json.loads((tmp_path / "xl" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["text_encoder_2"][0] == "transformers"
    scheduler = json.loads((tmp_path / "xl" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "EulerDiscreteScheduler"  # as the shipped SDXL config
    flux = CliRunner().invoke(app, ["make-tiny-model", str(tmp_path / "schnell"), "--arch", "flux-schnell"])
    assert flux.exit_code == 0, flux.output
    assert json.loads((tmp_path / "schnell" / "model_index.json").read_text())["_class_name"] == "FluxPipeline"
    transformer = json.loads((tmp_path / "schnell" / "transformer" / "config.json").read_text())
    assert transformer["guidance_embeds"] is False
    wrong = CliRunner().invoke(app, ["make-tiny-model", str(tmp_path / "x"), "--arch", "sd4"])
    assert wrong.exit_code == 2 and "sd4" in wrong.output and "flux-schnell" in wrong.output
