"""Read single-file checkpoints: `.safetensors` as they are, `.ckpt` only through a weights-only unpickler.

A `.ckpt` is a Python pickle, and unpickling runs whatever the file asks for. torch's weights-only
unpickler builds tensors and plain containers and refuses every other global; on top of it we allow
the few harmless objects that real Stable Diffusion checkpoints carry (numpy scalars in
`global_step`, and the Lightning callback state saved beside the weights, read into an inert stub).
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from sdserver.core.errors import ModelLoadError, UnsafeCheckpoint

Shapes = Mapping[str, tuple[int, ...]]


class _InertObject:
    """Stands in for training-time objects (Lightning callbacks) pickled beside the weights: keeps
    their plain state, runs nothing."""

    def __setstate__(self, state: Any) -> None:
        self.state = state


_LIGHTNING = "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"
# numpy 2 moved `numpy.core` (the name old pickles use) to `numpy._core`.
_NUMPY_SCALAR = (getattr(np, "_core", None) or np.core).multiarray.scalar
_ALLOWED_GLOBALS: list[Any] = [
    (_InertObject, _LIGHTNING),
    np.dtype,
    type(np.dtype(np.float64)),
    type(np.dtype(np.int64)),
    (_NUMPY_SCALAR, "numpy.core.multiarray.scalar"),  # the name numpy 1 wrote into older checkpoints
    _NUMPY_SCALAR,
]


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, on the CPU, keyed as in the file (nested `state_dict` unwrapped)."""
    if path.suffix.lower() == ".safetensors":
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(f"cannot read {path.name}: not a valid .safetensors file ({exc})") from None
    data = _unpickle_weights(path)
    while isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise ModelLoadError(f"cannot read {path.name}: it holds a {type(data).__name__}, not a dict of weights")
    return {key: value for key, value in data.items() if isinstance(value, torch.Tensor)}


def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape; for .safetensors from the header alone (no weights read)."""
    if path.suffix.lower() == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as handle:
                return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(f"cannot read {path.name}: not a valid .safetensors file ({exc})") from None
    return {key: tuple(tensor.shape) for key, tensor in read_state_dict(path).items()}


def _unpickle_weights(path: Path, inert: Sequence[str] = ()) -> Any:
    """`inert`: further class names (module.Class) read into inert stubs that keep their plain state."""
    try:
        with torch.serialization.safe_globals([*_ALLOWED_GLOBALS, *((_InertObject, name) for name in inert)]):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpoint(
            f"refused to load {path.name}: its pickle asks for more than plain weights ({_reason(exc)}). "
            "A .ckpt can run code when loaded; get a .safetensors copy of the model instead"
        ) from None
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path.name}: not a readable .ckpt file ({exc})") from None


def _reason(exc: pickle.UnpicklingError) -> str:
    """torch's own reason (e.g. "unsupported GLOBAL posix.system"), without its advice to retry with
    weights_only=False."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    found = next((line for line in lines if "nsupported" in line), None)
    return (found or type(exc).__name__).removesuffix(".")
