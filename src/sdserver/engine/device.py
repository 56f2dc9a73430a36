"""Choosing the torch device and dtype."""

from __future__ import annotations

import ctypes

import torch

from sdserver.core.errors import ConfigError

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def pick_device(requested: str = "auto") -> torch.device:
    """`auto` prefers CUDA, then Apple MPS, then the CPU."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as exc:
        raise ConfigError(f"device {requested!r} is not a torch device ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {requested!r} requested but CUDA is not available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {requested!r} requested but MPS is not available")
    return device


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    """`auto` is fp16 on CUDA (half the memory, tensor cores) and fp32 elsewhere."""
    if requested == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return _DTYPES[requested]


def device_memory(device: torch.device) -> dict[str, float]:
    """Bytes held by torch on the accelerator (empty on the CPU: see process RSS instead)."""
    if device.type == "cuda":
        return {"allocated": torch.cuda.memory_allocated(device), "reserved": torch.cuda.memory_reserved(device)}
    if device.type == "mps":
        return {"allocated": torch.mps.current_allocated_memory(), "reserved": torch.mps.driver_allocated_memory()}
    return {}


def describe_device(device: torch.device) -> str:
    """The device as an operator reads it: "cuda:0 (NVIDIA H100 80GB HBM3)", "mps", "cpu"."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return str(device)


def free_device_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


def release_host_memory() -> None:
    """Hand freed heap pages back to the OS. glibc keeps them otherwise: an unloaded .ckpt model
    (read into the heap, not mapped from its file) stayed resident at its full size."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc (macOS, musl): their allocators return memory on their own terms
    libc.malloc_trim(0)


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
