"""`sdserver serve --ray`: join (or start) Ray, deploy the application, serve until Ctrl-C or SIGTERM.

The process stays in the foreground like the single server: on exit it deletes the application (the
replicas finish their work, up to --drain-timeout), and a Ray it started itself stops with it. For a
long-lived deployment on a cluster use KubeRay or `serve deploy` (docs/kuberay.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

from sdserver.core.errors import ConfigError
from sdserver.settings import Settings, is_hub_id

from .board import NAMESPACE, board_name

log = logging.getLogger("sdserver")
REACH_TIMEOUT_S = 5.0


def serve_on_ray(settings: Settings) -> int:
    """Run until a signal; the exit status (2: it could not start)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
        from ray import serve  # noqa: F401
    except ImportError:
        log.error("cannot start: --ray needs Ray Serve: pip install 'sdserver[ray]'")
        return 2
    problem = unreachable(settings.ray_address)
    if problem is not None:
        log.error("cannot start: %s", problem)
        return 2
    settings = with_absolute_paths(settings)
    started_here = settings.ray_address is None
    if started_here:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private, local Ray: no token to hand out
    try:
        ray.init(
            address=settings.ray_address, namespace=NAMESPACE, include_dashboard=False, logging_level=logging.WARNING
        )
    except Exception as exc:
        log.error("cannot start: Ray at %s: %s", settings.ray_address or "(local)", _one_line(exc))
        return 2
    try:
        return _serve(settings)
    except ConfigError as exc:
        log.error("cannot start: %s", exc.message)
        return 2
    finally:
        _tear_down(settings)
        ray.shutdown()  # a local Ray started here stops with it


def _serve(settings: Settings) -> int:
    import ray
    from ray import serve

    from .app import build, plan

    gpus = float(ray.cluster_resources().get("GPU", 0))
    described = plan(settings, gpus).describe()
    application = build(settings, gpus)
    log.info("deploying on Ray Serve: %s, %d ingress replica(s)", described, settings.ingress_replicas)
    stop, serving = threading.Event(), threading.Event()

    def on_signal(*_: object) -> None:
        stop.set()
        if not serving.is_set():  # still deploying: stop that (the caller tears down)
            raise KeyboardInterrupt

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
    except Exception as exc:
        log.error("cannot start: Ray Serve's controller did not start: %s", _one_line(exc))
        return 2
    try:
        serve.run(application, name=settings.ray_app_name, route_prefix="/", blocking=False)
    except RuntimeError as exc:
        log.error("cannot start: the application failed to deploy: %s", _one_line(exc))
        return 1
    except KeyboardInterrupt:
        log.info("stopped while deploying")
        return 0
    serving.set()
    where = f"http://{settings.host}:{settings.port}"
    log.info("listening on %s (Ray Serve application %r)", where, settings.ray_app_name)
    stop.wait()
    log.info("stopping: the replicas finish their work (up to %gs)", settings.drain_timeout)
    return 0


def _tear_down(settings: Settings) -> None:
    import ray
    from ray import serve

    try:
        serve.delete(settings.ray_app_name)
    except Exception as exc:
        log.warning("deleting the application: %s", _one_line(exc))
    with contextlib.suppress(ValueError):  # ValueError: no board was created
        ray.kill(ray.get_actor(board_name(settings.ray_app_name), namespace=NAMESPACE))


def with_absolute_paths(settings: Settings) -> Settings:
    """Local paths made absolute (the replicas do not run in this working directory)."""

    def absolute(value: str | None) -> str | None:
        if value is None or is_hub_id(value) or value == "demo":
            return value
        path = Path(value).expanduser()
        return str(path.resolve()) if path.exists() else value

    customs = [model.model_copy(update={"model_path": absolute(model.model_path)}) for model in settings.custom_models]
    return settings.model_copy(
        update={
            "model": absolute(settings.model),
            "models_dir": absolute(settings.models_dir),
            "loras_dir": absolute(settings.loras_dir),
            "upscalers_dir": absolute(settings.upscalers_dir),
            "controlnet_dir": absolute(settings.controlnet_dir),
            "embeddings_dir": absolute(settings.embeddings_dir),
            "outputs_dir": str(Path(settings.outputs_dir).expanduser().resolve()),
            "encoders": {family: absolute(source) or source for family, source in settings.encoders.items()},
            "custom_models": customs,
        }
    )


def unreachable(address: str | None) -> str | None:
    """Why the Ray cluster at `address` cannot be reached (a TCP connect within 5 s), or None.

    ray.init would retry for minutes against a wrong address; this says so at once, in one line."""
    if address is None or address == "auto":
        return None
    parsed = urlparse(address if "://" in address else f"gcs://{address}")
    default_port = 10001 if parsed.scheme == "ray" else 6379
    host, port = parsed.hostname, parsed.port or default_port
    if not host:
        return f"--ray-address {address!r} is not host:port or ray://host:port"
    try:
        with socket.create_connection((host, port), timeout=REACH_TIMEOUT_S):
            return None
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        return (
            f"no Ray cluster answers at {host}:{port} ({reason}); start one with `ray start --head` "
            "there, or check --ray-address"
        )


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
