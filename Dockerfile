# sdserver in a container: CPU by default; for NVIDIA GPUs build with a CUDA build of PyTorch:
#   docker build -t sdserver .                               # CPU
#   docker build -t sdserver:cuda --build-arg TORCH=cu128 .  # CUDA 12.8 (needs the NVIDIA Container Toolkit to run)
# It serves the bundled demo model with no network; see README.md ("Docker") for the run commands.
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

# cpu, or a CUDA tag of PyTorch's wheel index (cu126, cu128...); TORCH_SPEC pins the version.
ARG TORCH=cpu
ARG TORCH_SPEC=torch
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/data/hf-cache \
    SDSERVER_HOST=0.0.0.0 \
    SDSERVER_PORT=1337 \
    SDSERVER_MODELS_DIR=/data/models

RUN pip install --index-url "https://download.pytorch.org/whl/${TORCH}" "${TORCH_SPEC}"
WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
# spandrel (model upscalers) without its dependencies: it asks for torchvision, which sdserver does not need
RUN pip install . \
    && pip install --no-deps "spandrel>=0.4,<0.5" "einops>=0.7" \
    && useradd --create-home --uid 1000 sdserver \
    && mkdir -p /data/models /data/outputs /data/hf-cache \
    && chown -R sdserver:sdserver /data

USER sdserver
# The working folder: a config.json here is read (mount one at /data/config.json). models: every diffusers
# folder or .safetensors file in it is a model (--models-dir); outputs: the saved history (--outputs-dir,
# relative to here); hf-cache: models downloaded from the Hugging Face hub.
WORKDIR /data
VOLUME ["/data/models", "/data/outputs", "/data/hf-cache"]
EXPOSE 1337
# /ready: 200 once the models are loaded and the worker accepts work (503 while loading or draining).
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:1337/ready', timeout=4)"
# docker stop sends SIGTERM: the server finishes its work (--drain-timeout, 30 s), so give it longer
# (docker stop -t 40, or stop_grace_period in compose.yaml).
STOPSIGNAL SIGTERM
ENTRYPOINT ["sdserver"]
CMD ["serve", "--model", "demo"]
