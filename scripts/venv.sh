# Sourced by serve-demo.sh and test.sh: make .venv and install sdserver into it (with pip extras), unless
# a stamp shows it is already installed from this pyproject.toml, with this TORCH_SPEC and this Python.
# shellcheck shell=bash
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}  # the CPU build on our machines; on a CUDA box e.g. TORCH_SPEC=torch
# Model upscalers: spandrel without its dependencies (it asks for torchvision, which would replace a
# CPU torch with a CUDA one; sdserver imports spandrel without it). einops is its one other need.
NO_DEPS=("spandrel>=0.4,<0.5" "einops>=0.7")

install_stamp() {  # $1: extras
    { "$PYTHON" --version 2>&1; echo "$TORCH_SPEC"; echo "$1"; echo "${NO_DEPS[*]}"; cat pyproject.toml; } \
        | sha256sum | cut -d' ' -f1
}

stamp_file() {  # $1: extras ("" or "[test]")
    local name=${1//[^a-z]/}
    echo ".venv/.sdserver-installed-${name:-base}"
}

installed() {  # $1: extras; true if .venv has them, from this pyproject.toml and TORCH_SPEC
    [ -f "$(stamp_file "$1")" ] && [ "$(cat "$(stamp_file "$1")")" = "$(install_stamp "$1")" ]
}

ensure_venv() {  # $1: pip extras: "" or "[test]"
    [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
    # shellcheck disable=SC1091
    . .venv/bin/activate
    if installed "$1" || { [ -z "$1" ] && { installed "[test]" || installed "[test,ray]"; }; }; then
        return 0  # up to date (the test extras include everything the server needs)
    fi
    echo "Installing sdserver$1 into .venv: $TORCH_SPEC, diffusers, transformers and the rest (about 1.5 GB to" \
         "download and unpack: a few minutes the first time; later runs skip this until pyproject.toml or" \
         "TORCH_SPEC changes)..." >&2
    local started=$SECONDS
    python -m pip install -q --disable-pip-version-check --upgrade pip
    python -m pip install -q --disable-pip-version-check "$TORCH_SPEC"
    python -m pip install -q --disable-pip-version-check -e ".$1"
    python -m pip install -q --disable-pip-version-check --no-deps "${NO_DEPS[@]}"
    install_stamp "$1" > "$(stamp_file "$1")"
    echo "Installed in $((SECONDS - started)) s." >&2
}
