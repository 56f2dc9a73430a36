"""Command line: `sdserver serve`, `sdserver generate`, `sdserver make-tiny-model`.

Nothing here imports torch at module level: settings are read and checked, and the port is bound,
before the engine (and torch) is imported, so a bad configuration or a port in use fails in a second.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from sdserver import __version__, cli_options, logs
from sdserver.core.errors import ConfigError
from sdserver.settings import DEFAULT_MODEL, Settings

app = typer.Typer(
    help="sdserver: a local Stable Diffusion inference server.",
    no_args_is_help=True,
    rich_markup_mode=None,  # plain help: plain metavars, no boxes, the same in a pipe
    context_settings={"help_option_names": ["-h", "--help"]},
)
SERVE_OPTIONS = cli_options.setting_options()
SERVE_EPILOG = (
    "Every option can also be set in the environment as SDSERVER_<NAME> (e.g. SDSERVER_PORT=8080, "
    "SDSERVER_LIMITS__MAX_STEPS=50; lists comma-separated: SDSERVER_API_KEY=k1,k2) or as a key of "
    "config.json (port, limits.max_steps...). Precedence: flags, then environment, then config.json. "
    f"The default model is {DEFAULT_MODEL} from the Hugging Face hub (cached, or downloaded on first "
    "use); offline and not cached, the bundled demo model is served instead."
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sdserver {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit")
    ] = False,
) -> None:
    """sdserver: a local Stable Diffusion inference server."""


def serve(
    config: Annotated[
        Path | None, typer.Option(metavar="FILE", help="config.json in the original format [default: ./config.json]")
    ] = None,
    **flags: Any,
) -> None:
    """Serve the API: the port opens at once (/health answers), /ready and generation answer 503 until
    the models have loaded. Ctrl-C or SIGTERM finishes the work in progress (--drain-timeout); a
    second Ctrl-C stops at once."""
    given = cli_options.overrides(SERVE_OPTIONS, flags)
    logs.configure(given.get("log_level", "info"), given.get("log_format", "auto"))
    log = logging.getLogger("sdserver")
    try:
        from sdserver.settings import load_settings

        settings = load_settings(config, **given)
    except ConfigError as exc:
        log.error("cannot start: %s", exc.message)
        raise typer.Exit(2) from None
    logs.configure(settings.log_level, settings.log_format)
    logs.quiet_libraries()
    if settings.ray:  # Ray Serve listens itself (its HTTP proxy on every node)
        _serve_on_ray(settings)
        return
    try:
        sock = bind(settings.host, settings.port)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        log.error("cannot start: cannot listen on %s port %d: %s", settings.host, settings.port, reason)
        raise typer.Exit(2) from None
    from sdserver.api.security import warn_if_exposed
    from sdserver.server import run

    warn_if_exposed(settings)
    host, port = sock.getsockname()[:2]
    log.info("listening on http://%s:%d (loading the models: /health answers now, /ready once loaded)", host, port)
    code = run(settings, sock)
    # Exit now: the interpreter's teardown of torch takes seconds, and aborts if a model is mid-load.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, bound now: a port in use is found before anything loads."""
    addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = addresses[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _serve_on_ray(settings: Settings) -> None:
    from sdserver.api.security import warn_if_exposed
    from sdserver.cluster.launch import serve_on_ray

    warn_if_exposed(settings)
    status = serve_on_ray(settings)
    if status:
        raise typer.Exit(status)


app.command(epilog=SERVE_EPILOG)(cli_options.with_setting_options(serve, SERVE_OPTIONS))


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
    model: Annotated[
        str | None,
        typer.Option(help=f"In-process: hub id, folder, file or 'demo' (default {DEFAULT_MODEL}); --url: a model name"),
    ] = None,
    steps: Annotated[
        int | None, typer.Option(help="Denoising steps (default: the model's own: 20 for the demo, 50 for SD)")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed (default random)")] = None,
    size: Annotated[
        str | None, typer.Option(help="WIDTHxHEIGHT, e.g. 512x512 (default: the model's native size)")
    ] = None,
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
    """Generate one image, in-process or on a running server (--url), with a progress bar on a
    terminal. The last line says what was written: `wrote out.png (seed 42, 64x64, 20 steps)`.
    Ctrl-C cancels the job (on the server too) and exits 130."""
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
