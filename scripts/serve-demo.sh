#!/usr/bin/env bash
# Install sdserver into .venv (once) and serve the bundled demo model on http://127.0.0.1:1337 (offline).
# Extra arguments go to `sdserver serve` (e.g. `--port 8080`, `--host 0.0.0.0`).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh
ensure_venv ""
exec sdserver serve --model demo "$@"
