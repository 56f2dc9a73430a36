"""Load a model source into pipelines: a hub id, a local diffusers folder, a single-file checkpoint
(.safetensors, or .ckpt through a weights-only unpickler), or the bundled demo.

SD 1.x, 2.x and XL load through the same path; txt2img, img2img and inpainting pipelines are built
with `from_pipe`, so the three share one set of weights in memory. The safety checker is kept beside
the pipelines (see `safety.py`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import diffusers
import torch
from diffusers import DiffusionPipeline

from sdserver.core.errors import ModelLoadError, SDServerError, UnsupportedModel
from sdserver.engine import families
from sdserver.engine.architectures import Prediction
from sdserver.engine.embeddings import EmbeddingSet, load_embeddings
from sdserver.engine.families import Family
from sdserver.engine.families.base import Description, FileOptions
from sdserver.engine.flowfiles import read_flow_shapes
from sdserver.engine.safety import SafetyChecker
from sdserver.settings import DEMO_MODEL, is_hub_id, is_single_file, looks_like_path

if TYPE_CHECKING:
    from sdserver.engine.memory import Decoder, MemoryModel, RowSplitter
    from sdserver.engine.speed import Tuning

log = logging.getLogger(__name__)


class _EmptyFp32Warning(logging.Filter):
    """diffusers warns "There are modules in X that should be kept in float32: []" on every dtype cast
    of a single-file load, even when there are none: drop just that empty case."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("There are modules in") and "float32: []." in message)


logging.getLogger("diffusers.models.modeling_utils").addFilter(_EmptyFp32Warning())
diffusers.utils.logging.disable_progress_bar()  # "Loading pipeline components" bars: not in a server's log

Form = Literal["folder", "file", "hub"]


DEFAULT_STEPS = 50  # Stable Diffusion's own default (diffusers' pipelines); a model folder may say otherwise
DEFAULTS_FILE = "sdserver.json"  # in a model folder: {"default_steps": 20}


def demo_model_path() -> Path:
    return Path(str(resources.files("sdserver") / "assets" / "demo"))


@dataclass
class LoadedPipelines:
    """A loaded model: its family, and the pipelines (sharing one set of weights) whose helpers the
    family's generation calls use."""

    # diffusers pipelines (typed Any: their classes are not precisely typed)
    txt2img: Any
    img2img: Any
    inpaint: Any
    family: Family
    checker: SafetyChecker | None  # own or borrowed from the base model; None: images are not checked
    description: Description
    native_size: int
    weights_hash: str  # sha256 of the denoiser's weights: the "model hash" in image metadata
    memory_bytes: int  # parameters and buffers of this model's own components
    default_steps: int = DEFAULT_STEPS  # what a request that names none gets (the family's, e.g. FLUX schnell: 4)
    default_guidance: float = 7.5
    # Speed and memory (engine/speed.py, engine/memory.py)
    owns_checker: bool = True  # False: the checker is borrowed from the base model (and placed by it)
    offload: str = "none"  # none, model or sequential
    memory: MemoryModel | None = field(default=None, repr=False)  # None: no budget to keep (CPU, no limit)
    splitter: RowSplitter | None = field(default=None, repr=False)
    decoder: Decoder | None = field(default=None, repr=False)
    # Textual-inversion embeddings registered with the shared text encoders, and those skipped (embeddings.py)
    embeddings: EmbeddingSet = field(default_factory=EmbeddingSet, repr=False)

    @property
    def inpainting_unet(self) -> bool:
        """A dedicated inpainting model (its denoiser takes the mask) serves every task as inpainting."""
        return bool(self.description.inpainting)

    @property
    def device(self) -> torch.device:
        """Where the model computes (with offloading, its weights rest on the CPU meanwhile)."""
        device: torch.device = self.txt2img._execution_device
        return device


def resolve_source(source: str) -> tuple[str, Form]:
    """Where to load `source` from, and in which form."""
    if source == DEMO_MODEL:
        path = demo_model_path()
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(f"the bundled demo model is missing from this install ({path})")
        return str(path), "folder"
    local = Path(source).expanduser()
    if local.is_dir():
        if not (local / "model_index.json").is_file():
            raise ModelLoadError(f"{source!r} is a folder but not a diffusers model (no model_index.json)")
        return str(local), "folder"
    if local.is_file():
        if not is_single_file(local):
            raise ModelLoadError(f"{source!r} is a file but not a .safetensors, .gguf or .ckpt checkpoint")
        return str(local), "file"
    if is_hub_id(source):
        return source, "hub"
    if looks_like_path(source):
        raise ModelLoadError(f"model {source!r}: no such file or folder")
    raise ModelLoadError(
        f"model {source!r} is neither a local diffusers folder, a .safetensors/.ckpt file, nor a hub id (owner/name)"
    )


def describe_source(source: str, prediction_type: Prediction | None = None) -> Description:
    """The model's kind without loading weights; UnsupportedModel if it is a kind we cannot serve."""
    location, form = resolve_source(source)
    if form == "hub":
        return Description("unknown", None)
    if form == "file":
        return file_family(Path(location), FileOptions(prediction_type=prediction_type))[1]
    folder = Path(location)
    index = _read_json(folder / "model_index.json")
    family = families.for_pipeline_class(str(index.get("_class_name")))
    if family is None:
        raise UnsupportedModel(f"{source} is a {index.get('_class_name')}; sdserver serves {families.served_names()}")
    return family.describe_index(index, folder, source)


def file_family(path: Path, options: FileOptions) -> tuple[Family, Description]:
    """Which family a single file belongs to, from its header (a .ckpt is only read when it loads)."""
    shapes = read_flow_shapes(path)  # None for a .ckpt
    for family in families.all_families():
        found = family.detect_file(path, shapes, options)
        if found is not None:
            return family, found
    raise UnsupportedModel(f"{path.name} is not a checkpoint of a family sdserver serves ({families.served_names()})")


def load_pipelines(
    source: str,
    *,
    device: torch.device,
    dtype: torch.dtype,
    token: str | None = None,
    checker_from: LoadedPipelines | None = None,
    prediction_type: Prediction | None = None,
    encoders: str | None = None,
    family_encoders: dict[str, str] | None = None,
    tuning: Tuning | None = None,
    pipe: Any = None,
    embeddings_dir: str | None = None,
) -> LoadedPipelines:
    """Load `source` onto `device`; borrow `checker_from`'s safety checker if it has none of its own.
    `encoders` (or `family_encoders[family]`) lends an SD3/FLUX single file the parts it lacks.
    `tuning`: the speed switches and memory modes applied as it loads (engine/speed.py). `pipe`: a pipeline
    already built in memory (bench/gpu.py's random-weight models), used instead of reading `source`.
    `embeddings_dir`: the textual-inversion embeddings to register with it (embeddings.py)."""
    if pipe is not None:
        return _assemble(pipe, source, device, checker_from, prediction_type, tuning, embeddings_dir=embeddings_dir)
    location, form = resolve_source(source)
    options = FileOptions(prediction_type, encoders, dict(family_encoders or {}), token)
    try:
        if form == "file":
            owner, _ = file_family(Path(location), options)
            pipe = owner.load_file(Path(location), dtype, options)
        else:
            pipe = _from_folder(location, form, dtype, token)
    except SDServerError:
        raise
    except Exception as exc:  # diffusers raises many kinds (OSError, ValueError, hub errors)
        raise ModelLoadError(_load_failure(source, form == "hub", exc)) from exc
    folder = Path(location) if form == "folder" else None
    return _assemble(pipe, source, device, checker_from, prediction_type, tuning, folder, embeddings_dir)


def _assemble(
    pipe: Any,
    source: str,
    device: torch.device,
    checker_from: LoadedPipelines | None,
    prediction_type: Prediction | None,
    tuning: Tuning | None,
    folder: Path | None = None,
    embeddings_dir: str | None = None,
) -> LoadedPipelines:
    from sdserver.engine import speed

    family = families.for_pipeline(pipe)
    if family is None:
        raise UnsupportedModel(
            f"model {source!r} is a {type(pipe).__name__}; sdserver serves {families.served_names()}"
        )
    family.check(pipe, source)
    if prediction_type is not None and pipe.scheduler.config.get("prediction_type") != prediction_type:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=prediction_type)
    checker = SafetyChecker.of(pipe) or (checker_from.checker if checker_from is not None else None)
    tuning = tuning or speed.Tuning()
    digest = weights_hash(family.denoiser(pipe))  # of the weights as loaded (before any quantisation)
    offload = speed.prepare(pipe, family, device, tuning, source)
    placement = device if offload == "none" else torch.device("cpu")  # offloading: the hooks move weights
    if checker is not None and checker_from is None:
        checker.model.to(placement)
    txt2img, img2img, inpaint = family.pipelines(pipe, placement)
    embeddings = load_embeddings(family, txt2img, embeddings_dir)  # before offload hooks; the three share it
    steps, guidance = family.defaults(txt2img)
    loaded = LoadedPipelines(
        txt2img=txt2img,
        img2img=img2img,
        inpaint=inpaint,
        family=family,
        checker=checker,
        description=Description(family.kind_of(txt2img), family.is_inpainting(txt2img)),
        native_size=family.native_size(txt2img),
        weights_hash=digest,
        memory_bytes=_memory_bytes(txt2img, checker if checker_from is None else None),
        default_steps=_default_steps(folder, steps),
        default_guidance=guidance,
        owns_checker=checker_from is None,
        embeddings=embeddings,
    )
    speed.finish(loaded, device, tuning, offload, source)
    return loaded


def _default_steps(folder: Path | None, family_steps: int) -> int:
    """The folder's own `default_steps` (sdserver.json), else the family's."""
    if folder is None or not (folder / DEFAULTS_FILE).is_file():
        return family_steps
    steps = _read_json(folder / DEFAULTS_FILE).get("default_steps", family_steps)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ModelLoadError(f"{folder / DEFAULTS_FILE}: default_steps must be a positive integer, got {steps!r}")
    return steps


def _memory_bytes(pipe: Any, checker: SafetyChecker | None) -> int:
    modules = [module for module in pipe.components.values() if isinstance(module, torch.nn.Module)]
    if checker is not None:
        modules.append(checker.model)
    tensors = {id(t): t for module in modules for t in [*module.parameters(), *module.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _from_folder(location: str, form: Form, dtype: torch.dtype, token: str | None) -> Any:
    extra: dict[str, Any] = {}
    if form == "folder":
        index = _read_json(Path(location) / "model_index.json")
        family = families.for_pipeline_class(str(index.get("_class_name")))
        extra = family.pretrained_kwargs(index) if family is not None else {}
    return DiffusionPipeline.from_pretrained(
        location, dtype=dtype, token=token, local_files_only=form != "hub", **extra
    )


def weights_hash(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _read_json(path: Path, *, required: bool = True) -> dict[str, Any]:
    """A JSON object from `path`; an unreadable optional file reads as empty."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"it holds a JSON {type(data).__name__}, not an object")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        if not required:
            return {}
        raise ModelLoadError(f"cannot read {path}: {exc}") from None
    return data


def _load_failure(source: str, from_hub: bool, exc: Exception) -> str:
    """One line: what is missing and what to do (diffusers' own messages quote its internals)."""
    if not from_hub:
        return f"could not load model {source!r} ({_first_line(exc)})"
    names = {type(cause).__name__ for cause in _causes(exc)}
    text = " ".join(str(cause) for cause in _causes(exc))
    token = "set HF_TOKEN (or hf_token in config.json)"
    if "GatedRepoError" in names:
        return f"model {source!r} is gated on the Hugging Face hub: accept its terms on huggingface.co, then {token}"
    if "RepositoryNotFoundError" in names or "404" in text:
        return f"no model {source!r} on the Hugging Face hub (check the id; a private one needs a token: {token})"
    if "not fully cached" in text or "outgoing traffic has been disabled" in text or names & _OFFLINE_ERRORS:
        return (
            f"model {source!r} is not in the Hugging Face cache and the hub cannot be reached: "
            f"download it first with `hf download {source}`"
        )
    return f"could not load {source!r} from the Hugging Face hub ({_first_line(exc)}); try `hf download {source}`"


_OFFLINE_ERRORS = {"LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectError", "ConnectionError"}


def _causes(exc: BaseException) -> list[BaseException]:
    """The exception and its causes (diffusers wraps the hub's errors)."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _first_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return text if len(text) <= 200 else text[:197] + "..."
