"""Shared fixtures: tiny real diffusers models built once per session, and app clients over them."""

from __future__ import annotations

import base64
import functools
import io
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import uvicorn
from diffusers import DiffusionPipeline
from fastapi.testclient import TestClient
from PIL import Image

from sdserver.api.app import create_app
from sdserver.engine.tiny import make_tiny_model
from sdserver.service.scheduler import Scheduler
from sdserver.settings import Settings
from tests.support.flow_layout import all_in_one, save_gguf, save_safetensors, transformer_to_original
from tests.support.original_layout import save_single_file

SIZE = 64  # 8x8 latents with the tiny model's 8x VAE
STEPS = 3


@pytest.fixture(scope="session", autouse=True)
def _outputs_in_a_temporary_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Kept images go to a temporary folder, never to outputs/ in the working directory."""
    patch = pytest.MonkeyPatch()
    patch.setenv("SDSERVER_OUTPUTS_DIR", str(tmp_path_factory.mktemp("outputs")))
    yield
    patch.undo()


@pytest.fixture(scope="session")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_model(models_root: Path) -> Path:
    return make_tiny_model(models_root / "tiny")


@pytest.fixture(scope="session")
def tiny_inpainting_model(models_root: Path) -> Path:
    return make_tiny_model(models_root / "tiny-inpainting", inpainting=True, seed=1)


@pytest.fixture(scope="session")
def tiny_model_without_checker(models_root: Path) -> Path:
    return make_tiny_model(models_root / "tiny-no-checker", safety_checker=False, seed=2)


@pytest.fixture(scope="session")
def tiny_flagging_model(models_root: Path) -> Path:
    return make_tiny_model(models_root / "tiny-flagging", always_flag=True, seed=3)


@dataclass(frozen=True)
class ArchModel:
    """One tiny model of an architecture, as a diffusers folder and as original-layout single files."""

    folder: Path
    safetensors: Path
    ckpt: Path


ArchModels = Callable[..., ArchModel]


@pytest.fixture(scope="session")
def arch_model(models_root: Path) -> ArchModels:
    """arch_model("sd2", inpainting=True): built on first use, then shared by the session."""
    built: dict[tuple[str, bool], ArchModel] = {}

    def build(arch: Any, inpainting: bool = False) -> ArchModel:
        if (arch, inpainting) not in built:
            name = f"{arch}-inpainting" if inpainting else arch
            folder = models_root / "arch" / name
            make_tiny_model(folder, arch=arch, inpainting=inpainting, clip_vocab=True, safety_checker=False, seed=100)
            pipe = DiffusionPipeline.from_pretrained(folder)
            files = models_root / "arch-files"
            files.mkdir(exist_ok=True)
            safetensors = save_single_file(pipe, files / f"{name}.safetensors")
            built[arch, inpainting] = ArchModel(folder, safetensors, save_single_file(pipe, files / f"{name}.ckpt"))
        return built[arch, inpainting]

    return build


@dataclass(frozen=True)
class FlowModel:
    """One tiny SD3 / FLUX model, as a diffusers folder and as the single files people download:
    the all-in-one checkpoint (ComfyUI layout), the transformer alone in its original layout, and
    the transformer alone quantised to Q8_0 GGUF."""

    arch: str
    folder: Path
    all_in_one: Path
    transformer: Path
    gguf: Path

    @functools.cached_property
    def pipeline(self) -> Any:
        """The folder loaded once per session with diffusers' own from_pretrained (do not modify it)."""
        # diffusers lists SD3's T5 as required: a folder without it loads with explicit Nones.
        index = json.loads((self.folder / "model_index.json").read_text())
        no_t5 = {"text_encoder_3": None, "tokenizer_3": None} if index.get("text_encoder_3") == [None, None] else {}
        return DiffusionPipeline.from_pretrained(self.folder, **no_t5)


FlowModels = Callable[..., FlowModel]


@pytest.fixture(scope="session")
def flow_model(models_root: Path) -> FlowModels:
    """flow_model("sd3"), flow_model("flux-fill"), flow_model("sd3", t5=False): built on first use."""
    built: dict[tuple[str, bool], FlowModel] = {}

    def build(arch: Any, t5: bool = True) -> FlowModel:
        if (arch, t5) not in built:
            name = arch if t5 else f"{arch}-no-t5"
            folder = make_tiny_model(models_root / "flow" / name, arch=arch, t5=t5, seed=200)
            files = models_root / "flow-files"
            paths = (files / f"{name}{end}" for end in (".safetensors", "-transformer.safetensors", "-Q8_0.gguf"))
            model = FlowModel(arch, folder, *paths)
            original = transformer_to_original(model.pipeline.transformer)
            save_safetensors(all_in_one(model.pipeline), model.all_in_one)
            save_safetensors(original, model.transformer)
            save_gguf(original, model.gguf, arch="sd3" if arch.startswith("sd3") else "flux")
            built[arch, t5] = model
        return built[arch, t5]

    return build


@pytest.fixture(scope="session")
def family_model(
    tiny_model: Path, tiny_inpainting_model: Path, arch_model: ArchModels, flow_model: FlowModels
) -> Callable[[str], Path]:
    """family_model("flux"): a tiny model folder of each family (sd1, sd1-inpainting, sdxl, sd3, flux,
    flux-schnell, flux-fill), built on first use and shared by the session."""
    built: dict[str, Path] = {"sd1": tiny_model, "sd1-inpainting": tiny_inpainting_model}

    def build(arch: str) -> Path:
        if arch not in built:
            if arch == "sdxl":
                built[arch] = arch_model("sdxl").folder
            else:
                built[arch] = flow_model(arch).folder
        return built[arch]

    return build


ClientFactory = Callable[..., TestClient]


@contextmanager
def _client_factory() -> Iterator[ClientFactory]:
    clients: list[TestClient] = []

    def factory(**settings: Any) -> TestClient:
        client = TestClient(create_app(Settings(**settings)), raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield factory
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def make_client() -> Iterator[ClientFactory]:
    """Start the real app (lifespan: model loading, worker) on the given settings."""
    with _client_factory() as factory:
        yield factory


@pytest.fixture(scope="module")
def make_module_client() -> Iterator[ClientFactory]:
    """As make_client, for a client shared by a module's tests (models load once)."""
    with _client_factory() as factory:
        yield factory


@pytest.fixture
def client(make_client: ClientFactory, tiny_model: Path) -> TestClient:
    return make_client(model=str(tiny_model))


def png_b64(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode()


def decode_png(data: str) -> Image.Image:
    raw = base64.b64decode(data)
    assert raw.startswith(b"\x89PNG\r\n\x1a\n"), "expected a PNG"
    return Image.open(io.BytesIO(raw))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def max_pixel_diff(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


def scene(size: int = SIZE) -> Image.Image:
    """A test picture: left half red, right half blue, a green square in the middle."""
    image = Image.new("RGB", (size, size), (200, 30, 30))
    image.paste((30, 30, 200), (size // 2, 0, size, size))
    image.paste((30, 200, 30), (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    return image


def half_mask(size: int = SIZE) -> Image.Image:
    """White (repaint) on the top half, black (keep) below."""
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (0, 0, size, size // 2))
    return mask


class GatedFamily:
    """A spy around a loaded model's family (install it as `pipelines.family`): records the prompts of
    every denoiser forward that starts a request (one entry per image, the whole batch), can hold the
    denoiser at a gate, and can inject a fault for one prompt. The real family still draws every image."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.calls: list[list[str]] = []
        self.fail_on: str | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def forward(self, model: Any, states: Any, inputs: Any, timesteps: Any) -> Any:
        if any(state.index == 0 for state in states):
            self.calls.append([state.request.prompt for state in states for _ in range(state.rows)])
        self.entered.set()
        assert self.gate.wait(60), "gate never opened"
        if self.fail_on is not None and any(self.fail_on in state.request.prompt for state in states):
            raise RuntimeError(f"injected fault for {self.fail_on!r}")
        return self.real.forward(model, states, inputs, timesteps)


@contextmanager
def spying(client_app: Any, spy_type: Any = None, **options: Any) -> Iterator[Any]:
    """Install a spy (GatedFamily by default) on the base model's family for the block."""
    pipelines = client_app.state.engine.registry.get(None)
    spy = (spy_type or GatedFamily)(pipelines.family, **options)
    pipelines.family = spy
    try:
        yield spy
    finally:
        spy.gate.set()
        pipelines.family = spy.real


@pytest.fixture
def gated(client: TestClient) -> Iterator[GatedFamily]:
    """The default client's base model, its family wrapped in a GatedFamily."""
    with spying(client.app) as spy:
        yield spy


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


class LiveServer:
    """The real app on a real socket, served by uvicorn in a thread (for clients that bring their own
    HTTP stack, and for tests of connections). `start()` returns once it accepts connections."""

    def __init__(self, **settings: Any) -> None:
        self.app = create_app(Settings(**settings))
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def scheduler(self) -> Scheduler:
        scheduler: Scheduler = self.app.state.scheduler
        return scheduler

    def start(self) -> LiveServer:
        self.thread.start()
        wait_until(lambda: self.server.started, timeout=120)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture
def live(tiny_model: Path) -> Iterator[LiveServer]:
    server = LiveServer(model=str(tiny_model)).start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """The CLI run in-process (serve, generate) installs its own log handler, on a stream the runner
    closes afterwards: put pytest's back after every test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
