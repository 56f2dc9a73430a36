"""ControlNet models from `controlnet_dir`, and the pieces a family's denoiser forward needs to use one.

The library lists ControlNets by name without loading weights: a diffusers folder (`config.json` and
weights, by the folder's name) or a single file (`.safetensors`, `.pth`, `.ckpt`, `.pt`, by its stem).
Clients see them as the sd-webui-controlnet extension shows them, "name [hash]", where the hash is
AUTOMATIC1111's short model hash (sha256 of 64 KiB at 1 MiB into the weights file: cheap, and the same
number A1111 shows for the same file); a request may name a ControlNet with or without it.

Single files in the original (lllyasviel) layout are converted by diffusers with a config written from
their tensor shapes over the shipped architecture configs, so they load offline. Each ControlNet's base
(sd1, sd2, sdxl) comes from its config: the cross-attention width (768, 1024, 2048), else (small test
models) SDXL's added text-time embedding or SD 2.x's linear attention projections.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from sdserver.core.control import ResizeMode, model_name, resize_mode
from sdserver.core.errors import InvalidRequest, ModelLoadError, UnsupportedModel
from sdserver.core.images import RESAMPLING
from sdserver.engine.architectures import architectures_root
from sdserver.engine.checkpoint import read_shapes, read_state_dict

ControlNet = Any  # diffusers.ControlNetModel (imported where it is built: the API never loads torch models)
log = logging.getLogger(__name__)

SUFFIXES = (".safetensors", ".pth", ".ckpt", ".pt")
MAX_LOADED = 2  # ControlNets kept loaded (least recently used dropped first)
_ORIGINAL_PREFIX = "control_model."
_KIND_BY_CONTEXT = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


@dataclass(frozen=True)
class Entry:
    name: str
    path: Path  # the folder, or the single file

    @property
    def is_folder(self) -> bool:
        return self.path.is_dir()

    def weights_file(self) -> Path | None:
        if not self.is_folder:
            return self.path
        found = sorted(self.path.glob("diffusion_pytorch_model*.safetensors")) or sorted(self.path.glob("*.bin"))
        return found[0] if found else None


class ControlNetLibrary:
    """The ControlNets of `folder` by name (rescanned when a name is missing); `get` loads and caches."""

    def __init__(self, folder: str | Path | None) -> None:
        self.folder = Path(folder).expanduser() if folder is not None else None
        self._entries: dict[str, Entry] = {}  # replaced whole by refresh(): reads need no lock
        self._hashes: dict[tuple[Path, int, float], str] = {}
        self._kinds: dict[Path, str] = {}
        self._loaded: OrderedDict[tuple[str, str, torch.dtype], ControlNet] = OrderedDict()
        self._lock = threading.Lock()
        self.refresh()

    def refresh(self) -> list[str]:
        entries: dict[str, Entry] = {}
        if self.folder is not None and self.folder.is_dir():
            for path in sorted(self.folder.iterdir()):
                if path.is_dir() and (path / "config.json").is_file():
                    entries.setdefault(path.name, Entry(path.name, path))
                elif path.is_file() and path.suffix.lower() in SUFFIXES:
                    entries.setdefault(path.stem, Entry(path.stem, path))
        self._entries = entries
        return list(entries)

    def names(self) -> list[str]:
        return list(self._entries)

    def entry(self, name: str, *, field: str = "controlnet") -> Entry:
        """The ControlNet called `name` ("name" or the extension's "name [hash]"); InvalidRequest naming
        `field` when there is none."""
        wanted = model_name(name)
        found = self._find(wanted)
        if found is None:  # perhaps added since the last scan
            self.refresh()
            found = self._find(wanted)
        if found is not None:
            return found
        if self.folder is None:
            raise InvalidRequest(
                f"{field}: no controlnet_dir is configured, so ControlNet {name!r} is unknown", field=field
            )
        known = ", ".join(self.names()) or "none"
        raise InvalidRequest(
            f"{field}: no ControlNet named {name!r} in controlnet_dir; available: {known}", field=field
        )

    def _find(self, name: str) -> Entry | None:
        entries = self._entries
        if name in entries:
            return entries[name]
        return next((entry for key, entry in entries.items() if key.lower() == name.lower()), None)

    def short_hash(self, name: str) -> str:
        """A1111's short model hash of the ControlNet's weights file (cached by size and time)."""
        weights = self.entry(name).weights_file()
        if weights is None:
            return "00000000"
        stat = weights.stat()
        key = (weights, stat.st_size, stat.st_mtime)
        if key not in self._hashes:
            with weights.open("rb") as handle:
                handle.seek(0x100000)
                self._hashes[key] = hashlib.sha256(handle.read(0x10000)).hexdigest()[:8]
        return self._hashes[key]

    def title(self, name: str) -> str:
        return f"{name} [{self.short_hash(name)}]"

    def model_list(self) -> dict[str, list[str]]:
        """The extension's `/controlnet/model_list`: every ControlNet as "name [hash]" (rescanned)."""
        return {"model_list": [self.title(name) for name in self.refresh()]}

    def kind(self, name: str, *, field: str = "controlnet") -> str:
        """sd1, sd2 or sdxl: the base model family this ControlNet is for (a folder's config, a
        .safetensors header; a pickled file is read whole, once)."""
        entry = self.entry(name, field=field)
        if entry.path not in self._kinds:
            if entry.is_folder:
                kind = kind_of_config(_read_json(entry.path / "config.json"))
            else:
                kind = kind_of_shapes(_strip(read_shapes(entry.path)), entry.path.name)
            self._kinds[entry.path] = kind
        return self._kinds[entry.path]

    def check_fits(self, name: str, model: str, model_kind: str, *, field: str = "controlnet") -> None:
        """Refuse a ControlNet made for another base model than `model`'s (`model_kind`: sd1, sd2, sdxl)."""
        kind = self.kind(name, field=field)
        if kind != model_kind:
            raise InvalidRequest(
                f"{field}: controlnet {name!r} is for {kind}; model {model!r} is {model_kind}", field=field
            )

    def get(self, name: str, device: torch.device, dtype: torch.dtype, *, field: str = "controlnet") -> ControlNet:
        """The ControlNet loaded on `device` in `dtype`, kept for the next request (MAX_LOADED at most)."""
        entry = self.entry(name, field=field)
        key = (entry.name, str(device), dtype)
        with self._lock:
            if key in self._loaded:
                self._loaded.move_to_end(key)
                return self._loaded[key]
            controlnet = load(entry, dtype).to(device)
            self._loaded[key] = controlnet
            while len(self._loaded) > MAX_LOADED:
                self._loaded.popitem(last=False)
            return controlnet


def load(entry: Entry, dtype: torch.dtype) -> ControlNet:
    """A ControlNet from its folder or single file, on the CPU."""
    import diffusers

    if entry.is_folder:
        class_name = _read_json(entry.path / "config.json").get("_class_name")
        model_class = getattr(diffusers, class_name if class_name in _KIND_BY_CLASS else "ControlNetModel")
        try:
            model = model_class.from_pretrained(entry.path, torch_dtype=dtype)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"cannot load ControlNet {entry.name!r}: {exc}".splitlines()[0]) from exc
    else:
        model = _load_file(entry.path, dtype)
    log.info("loaded ControlNet %r (%s)", entry.name, entry.path.name)
    return model.eval()


def _load_file(path: Path, dtype: torch.dtype) -> ControlNet:
    from diffusers import ControlNetModel

    state = to_diffusers_layout(read_state_dict(path), path.name)
    config = config_from_shapes({key: tuple(value.shape) for key, value in state.items()}, path.name)
    with tempfile.TemporaryDirectory(prefix="sdserver-controlnet-") as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(config), encoding="utf-8")
        try:
            model = ControlNetModel.from_single_file(state, config=tmp, local_files_only=True, torch_dtype=dtype)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise ModelLoadError(f"cannot load ControlNet {path.name}: {exc}".splitlines()[0]) from exc
    return model


def _strip(state: Mapping[str, Any]) -> dict[str, Any]:
    """Drop the `control_model.` prefix that some original-layout files carry."""
    return {key.removeprefix(_ORIGINAL_PREFIX): value for key, value in state.items()}


def to_diffusers_layout(state: Mapping[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """A ControlNet state dict in diffusers' names (original-layout files converted by diffusers)."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    state = _strip(state)
    if "controlnet_cond_embedding.conv_in.weight" in state:
        return state
    _check_is_controlnet(state.keys(), name)
    if any(key.startswith("label_emb.") for key in state):
        raise UnsupportedModel(
            f"{name} is an SDXL ControlNet in the original layout, which diffusers cannot convert; "
            "use its diffusers version (a folder, or a .safetensors in diffusers' layout)"
        )
    downsamplers = [i for i in range(1, 64) if f"input_blocks.{i}.0.op.weight" in state]
    if not downsamplers:
        raise UnsupportedModel(f"{name}: a ControlNet without down-sampling blocks, which sdserver cannot read")
    converted: dict[str, torch.Tensor] = convert_controlnet_checkpoint(state, {"layers_per_block": downsamplers[0] - 1})
    return converted


def _check_is_controlnet(keys: Any, name: str) -> None:
    keys = list(keys)
    if any("input_hint_block.0." in key for key in keys):
        return
    if any(key.startswith("lora_controlnet") for key in keys):
        raise UnsupportedModel(f"{name} looks like a Control-LoRA, which sdserver cannot load")
    if any(key.startswith(("adapter.", "body.")) for key in keys):
        raise UnsupportedModel(f"{name} looks like a T2I-Adapter, not a ControlNet; sdserver loads ControlNets only")
    raise UnsupportedModel(f"{name} is not a ControlNet (it has no input_hint_block or controlnet_cond_embedding)")


# Transformer ControlNets (diffusers folders), by the class their config names.
_KIND_BY_CLASS = {"SD3ControlNetModel": "sd3", "FluxControlNetModel": "flux"}


def kind_of_config(config: Mapping[str, Any]) -> str:
    if config.get("_class_name") in _KIND_BY_CLASS:
        return _KIND_BY_CLASS[str(config["_class_name"])]
    context = config.get("cross_attention_dim")
    if isinstance(context, int) and context in _KIND_BY_CONTEXT:
        return _KIND_BY_CONTEXT[context]
    if config.get("addition_embed_type") == "text_time":
        return "sdxl"
    return "sd2" if config.get("use_linear_projection") else "sd1"


def kind_of_shapes(shapes: Mapping[str, tuple[int, ...]], name: str) -> str:
    """The base of a single file from its tensor names and shapes (either layout)."""
    to_k = next((shape for key, shape in shapes.items() if key.endswith("attn2.to_k.weight")), None)
    proj_in = next((shape for key, shape in shapes.items() if key.endswith(".proj_in.weight")), None)
    if to_k is None:
        _check_is_controlnet(shapes.keys(), name)
        raise UnsupportedModel(f"{name}: a ControlNet without cross-attention, which sdserver cannot use")
    added = any(key.startswith(("label_emb.", "add_embedding.")) for key in shapes)
    linear = proj_in is not None and len(proj_in) == 2
    return kind_of_config(
        {
            "cross_attention_dim": to_k[1],
            "addition_embed_type": "text_time" if added else None,
            "use_linear_projection": linear,
        }
    )


def config_from_shapes(shapes: Mapping[str, tuple[int, ...]], name: str) -> dict[str, Any]:
    """A diffusers ControlNetModel config for a state dict in diffusers' names: the sizes from the
    shapes, the rest from the shipped UNet config of its base (heads: SD 1.x 8, others 64 channels each)."""
    from diffusers import ControlNetModel

    kind = kind_of_shapes(shapes, name)
    levels = _count(shapes, "down_blocks.")
    channels = [_shape(shapes, f"down_blocks.{i}.resnets.0.conv1.weight", name)[0] for i in range(levels)]
    attention = [_has(shapes, f"down_blocks.{i}.attentions.") for i in range(levels)]
    depth = [max(1, _count(shapes, f"down_blocks.{i}.attentions.0.transformer_blocks.")) for i in range(levels)]
    embedding = _count(shapes, "controlnet_cond_embedding.blocks.") // 2
    hint = [_shape(shapes, "controlnet_cond_embedding.conv_in.weight", name)[0]]
    hint += [_shape(shapes, f"controlnet_cond_embedding.blocks.{2 * i + 1}.weight", name)[0] for i in range(embedding)]
    to_k = next(shape for key, shape in shapes.items() if key.endswith("attn2.to_k.weight"))
    proj_in = next(shape for key, shape in shapes.items() if key.endswith(".proj_in.weight"))
    shipped = _read_json(architectures_root() / kind / "unet" / "config.json")
    accepted = set(ControlNetModel.__init__.__code__.co_varnames)
    config: dict[str, Any] = {key: value for key, value in shipped.items() if key in accepted}
    config |= {
        "_class_name": "ControlNetModel",
        "in_channels": _shape(shapes, "conv_in.weight", name)[1],
        "conditioning_channels": _shape(shapes, "controlnet_cond_embedding.conv_in.weight", name)[1],
        "block_out_channels": channels,
        "layers_per_block": _count(shapes, "down_blocks.0.resnets."),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "cross_attention_dim": to_k[1],
        "use_linear_projection": len(proj_in) == 2,
        "transformer_layers_per_block": depth,
        "conditioning_embedding_out_channels": hint,
        "global_pool_conditions": "shuffle" in name.lower(),  # v1.1 shuffle: a config flag, not in the weights
    }
    if kind != "sd1":
        config["attention_head_dim"] = [max(1, c // 64) for c in channels]
    if _has(shapes, "add_embedding."):
        config["projection_class_embeddings_input_dim"] = _shape(shapes, "add_embedding.linear_1.weight", name)[1]
    return config


def _shape(shapes: Mapping[str, tuple[int, ...]], key: str, name: str) -> tuple[int, ...]:
    try:
        return tuple(shapes[key])
    except KeyError:
        raise UnsupportedModel(f"{name} has no {key}: not a ControlNet sdserver can read") from None


def _has(shapes: Mapping[str, Any], prefix: str) -> bool:
    return any(key.startswith(prefix) for key in shapes)


def _count(shapes: Mapping[str, Any], prefix: str) -> int:
    """How many numbered children `prefix<N>.` exist."""
    found = {
        int(rest.split(".", 1)[0])
        for key in shapes
        if key.startswith(prefix) and (rest := key[len(prefix) :])[:1].isdigit()
    }
    return max(found) + 1 if found else 0


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from None
    return data if isinstance(data, dict) else {}


# -- running one -----------------------------------------------------------------------------------


def residuals(
    controlnet: ControlNet,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    cond_image: torch.Tensor,
    scale: float,
    added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    guess_mode: bool = False,
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """One ControlNet step for a batch of rows: the residuals to add to the UNet's down blocks and mid
    block (`down_block_additional_residuals`, `mid_block_additional_residual`), already times `scale`.
    `cond_image` has a row per latent row (or one row, broadcast), in 0..1, at the latents' size x 8."""
    if cond_image.shape[0] == 1 and latents.shape[0] > 1:
        cond_image = cond_image.expand(latents.shape[0], -1, -1, -1)
    down, mid = controlnet(
        latents,
        timesteps,
        encoder_hidden_states=encoder_hidden_states,
        controlnet_cond=cond_image.to(device=latents.device, dtype=latents.dtype),
        conditioning_scale=scale,
        added_cond_kwargs=added_cond_kwargs,
        guess_mode=guess_mode,
        return_dict=False,
    )
    return tuple(down), mid


def active(guidance_start: float, guidance_end: float, step: int, total: int) -> bool:
    """Whether a unit applies at step `step` of `total` (diffusers' and the extension's rule)."""
    return not (step / total < guidance_start or (step + 1) / total > guidance_end)


def prepare_image(
    image: Image.Image, width: int, height: int, mode: ResizeMode | int | str = "Crop and Resize"
) -> torch.Tensor:
    """The control image as the ControlNet takes it: (1, 3, height, width), RGB in 0..1, fitted by the
    extension's resize modes: "Just Resize" (stretched), "Crop and Resize" (covers, centre cropped),
    "Resize and Fill" (fits, the rest filled with the median colour of its border); 0/1/2 too."""
    fitted = fit_control_image(image.convert("RGB"), width, height, resize_mode(mode))
    pixels = torch.from_numpy(np.asarray(fitted, dtype=np.float32) / 255.0)
    return pixels.permute(2, 0, 1).unsqueeze(0).contiguous()


def fit_control_image(image: Image.Image, width: int, height: int, mode: ResizeMode) -> Image.Image:
    if mode == "Just Resize":
        return image.resize((width, height), RESAMPLING)
    cover = mode == "Crop and Resize"
    scale = (max if cover else min)(width / image.width, height / image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    resized = image.resize(size, RESAMPLING)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    if cover:
        return resized.crop((left, top, left + width, top + height))
    pixels = np.asarray(resized)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    fill = tuple(int(v) for v in np.median(border, axis=0))
    canvas = Image.new("RGB", (width, height), fill)
    canvas.paste(resized, (-left, -top))
    return canvas


def stack_images(images: Sequence[torch.Tensor], rows: Sequence[int]) -> torch.Tensor:
    """One batch of control images: image i (one row: pixels, latents or packed latents) repeated for its
    `rows[i]` denoiser rows (states stacked)."""
    return torch.cat([image.expand(count, *image.shape[1:]) for image, count in zip(images, rows, strict=True)])
