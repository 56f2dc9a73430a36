#!/usr/bin/env bash
# bench/gpu.py on a GPU machine that has CUDA torch, transformers and accelerate but not the rest of
# sdserver's dependencies, and no network (the lent H200s: Python 3.12, torch with CUDA).
#
#   bash bench/gpu-run.sh wheels        # here, with network: the missing packages as wheels in .whl/
#   bash bench/gpu-run.sh run [ARGS]    # there: install .whl/ into /tmp/site and run bench/gpu.py ARGS
#
# .whl/ is ignored by git (add `/.whl/` to .git/info/exclude) and travels as a carried path.
set -euo pipefail
cd "$(dirname "$0")/.."
# What the image lacks (the versions our CI runs); torch, transformers, accelerate, peft and the rest are there.
PACKAGES=(
    diffusers==0.42.1 fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic-core==2.50.5
    pydantic-settings==2.16.3 python-dotenv==1.2.4 annotated-types==0.8.0 typing-inspection==0.4.5
    typing-extensions==4.16.0 opentelemetry-api==1.45.2 importlib-metadata==10.2.0 lazy-importer==0.1.0
    zipp==4.1.2 anyio==4.16.0 annotated-doc==0.0.7 uvicorn==0.54.0 python-multipart==0.0.34
    fastapi-offline==1.7.7 torchsde==0.2.6 trampoline==0.1.2 gguf==0.19.0
)
case "${1:-}" in
wheels)
    rm -rf .whl && mkdir -p .whl
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${PACKAGES[@]}"
    du -sh .whl
    ;;
run)
    shift
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD/src" PYTHONUNBUFFERED=1
    python3 bench/gpu.py "$@"
    ;;
*)
    echo "usage: bash bench/gpu-run.sh wheels | run [bench/gpu.py arguments]" >&2
    exit 2
    ;;
esac
