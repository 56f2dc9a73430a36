"""Command line: `sdserver serve`, `sdserver make-tiny-model`."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer
import uvicorn
from rich.logging import RichHandler

from sdserver.core.errors import ConfigError, ModelLoadError
from sdserver.settings import Settings

app = typer.Typer(help="sdserver: a local Stable Diffusion inference server.", no_args_is_help=True)


def _configure_logging(level: str) -> None:
    # transformers warns at import that torchvision is absent (harmless: it falls back to PIL).
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.basicConfig(
        level=level.upper(), format="%(message)s", datefmt="[%X]", handlers=[RichHandler(show_path=False)]
    )
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.command()
def serve(
    config: Annotated[
        Path | None, typer.Option(help="config.json in the original format (default ./config.json)")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Base model: hub id, diffusers folder, .safetensors/.ckpt file, or 'demo'")
    ] = None,
    models_dir: Annotated[
        Path | None,
        typer.Option(help="Folder whose diffusers sub-folders and .safetensors/.ckpt files are models, by name"),
    ] = None,
    max_loaded_models: Annotated[
        int | None, typer.Option(help="Models kept loaded at most; least recently used unloads (default 3)")
    ] = None,
    max_memory_gb: Annotated[
        float | None, typer.Option(help="GB of model weights kept loaded at most (default: no limit)")
    ] = None,
    preload: Annotated[
        list[str] | None, typer.Option(help="Also load this model at start (repeat; 'all' for every model)")
    ] = None,
    loras_dir: Annotated[Path | None, typer.Option(help="Folder of LoRA .safetensors files requests may name")] = None,
    host: Annotated[str | None, typer.Option(help="Bind address (default 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 1337)")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cuda, cuda:N, mps or cpu (default auto)")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto, float16, bfloat16, float32 (default auto)")] = None,
    max_queue: Annotated[int | None, typer.Option(help="Requests waiting at most (default 64)")] = None,
    max_batch_size: Annotated[int | None, typer.Option(help="Images per pipeline call at most (default 8)")] = None,
    batch_window_ms: Annotated[float | None, typer.Option(help="Wait for batch company (default 20)")] = None,
    queue_timeout: Annotated[
        float | None, typer.Option(help="Seconds a request may wait in the queue before 504 (default 600)")
    ] = None,
    job_ttl: Annotated[float | None, typer.Option(help="Seconds finished jobs stay listed (default 3600)")] = None,
    max_jobs_kept: Annotated[int | None, typer.Option(help="Finished jobs kept at most (default 1000)")] = None,
    allow_webhooks: Annotated[
        bool | None, typer.Option("--allow-webhooks/--no-webhooks", help="Let jobs POST their result to a URL")
    ] = None,
    api_key: Annotated[
        list[str] | None, typer.Option(help="Require Authorization: Bearer KEY (repeat for several keys)")
    ] = None,
    api_auth: Annotated[list[str] | None, typer.Option(help="Also accept HTTP Basic user:pass (A1111 clients)")] = None,
    open_original_api: Annotated[
        bool | None,
        typer.Option("--open-original-api", help="Keep the original API's routes open when keys are set"),
    ] = None,
    cors_origin: Annotated[list[str] | None, typer.Option(help="Allow browser pages from this origin (repeat)")] = None,
    max_body_mb: Annotated[float | None, typer.Option(help="Largest request body in MB (default 32)")] = None,
    drain_timeout: Annotated[
        float | None, typer.Option(help="Seconds to finish queued work on SIGTERM (default 30)")
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning")] = "info",
    # Scale-out (issue 16): the other Ray settings come from the environment or config.json until the
    # options are generated from the settings (issue 11).
    ray: Annotated[bool | None, typer.Option("--ray/--no-ray", help="Serve from Ray Serve engine replicas")] = None,
    ray_address: Annotated[str | None, typer.Option(help="Ray cluster to join; none: start a local Ray")] = None,
    replicas: Annotated[int | None, typer.Option(help="Engine replicas (default: one per GPU, or 1)")] = None,
    min_replicas: Annotated[int | None, typer.Option(help="Autoscaling: fewest engine replicas")] = None,
    max_replicas: Annotated[int | None, typer.Option(help="Autoscaling: most engine replicas")] = None,
    gpus_per_replica: Annotated[float | None, typer.Option(help="GPUs per engine replica (default 1; 0: CPU)")] = None,
) -> None:
    """Load the models and serve the API."""
    _configure_logging(log_level)  # first: it quiets the libraries imported below
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from sdserver.api.app import begin_shutdown, create_app
    from sdserver.api.security import warn_if_exposed
    from sdserver.engine import Engine
    from sdserver.settings import load_settings

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    log = logging.getLogger("sdserver")
    try:
        settings = load_settings(
            config,
            model=model,
            models_dir=str(models_dir) if models_dir is not None else None,
            max_loaded_models=max_loaded_models,
            max_memory_gb=max_memory_gb,
            preload=preload or None,
            loras_dir=str(loras_dir) if loras_dir is not None else None,
            host=host,
            port=port,
            device=device,
            dtype=dtype,
            max_queue=max_queue,
            max_batch_size=max_batch_size,
            batch_window_ms=batch_window_ms,
            queue_timeout=queue_timeout,
            job_ttl=job_ttl,
            max_jobs_kept=max_jobs_kept,
            allow_webhooks=allow_webhooks,
            api_keys=api_key or None,
            api_auth=api_auth or None,
            open_original_api=open_original_api,
            cors_origins=cors_origin or None,
            max_body_mb=max_body_mb,
            drain_timeout=drain_timeout,
            ray=ray,
            ray_address=ray_address,
            replicas=replicas,
            min_replicas=min_replicas,
            max_replicas=max_replicas,
            gpus_per_replica=gpus_per_replica,
        )
        if settings.ray:
            warn_if_exposed(settings)
            _serve_on_ray(settings)
            return
        engine = Engine.from_settings(settings)
        engine.load()
    except (ConfigError, ModelLoadError) as exc:
        log.error("cannot start: %s", exc.message)
        raise typer.Exit(2) from None
    warn_if_exposed(settings)
    log.info("listening on http://%s:%d", settings.host, settings.port)
    fatal = threading.Event()

    def on_fatal() -> None:
        fatal.set()
        server.handle_exit(signal.SIGTERM, None)

    app = create_app(settings, engine, loaded=True, on_fatal=on_fatal)
    server = GracefulServer(
        uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_level=log_level.lower(),
            log_config=None,
            access_log=False,  # our RequestLog writes the structured line
            timeout_graceful_shutdown=int(settings.drain_timeout) + 5,
        ),
        on_exit_signal=lambda: begin_shutdown(app),
    )
    server.run()
    if fatal.is_set():
        log.error("exiting because the worker thread died (a supervisor should restart the server)")
        raise typer.Exit(1)


def _serve_on_ray(settings: Settings) -> None:
    from sdserver.cluster.launch import serve_on_ray

    status = serve_on_ray(settings)
    if status:
        raise typer.Exit(status)


class GracefulServer(uvicorn.Server):
    """uvicorn's Server, plus: SIGTERM/SIGINT first tell the app to drain (`on_exit_signal`), and a
    clean shutdown exits 0.

    uvicorn re-raises the captured signal once it has shut down, so the process dies "by signal";
    supervisors (systemd, Kubernetes) should see a clean exit after a graceful drain.
    """

    def __init__(self, config: uvicorn.Config, on_exit_signal: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit_signal = on_exit_signal

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:
            self._on_exit_signal()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            try:
                yield
            finally:
                self._captured_signals.clear()


@app.command("make-tiny-model")
def make_tiny_model(
    folder: Annotated[Path, typer.Argument(help="Output folder (a diffusers model folder)")],
    arch: Annotated[
        str,
        typer.Option(
            help="Layout: sd1, sd2 (v-prediction), sdxl, sd3 (= sd3.5-medium), sd3-medium, sd3.5-large, "
            "flux (= flux-dev), flux-schnell or flux-fill"
        ),
    ] = "sd1",
    inpainting: Annotated[bool, typer.Option(help="9-channel inpainting UNet")] = False,
    clip_vocab: Annotated[
        bool, typer.Option(help="SD 1.x with CLIP's real vocabulary (2.x and XL always have it)")
    ] = False,
    safety_checker: Annotated[bool, typer.Option(help="Include a (random, never-flagging) safety checker")] = True,
    always_flag: Annotated[bool, typer.Option(help="Make the safety checker flag every image")] = False,
    t5: Annotated[bool, typer.Option(help="SD3: include the T5 text encoder (FLUX always has it)")] = True,
    seed: Annotated[int, typer.Option(help="Seed of the random weights")] = 0,
) -> None:
    """Write a tiny random-weight model (a few MB, offline). It draws noise."""
    from sdserver.engine.tiny import TINY_ARCHS
    from sdserver.engine.tiny import make_tiny_model as build

    if arch not in TINY_ARCHS:
        raise typer.BadParameter(f"must be one of {', '.join(TINY_ARCHS)}; got {arch!r}", param_hint="--arch")
    if arch in ("sd1", "sd2", "sdxl"):
        options = {"inpainting": inpainting, "safety_checker": safety_checker, "always_flag": always_flag}
        build(folder, arch=arch, clip_vocab=clip_vocab, seed=seed, **options)  # type: ignore[arg-type]
    else:
        build(folder, arch=arch, t5=t5, seed=seed)  # type: ignore[arg-type]
    typer.echo(f"wrote {folder}")


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="What to draw")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Image file: .png (with parameters), .jpg or .webp")],
    model: Annotated[str | None, typer.Option(help="In-process: hub id, folder or 'demo'; --url: a model name")] = None,
    steps: Annotated[int | None, typer.Option(help="Denoising steps (default 50)")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed (default random)")] = None,
    size: Annotated[str | None, typer.Option(help="WIDTHxHEIGHT, e.g. 512x512 (default: the model's)")] = None,
    negative_prompt: Annotated[str | None, typer.Option(help="What to steer away from")] = None,
    sampler: Annotated[str | None, typer.Option(help="An A1111 sampler name, e.g. 'DPM++ 2M Karras'")] = None,
    guidance_scale: Annotated[float | None, typer.Option(help="CFG scale (default 7.5)")] = None,
    quality: Annotated[int, typer.Option(help="JPEG/WebP quality 0-100")] = 90,
    url: Annotated[
        str | None, typer.Option(help="A running sdserver (e.g. http://127.0.0.1:1337); else in-process")
    ] = None,
    config: Annotated[Path | None, typer.Option(help="config.json, in-process only")] = None,
    device: Annotated[str | None, typer.Option(help="In-process: auto, cuda, mps, cpu")] = None,
) -> None:
    """Generate one image, in-process or on a running server (--url), with a progress bar."""
    from sdserver.cli_generate import run_generate

    run_generate(
        prompt=prompt,
        output=output,
        fields={
            "model": model,
            "steps": steps,
            "seed": seed,
            "negative_prompt": negative_prompt,
            "sampler": sampler,
            "guidance_scale": guidance_scale,
        },
        size=size,
        quality=quality,
        url=url,
        config=config,
        device=device,
    )
