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
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import diffusers
import torch
import yaml
from diffusers import (
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    AutoPipelineForText2Image,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.loaders.single_file import load_single_file_sub_model

from sdserver.core.errors import ModelLoadError, SDServerError, UnsupportedModel
from sdserver.engine.architectures import Prediction, detect, write_config_folder
from sdserver.engine.checkpoint import read_shapes, read_state_dict
from sdserver.engine.safety import SafetyChecker
from sdserver.settings import DEMO_MODEL, is_hub_id, is_single_file, looks_like_path

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
# diffusers pipeline classes whose folders we serve (img2img/inpaint folders hold the same parts).
_SERVED = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionImg2ImgPipeline": "sd",
    "StableDiffusionInpaintPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLImg2ImgPipeline": "sdxl",
    "StableDiffusionXLInpaintPipeline": "sdxl",
}


DEFAULT_STEPS = 50  # Stable Diffusion's own default (diffusers' pipelines); a model folder may say otherwise
DEFAULTS_FILE = "sdserver.json"  # in a model folder: {"default_steps": 20}


def demo_model_path() -> Path:
    return Path(str(resources.files("sdserver") / "assets" / "demo"))


@dataclass(frozen=True)
class Description:
    """What a model is, as far as can be told without loading its weights."""

    kind: str  # sd1, sd2, sdxl; "unknown" for a hub model not yet loaded
    inpainting: bool | None


@dataclass
class LoadedPipelines:
    # diffusers pipelines (typed Any: their classes are not precisely typed)
    txt2img: Any
    img2img: Any
    inpaint: Any
    checker: SafetyChecker | None  # own or borrowed from the base model; None: images are not checked
    description: Description
    native_size: int
    weights_hash: str  # sha256 of the UNet weights: the "model hash" in image metadata
    memory_bytes: int  # parameters and buffers of this model's own components
    default_steps: int = DEFAULT_STEPS  # denoising steps when a request names none

    @property
    def inpainting_unet(self) -> bool:
        """A dedicated 9-channel inpainting model serves every task through `inpaint`."""
        return bool(self.description.inpainting)


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
            raise ModelLoadError(f"{source!r} is a file but not a .safetensors or .ckpt checkpoint")
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
        path = Path(location)
        arch = detect(read_shapes(path), name=path.name, prediction_type=prediction_type)
        return Description(arch.kind, arch.inpainting)
    folder = Path(location)
    index = _read_json(folder / "model_index.json")
    family = _SERVED.get(str(index.get("_class_name")))
    if family is None:
        raise UnsupportedModel(
            f"{source} is a {index.get('_class_name')}; sdserver serves Stable Diffusion 1.x, 2.x and XL pipelines"
        )
    if index.get("text_encoder", [None])[0] is None:
        raise UnsupportedModel(f"{source} has no first text encoder (an SDXL refiner?): it cannot serve txt2img")
    unet = _read_json(folder / "unet" / "config.json", required=False)
    encoder = _read_json(folder / "text_encoder" / "config.json", required=False)
    inpainting = unet.get("in_channels") == 9 if isinstance(unet.get("in_channels"), int) else None
    return Description(_kind(family, encoder.get("hidden_act")), inpainting)


def load_pipelines(
    source: str,
    *,
    device: torch.device,
    dtype: torch.dtype,
    token: str | None = None,
    checker_from: LoadedPipelines | None = None,
    prediction_type: Prediction | None = None,
) -> LoadedPipelines:
    """Load `source` onto `device`; borrow `checker_from`'s safety checker if it has none of its own."""
    location, form = resolve_source(source)
    try:
        if form == "file":
            pipe = _from_single_file(Path(location), dtype, prediction_type)
        else:
            pipe = DiffusionPipeline.from_pretrained(location, dtype=dtype, token=token, local_files_only=form != "hub")
    except SDServerError:
        raise
    except Exception as exc:  # diffusers raises many kinds (OSError, ValueError, hub errors)
        raise ModelLoadError(_load_failure(source, form == "hub", exc)) from exc
    family = _SERVED.get(type(pipe).__name__)
    if family is None or getattr(pipe, "text_encoder", None) is None:
        raise UnsupportedModel(
            f"model {source!r} is a {type(pipe).__name__} without the parts of a Stable Diffusion 1.x, 2.x or XL model"
        )
    if prediction_type is not None and pipe.scheduler.config.get("prediction_type") != prediction_type:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=prediction_type)
    checker = SafetyChecker.of(pipe) or (checker_from.checker if checker_from is not None else None)
    no_checker = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    txt2img = AutoPipelineForText2Image.from_pipe(pipe, **(no_checker if "safety_checker" in pipe.components else {}))
    if checker is not None and checker_from is None:
        checker.model.to(device)
    if txt2img.device != device:  # (diffusers warns on every .to(), needed or not)
        txt2img = txt2img.to(device)
    img2img = AutoPipelineForImage2Image.from_pipe(txt2img)
    inpaint = AutoPipelineForInpainting.from_pipe(txt2img)
    for pipeline in (txt2img, img2img, inpaint):
        pipeline.set_progress_bar_config(disable=True)
    unet = txt2img.unet
    return LoadedPipelines(
        txt2img=txt2img,
        img2img=img2img,
        inpaint=inpaint,
        checker=checker,
        description=Description(
            _kind(family, txt2img.text_encoder.config.hidden_act), int(unet.config.in_channels) == 9
        ),
        native_size=int(unet.config.sample_size) * int(txt2img.vae_scale_factor),
        weights_hash=weights_hash(unet),
        memory_bytes=_memory_bytes(txt2img, checker if checker_from is None else None),
        default_steps=_default_steps(Path(location) if form == "folder" else None),
    )


def _default_steps(folder: Path | None) -> int:
    """The folder's own `default_steps` (sdserver.json), else Stable Diffusion's."""
    if folder is None or not (folder / DEFAULTS_FILE).is_file():
        return DEFAULT_STEPS
    steps = _read_json(folder / DEFAULTS_FILE).get("default_steps", DEFAULT_STEPS)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ModelLoadError(f"{folder / DEFAULTS_FILE}: default_steps must be a positive integer, got {steps!r}")
    return steps


def _from_single_file(path: Path, dtype: torch.dtype, prediction_type: Prediction | None) -> Any:
    """A pipeline from an original-layout checkpoint, converted by diffusers with our shipped configs."""
    state = read_state_dict(path)
    shapes = {key: tuple(tensor.shape) for key, tensor in state.items()}
    arch = detect(shapes, name=path.name, prediction_type=prediction_type or _sidecar_prediction(path))
    with tempfile.TemporaryDirectory(prefix="sdserver-config-") as tmp:
        folder = write_config_folder(arch, shapes, Path(tmp), name=path.name)
        components = {}
        for name, value in _read_json(folder / "model_index.json").items():
            if not isinstance(value, list) or value[0] is None:
                continue  # a setting, or a component single files do not have (the safety checker)
            library, class_name = value
            components[name] = load_single_file_sub_model(
                library_name=library,
                class_name=class_name,
                name=name,
                checkpoint=state,
                pipelines=diffusers.pipelines,
                is_pipeline_module=hasattr(diffusers.pipelines, library),
                cached_model_config_path=str(folder),
                local_files_only=True,
                torch_dtype=dtype,
            )
    log.info("%s: %s%s, %s", path.name, arch.kind, " inpainting" if arch.inpainting else "", arch.prediction_type)
    if arch.kind == "sdxl":
        return StableDiffusionXLPipeline(**components)
    no_checker = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    return StableDiffusionPipeline(**components, **no_checker)


def _sidecar_prediction(path: Path) -> Prediction | None:
    """A1111's convention: `model.yaml` beside `model.safetensors` is its original LDM config, where
    v-prediction models say `parameterization: "v"`."""
    yaml_path = path.with_suffix(".yaml")
    if not yaml_path.is_file():
        return None
    try:
        config = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))
        params = config["model"]["params"]
    except (OSError, UnicodeDecodeError, yaml.YAMLError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"cannot read {yaml_path.name} (the config beside {path.name}): {exc}") from None
    return "v_prediction" if isinstance(params, dict) and params.get("parameterization") == "v" else "epsilon"


def _kind(family: str, hidden_act: Any) -> str:
    if family == "sdxl":
        return "sdxl"
    return "sd2" if hidden_act == "gelu" else "sd1"  # OpenCLIP (2.x) uses gelu, OpenAI CLIP (1.x) quick_gelu


def _memory_bytes(pipe: Any, checker: SafetyChecker | None) -> int:
    modules = [module for module in pipe.components.values() if isinstance(module, torch.nn.Module)]
    if checker is not None:
        modules.append(checker.model)
    tensors = {id(t): t for module in modules for t in [*module.parameters(), *module.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


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
