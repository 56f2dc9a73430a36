"""`sdserver generate`: one image from the command line, in-process or against a running server."""

from __future__ import annotations

import base64
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import typer
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from sdserver.core.errors import SDServerError
from sdserver.imaging import encode_image

FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}
console = Console(stderr=True)


def _fail(message: str, code: int = 2) -> typer.Exit:
    # soft_wrap: one line whatever the terminal width (a script may read it)
    console.print(f"[red]error:[/red] {message}", soft_wrap=True, highlight=False)
    return typer.Exit(code)


def _interrupted(message: str) -> typer.Exit:
    console.print(message, soft_wrap=True, highlight=False)
    return typer.Exit(130)  # the shell's convention for "stopped by Ctrl-C"


def _size(size: str | None) -> dict[str, int]:
    if size is None:
        return {}
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", size)
    if match is None:
        raise _fail(f"--size: must be WIDTHxHEIGHT (e.g. 512x512), got {size!r}")
    return {"width": int(match.group(1)), "height": int(match.group(2))}


def _bar() -> Progress:
    """A progress bar on a terminal; nothing in a pipe or a file (machine output stays one line)."""
    return Progress(
        TextColumn("[bold]denoising"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not console.is_terminal,
    )


def run_generate(
    *,
    prompt: str,
    output: Path,
    fields: dict[str, Any],
    size: str | None,
    quality: int,
    url: str | None,
    config: Path | None,
    device: str | None,
) -> None:
    output_format = FORMATS.get(output.suffix.lower())
    if output_format is None:
        raise _fail(f"--output: use a .png, .jpg or .webp file name, got {str(output)!r}")
    data = {"prompt": prompt, **{k: v for k, v in fields.items() if v is not None}, **_size(size)}
    if url is not None:
        image, png = _remote(url.rstrip("/"), data)
    else:
        image, png = _in_process(data, config, device)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(png if output_format == "png" else encode_image(image, output_format, quality))
    params = json.loads(image.info.get("parameters_json", "{}"))
    seed, steps = params.get("seed", "?"), params.get("steps", "?")
    # typer.echo: never wrapped, whatever the terminal (scripts and tests read this line)
    typer.echo(f"wrote {output} (seed {seed}, {image.width}x{image.height}, {steps} steps)")


def _in_process(data: dict[str, Any], config: Path | None, device: str | None) -> tuple[Image.Image, bytes]:
    from sdserver import logs
    from sdserver.core.types import validate_request
    from sdserver.settings import load_settings

    logs.configure("warning")  # the library's info lines are the server's story, not this command's
    logs.quiet_libraries()  # before the engine imports torch, transformers and diffusers
    model = data.pop("model", None)
    try:
        settings = load_settings(config, model=model, device=device)
        request = validate_request(data, limits=settings.limits)
        from sdserver.engine import Engine

        engine = Engine.from_settings(settings)
        with console.status("loading the model"):
            engine.load()
    except SDServerError as exc:
        raise _fail(exc.message) from None
    return _run_in_process(engine, request)


def _run_in_process(engine: Any, request: Any) -> tuple[Image.Image, bytes]:
    from sdserver.imaging import encode_png
    from sdserver.service.jobs import Job
    from sdserver.service.scheduler import Scheduler

    scheduler = Scheduler(engine, max_queue=1, max_batch_size=1, batch_window_s=0)
    scheduler.start()
    job: Job | None = None
    try:
        with _bar() as bar:
            task = bar.add_task("denoising", total=request.steps)

            def on_change(job: Job) -> None:
                if job.progress is not None:
                    bar.update(task, completed=job.progress.step, total=job.progress.total)

            job = scheduler.submit(request)
            job.add_listener(on_change)
            result = job.wait()
    except SDServerError as exc:
        raise _fail(exc.message, 1) from None
    except KeyboardInterrupt:
        raise _interrupted("cancelled") from None
    finally:
        scheduler.stop(timeout=0 if job is None or not job.done else 10)
    image = result.images[0].image
    return image, encode_png(image)


def _events(response: httpx.Response) -> Iterator[tuple[str, dict[str, Any]]]:
    event = "message"
    for line in response.iter_lines():
        if line.startswith("event:"):
            event = line.removeprefix("event:").strip()
        elif line.startswith("data:"):
            yield event, json.loads(line.removeprefix("data:").strip())
            event = "message"


def _remote(url: str, data: dict[str, Any]) -> tuple[Image.Image, bytes]:
    job_id: str | None = None
    try:
        with httpx.Client(base_url=url, timeout=httpx.Timeout(30.0, read=None)) as client:
            try:
                created = client.post("/v1/jobs", json=data)
                if created.status_code >= 400:
                    raise _fail(_message(created))
                job_id = str(created.json()["id"])
                return _follow(client, job_id, data.get("steps"))
            except KeyboardInterrupt:
                raise _interrupted(_cancel(client, url, job_id)) from None
    except httpx.HTTPError as exc:
        raise _fail(f"cannot reach {url}: {exc}", 1) from None


def _follow(client: httpx.Client, job_id: str, steps: int | None) -> tuple[Image.Image, bytes]:
    """Follow the job's events to its end: its image, or a failure."""
    with _bar() as bar, client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        task = bar.add_task("denoising", total=steps)
        for event, payload in _events(response):
            progress = payload.get("progress")
            if event == "progress" and progress:
                bar.update(task, completed=progress["step"], total=progress["total"])
            elif event == "succeeded":
                png = base64.b64decode(payload["images"][0]["base64"])
                return Image.open(io.BytesIO(png)), png
            elif event in ("failed", "cancelled"):
                error = payload.get("error") or {}
                raise _fail(f"the job {event}: {error.get('message', '')}", 1)
    raise _fail("the server closed the event stream before the job finished", 1)


def _cancel(client: httpx.Client, url: str, job_id: str | None) -> str:
    """Cancel the job on the server (on Ctrl-C); the one line to print."""
    if job_id is None:
        return "cancelled before the job was created"
    try:
        client.delete(f"/v1/jobs/{job_id}", timeout=5)
    except httpx.HTTPError as exc:
        return f"interrupted; could not cancel job {job_id} on {url}: {exc}"
    return f"cancelled job {job_id} on {url}"


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code}"
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("message"))
    return str(body.get("message", body)) if isinstance(body, dict) else str(body)
