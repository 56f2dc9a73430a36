#!/usr/bin/env bash
# Install sdserver, its Ray extra and its test tools into .venv, then run the linters and the whole test suite.
# Extra arguments go to pytest (e.g. `scripts/test.sh -k original -x`).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}  # the CPU build on our dev/CI machines; any torch 2.x works

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "$TORCH_SPEC"
python -m pip install -q -e '.[test,ray]'  # ray: the scale-out tests (tests/cluster) run too

ruff check src tests bench training
ruff format --check src tests bench training
mypy
python -m pytest "$@"
