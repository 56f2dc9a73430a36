#!/usr/bin/env bash
# Install sdserver, its Ray extra and its test tools into .venv (once), then run the linters and the whole test suite.
# Extra arguments go to pytest (e.g. `scripts/test.sh -k original -x`).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh
ensure_venv "[test,ray]"  # ray: the scale-out tests (tests/cluster) run too

ruff check src tests bench training
ruff format --check src tests bench training
mypy
python -m pytest "$@"
