"""Every example in the README runs, as written, against the demo model, and gives what the README says.

Each ```bash and ```json block of README.md has a check here, found by the block's first line; a new
block without one fails `test_every_example_has_a_check`. The bash blocks run in a scratch folder that
has the repository's `examples/`, against a demo server on a free port (1337 is replaced by it).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

import sdserver.settings
from sdserver.cli import app
from sdserver.settings import load_settings
from tests.demo.test_demo_model import analyse, components
from tests.test_startup import start, wait_for

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.MULTILINE | re.DOTALL)


def first_line(block: str) -> str:
    return block.splitlines()[0]


pytestmark = pytest.mark.usefixtures("restore_logging")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The demo server, as `bash scripts/serve-demo.sh` starts it (on a free port)."""
    log = tmp_path_factory.mktemp("demo-server") / "log"
    process, url = start("--model", "demo", log=log)
    try:
        wait_for(f"{url}/ready", process, 200, timeout=300)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    """The folder a reader runs the examples in: it has the repository's examples/."""
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    return tmp_path


def run(block: str, url: str, cwd: Path) -> str:
    port = url.rsplit(":", 1)[1]
    script = block.replace("localhost:1337", f"localhost:{port}").replace("127.0.0.1:1337", f"127.0.0.1:{port}")
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"{block}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def image(path_or_bytes: Path | bytes) -> np.ndarray:
    raw = path_or_bytes.read_bytes() if isinstance(path_or_bytes, Path) else path_or_bytes
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))


def first_image(answer_file: Path) -> np.ndarray:
    return image(base64.b64decode(json.loads(answer_file.read_text())["images"][0]["base64"]))


def one_shape(pixels: np.ndarray, fg: str, shape: str, bg: str | None = None) -> None:
    """The picture shows one `fg` `shape` (on `bg`, if given)."""
    found = analyse(pixels)
    assert found["fg"] == fg and found["shape"] == shape, found
    assert bg is None or found["bg"] == bg, found
    assert components(pixels) == 1, "one shape, not several"


# --- the checks, one per block ---------------------------------------------------------------------


def check_serve_demo(block: str, demo: str, scratch: Path) -> None:
    assert block.strip() == "bash scripts/serve-demo.sh"
    script = (ROOT / "scripts" / "serve-demo.sh").read_text()
    assert "sdserver serve --model demo" in script  # what it serves; its install: tests/test_scripts.py


def check_test_command(block: str, demo: str, scratch: Path) -> None:
    assert block.strip() == "bash scripts/test.sh"
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()  # "this is what CI runs"


def check_try_it(block: str, demo: str, scratch: Path) -> None:
    assert run(block, demo, scratch).startswith('{"status":"success"}')
    pixels = image(scratch / "out.png")
    assert pixels.shape == (64, 64, 3)
    one_shape(pixels, "red", "circle", "blue")


def check_real_models(block: str, demo: str, scratch: Path) -> None:
    """The commands are valid as written (each parses, and its values pass the settings' checks up to
    the paths, which are placeholders); an uncached hub model offline fails with one clear line."""
    activate, *lines = block.splitlines()
    assert activate == ". .venv/bin/activate" and "ensure_venv" in (ROOT / "scripts" / "serve-demo.sh").read_text()
    for line in lines:
        command = shlex.split(line, comments=True)
        assert command[:2] == ["sdserver", "serve"], line
        seen: dict[str, Any] = {}

        def capture(config: Path | None, seen: dict[str, Any] = seen, **given: Any) -> None:
            seen.update(given)
            raise sdserver.settings.ConfigError("parsed")

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(sdserver.settings, "load_settings", capture)
            result = CliRunner().invoke(app, command[1:])
        assert "cannot start: parsed" in result.output, (line, result.output)
        assert sdserver.settings.Settings(**{k: v for k, v in seen.items() if k not in ("models_dir", "loras_dir")})
    hub = next(shlex.split(line, comments=True) for line in lines if "--model stabilityai/" in line)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(scratch / "empty-cache")}
    result = subprocess.run(
        [sys.executable, "-m", "sdserver", *hub[1:], "--port", "0"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 2
    (error,) = [line for line in result.stderr.splitlines() if "cannot start" in line]
    assert f"hf download {hub[-1]}" in error and "not in the Hugging Face cache" in error


def check_files_and_json(block: str, demo: str, scratch: Path) -> None:
    run(block, demo, scratch)
    sent = image(ROOT / "examples" / "in.png")
    mask = image(ROOT / "examples" / "mask.png")[..., 0] > 127
    for name in ("img2img.json", "masking.json"):
        pixels = first_image(scratch / name)
        assert pixels.shape == (64, 64, 3), name
        one_shape(pixels, "yellow", "circle")
    masked = first_image(scratch / "masking.json")
    assert (masked[~mask] == sent[~mask]).all(), "masking returns the pixels outside the mask as sent"
    one_shape(first_image(scratch / "json.json"), "red", "circle", "blue")


def check_cli(block: str, demo: str, scratch: Path) -> None:
    output = run(block, demo, scratch).splitlines()
    assert output[0] == "wrote out.png (seed 42, 64x64, 20 steps)"
    assert output[1] == "wrote square.webp (seed 7, 64x64, 20 steps)"
    one_shape(image(scratch / "out.png"), "red", "circle", "blue")
    one_shape(image(scratch / "square.webp"), "yellow", "square", "black")


def check_jobs(block: str, demo: str, scratch: Path) -> None:
    events = re.findall(r"^event: (\w+)$", run(block, demo, scratch), flags=re.MULTILINE)
    assert events[0] == "status" and events[-1] == "succeeded", events
    assert events.count("progress") >= 4  # one every 5 of its 20 steps (with a preview), and steps


def check_docker(block: str, demo: str, scratch: Path) -> None:
    """Built and run by tests/test_docker.py where Docker is; here: the block matches the files."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "ARG TORCH=cpu" in dockerfile and "--build-arg TORCH=cu128" in block
    assert "/data/hf-cache" in block and 'VOLUME ["/data/models", "/data/outputs", "/data/hf-cache"]' in dockerfile
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert "docker compose up -d" in block and compose["services"]["sdserver"]["build"]["args"]["TORCH"] == "cu128"


def check_scale_out(block: str, demo: str, scratch: Path) -> None:
    """Run for real by tests/cluster/test_ray.py (a two-node Ray cluster); here: the extra exists and
    the command's options are the CLI's."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert "pip install 'sdserver[ray]'" in block and re.search(r"^ray = \[", pyproject, flags=re.MULTILINE)
    command = next(line for line in block.splitlines() if line.startswith("sdserver serve"))
    flags = [word for word in command.split() if word.startswith("--")]
    help_text = CliRunner().invoke(app, ["serve", "--help"], terminal_width=200).output
    assert all(flag in help_text for flag in flags), (flags, help_text)
    assert "--ray" in flags and "--replicas" in flags


def check_upscale(block: str, demo: str, scratch: Path) -> None:
    output = run(block, demo, scratch)
    assert output.splitlines()[0] == "['None', 'Lanczos', 'Nearest']"  # the demo server has no upscalers_dir
    sent = Image.open(ROOT / "examples" / "in.png").convert("RGB")
    expected = np.asarray(sent.resize((128, 128), Image.Resampling.LANCZOS), dtype=np.int16)
    assert np.abs(image(scratch / "big.png").astype(np.int16) - expected).max() <= 1


BASH_CHECKS: dict[str, Callable[[str, str, Path], None]] = {
    "bash scripts/serve-demo.sh": check_serve_demo,
    "bash scripts/test.sh": check_test_command,
    "curl -s localhost:1337/ping": check_try_it,
    ". .venv/bin/activate": check_real_models,
    "# img2img and masking with the pictures in examples/: in.png, a red circle on a blue background, and": (
        check_files_and_json
    ),
    'sdserver generate "a red circle on a blue background" -o out.png --model demo --seed 42   # in-process': (
        check_cli
    ),
    "id=$(curl -s localhost:1337/v1/jobs -H 'content-type: application/json' \\": check_jobs,
    "docker build -t sdserver .                                   # CPU": check_docker,
    "pip install 'sdserver[ray]'": check_scale_out,
    "# examples/in.png (64x64) to 128x128; upscaler_1: a name from /sdapi/v1/upscalers": check_upscale,
}


def check_config_json(block: str, scratch: Path) -> None:
    config = json.loads(block)
    folder = scratch / "model"
    folder.mkdir()
    config["custom_models"][0]["model_path"] = str(folder)  # the example's placeholder path
    path = scratch / "config.json"
    path.write_text(json.dumps(config))
    settings = load_settings(path)
    assert settings.hf_token == "hf_..." and settings.custom_models[0].url_path == "my_first_model"


def check_success_shape(block: str, scratch: Path) -> None:
    from sdserver.api.original.protocol import ImageOut, SuccessResponse

    answer = json.loads(block)
    assert set(answer) == set(SuccessResponse.model_fields)
    assert set(answer["images"][0]) == set(ImageOut.model_fields)


JSON_CHECKS: dict[str, Callable[[str, Path], None]] = {
    "{": check_config_json,
    '{"status": "success",': check_success_shape,
}


def test_every_example_has_a_check() -> None:
    for block in blocks("bash"):
        assert first_line(block) in BASH_CHECKS, f"a README example with no test:\n{block}"
    for block in blocks("json"):
        assert first_line(block) in JSON_CHECKS, f"a README example with no test:\n{block}"
    assert len(blocks("bash")) == len(BASH_CHECKS) and len(blocks("json")) == len(JSON_CHECKS)


@pytest.mark.parametrize("block", blocks("bash"), ids=lambda block: first_line(block)[:40])
def test_bash_example(block: str, demo: str, scratch: Path) -> None:
    BASH_CHECKS[first_line(block)](block, demo, scratch)


@pytest.mark.parametrize("block", blocks("json"), ids=lambda block: first_line(block)[:40])
def test_json_example(block: str, scratch: Path) -> None:
    JSON_CHECKS[first_line(block)](block, scratch)
