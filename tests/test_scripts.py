"""scripts/serve-demo.sh and scripts/test.sh: say once what they install, and skip the install while
.venv is up to date (a stamp of pyproject.toml, TORCH_SPEC and the Python version).

They run here against a fake Python whose pip only records what it was asked to install."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FAKE_PYTHON = """#!/usr/bin/env bash
# `python3 -m venv .venv` makes a fake venv; its python logs its calls; its sdserver echoes.
if [ "$1" = "--version" ]; then echo "Python 3.11.7"; exit 0; fi
if [ "$1 $2" = "-m venv" ]; then
    mkdir -p "$3/bin"
    printf 'PATH="%s/bin:$PATH"\\n' "$(cd "$3" && pwd)" > "$3/bin/activate"
    printf '#!/usr/bin/env bash\\necho "python $*" >> "%s/python.log"\\n' "$(cd "$3" && pwd)" > "$3/bin/python"
    printf '#!/usr/bin/env bash\\necho "sdserver $*"\\n' > "$3/bin/sdserver"
    for tool in ruff mypy; do printf '#!/usr/bin/env bash\\nexit 0\\n' > "$3/bin/$tool"; done
    chmod +x "$3/bin/"*
    exit 0
fi
exit 1
"""


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A copy of the repository's scripts and pyproject.toml, and the fake Python."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "scripts", repo / "scripts")
    shutil.copy(ROOT / "pyproject.toml", repo / "pyproject.toml")
    fake = tmp_path / "python3"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    return repo


def run(repo: Path, script: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHON": str(repo.parent / "python3"), **env}
    environment.pop("VIRTUAL_ENV", None)
    return subprocess.run(
        ["bash", f"scripts/{script}", *args], cwd=repo, capture_output=True, text=True, env=environment, timeout=60
    )


def calls(repo: Path) -> list[str]:
    log = repo / ".venv" / "python.log"
    return log.read_text().splitlines() if log.exists() else []


def pip_installs(repo: Path) -> list[str]:
    """What pip was asked to install, in order."""
    return [call.split()[-1] for call in calls(repo) if " -m pip install " in call]


def test_the_first_run_says_what_it_installs_then_the_next_runs_skip_it(checkout: Path) -> None:
    first = run(checkout, "serve-demo.sh", "--port", "8080")
    assert first.returncode == 0, first.stderr
    assert first.stdout == "sdserver serve --model demo --port 8080\n"
    said = first.stderr.splitlines()
    assert said[0].startswith("Installing sdserver into .venv: torch==2.13.0, diffusers") and "1.5 GB" in said[0]
    assert said[-1].startswith("Installed in ")
    assert pip_installs(checkout) == ["pip", "torch==2.13.0", ".", "einops>=0.7"]
    no_deps = [call for call in calls(checkout) if "--no-deps" in call]
    assert len(no_deps) == 1 and "spandrel>=0.4,<0.5 einops>=0.7" in no_deps[0], "spandrel pulls no torchvision"

    second = run(checkout, "serve-demo.sh")
    assert second.returncode == 0 and second.stderr == "" and second.stdout == "sdserver serve --model demo\n"
    assert len(pip_installs(checkout)) == 4, "nothing installed again"


@pytest.mark.parametrize("change", ["pyproject", "torch"])
def test_a_changed_pyproject_or_torch_spec_installs_again(checkout: Path, change: str) -> None:
    assert run(checkout, "serve-demo.sh").returncode == 0
    env = {}
    if change == "pyproject":
        with (checkout / "pyproject.toml").open("a") as file:
            file.write("\n# a new dependency\n")
    else:
        env["TORCH_SPEC"] = "torch==2.14.0"
    again = run(checkout, "serve-demo.sh", **env)
    assert again.returncode == 0 and again.stderr.startswith("Installing")
    assert len(pip_installs(checkout)) == 8


def test_the_test_install_covers_the_server_but_not_the_other_way_round(checkout: Path) -> None:
    assert run(checkout, "serve-demo.sh").returncode == 0
    tests = run(checkout, "test.sh", "-q")
    assert tests.returncode == 0 and tests.stderr.startswith("Installing sdserver[test,ray]")
    assert (
        pip_installs(checkout)[-2:] == [".[test,ray]", "einops>=0.7"] and calls(checkout)[-1] == "python -m pytest -q"
    )
    installs = len(pip_installs(checkout))
    assert run(checkout, "serve-demo.sh").stderr == ""
    assert run(checkout, "test.sh").stderr == ""
    assert len(pip_installs(checkout)) == installs


def test_ci_runs_the_readmes_test_command() -> None:
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in (ROOT / "README.md").read_text()
