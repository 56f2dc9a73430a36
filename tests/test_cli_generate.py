"""`sdserver generate`: one image in-process, or through a running server's jobs API."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from sdserver.cli import app
from sdserver.metadata import parse_infotext
from tests.conftest import SIZE, STEPS, LiveServer, spying, wait_until

runner = CliRunner()


def test_in_process_png_with_parameters(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.png"
    args = ["generate", "a red circle", "-o", str(out), "--model", str(tiny_model), "--steps", str(STEPS)]
    args += ["--seed", "5", "--size", f"{SIZE}x{SIZE}", "--sampler", "euler a", "--negative-prompt", "blue"]
    result = runner.invoke(app, [*args, "--device", "cpu", "--config", str(tmp_path / "none.json")])
    assert result.exit_code == 0, result.output
    image = Image.open(out)
    assert image.format == "PNG" and image.size == (SIZE, SIZE)
    info = parse_infotext(image.info["parameters"])
    assert (info["Seed"], info["Steps"], info["Sampler"], info["Negative prompt"]) == (5, STEPS, "Euler a", "blue")
    assert "wrote" in result.output and "seed 5" in result.output


def test_against_a_server_as_webp(live: LiveServer, tmp_path: Path) -> None:
    out = tmp_path / "out.webp"
    url = live.url
    args = ["generate", "a red circle", "-o", str(out), "--url", url, "--steps", str(STEPS), "--seed", "8"]
    result = runner.invoke(app, [*args, "--size", f"{SIZE}x{SIZE}", "--quality", "70"])
    assert result.exit_code == 0, result.output
    image = Image.open(out)
    assert image.format == "WEBP" and image.size == (SIZE, SIZE)
    assert "seed 8" in result.output


def test_server_side_errors_are_reported(live: LiveServer, tmp_path: Path) -> None:
    url = live.url
    result = runner.invoke(app, ["generate", "x", "-o", str(tmp_path / "o.png"), "--url", url, "--sampler", "nope"])
    assert result.exit_code == 2
    assert "sampler" in result.output and "'nope'" in result.output


def test_bad_arguments(tmp_path: Path) -> None:
    result = runner.invoke(app, ["generate", "x", "-o", str(tmp_path / "o.png"), "--size", "big"])
    assert result.exit_code == 2 and "--size" in result.output
    result = runner.invoke(app, ["generate", "x", "-o", str(tmp_path / "o.gif")])
    assert result.exit_code == 2 and "--output" in result.output


def test_the_last_line_is_never_wrapped_whatever_the_terminal_width(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / ("a-rather-long-folder-name-" * 4) / "out.png"
    args = [sys.executable, "-m", "sdserver", "generate", "a red circle", "-o", str(out), "--model", str(tiny_model)]
    args += ["--steps", str(STEPS), "--seed", "5", "--size", f"{SIZE}x{SIZE}", "--device", "cpu"]
    env = {**os.environ, "COLUMNS": "20", "LINES": "5"}
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"wrote {out} (seed 5, {SIZE}x{SIZE}, {STEPS} steps)\n"
    assert result.stderr == "", result.stderr  # no library warnings, no progress bars in a pipe


def test_ctrl_c_cancels_the_job_on_the_server_and_exits_130(live: LiveServer, tmp_path: Path) -> None:
    # -X faulthandler: a CLI that hangs is aborted and shows where each of its threads stood.
    args = [sys.executable, "-X", "faulthandler", "-m", "sdserver", "generate", "x", "-o", str(tmp_path / "o.png")]
    with spying(live.app) as spy:
        spy.gate.clear()
        process = subprocess.Popen(
            [*args, "--url", live.url, "--steps", str(STEPS)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        assert spy.entered.wait(120), "the job never started"
        process.send_signal(signal.SIGINT)
        try:
            output, _ = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGABRT)
            pytest.fail(f"the CLI did not exit after Ctrl-C:\n{process.communicate(timeout=30)[0].decode()}")
    assert process.returncode == 130
    (job,) = live.scheduler.jobs.all()
    assert output.decode().splitlines() == [f"cancelled job {job.id} on {live.url}"]
    wait_until(lambda: job.done, timeout=60)
    assert job.status.value == "cancelled"
