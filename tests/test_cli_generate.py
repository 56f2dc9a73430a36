"""`sdserver generate`: one image in-process, or through a running server's jobs API."""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from typer.testing import CliRunner

from sdserver.cli import app
from sdserver.metadata import parse_infotext
from tests.conftest import SIZE, STEPS, LiveServer

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
