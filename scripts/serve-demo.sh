#!/usr/bin/env bash
# Install sdserver into .venv and serve the bundled demo model on http://127.0.0.1:1337 (works offline).
# Extra arguments go to `sdserver serve` (e.g. `--port 8080`, `--host 0.0.0.0`).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}  # on a CUDA box: TORCH_SPEC=torch (or the build for your CUDA)

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "$TORCH_SPEC"
python -m pip install -q -e .
exec sdserver serve --model demo "$@"
