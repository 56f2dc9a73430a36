"""The SD3 / FLUX writers are exactly what diffusers' own converters read back.

Every parameter is randomised first (RMS norms start as ones, so a swapped `query_norm`/`key_norm` would
otherwise round-trip unnoticed); the original layout then goes through diffusers' converter (for FLUX,
through `flowfiles._flux_to_diffusers`, which hands diffusers' converter everything but the fused
`linear1` split it hard-codes for FLUX.1's width) and every tensor must come back bit-identical.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
from diffusers.models.model_loading_utils import load_gguf_checkpoint
from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

from sdserver.engine.flowfiles import _flux_to_diffusers, detect_shapes
from sdserver.engine.tiny_flow import build_tiny_flow_pipeline
from tests.support.flow_layout import flux_transformer_to_original, save_gguf, sd3_transformer_to_original


def _randomised(arch: Any) -> Any:
    transformer = build_tiny_flow_pipeline(arch).transformer
    with torch.no_grad():
        for param in transformer.parameters():
            param.copy_(torch.randn_like(param))
    return transformer


def _assert_same(back: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    assert set(back) == set(state)
    assert [key for key in state if not torch.equal(back[key], state[key])] == []


@pytest.mark.parametrize("arch", ["sd3-medium", "sd3.5-medium", "sd3.5-large"])
def test_sd3_transformers_round_trip_through_diffusers_converter(arch: Any) -> None:
    transformer = _randomised(arch)
    original = sd3_transformer_to_original(transformer)
    _assert_same(convert_sd3_transformer_checkpoint_to_diffusers(dict(original)), transformer.state_dict())


@pytest.mark.parametrize("arch", ["flux-dev", "flux-schnell", "flux-fill"])
def test_flux_transformers_round_trip_through_diffusers_converter(arch: Any) -> None:
    transformer = _randomised(arch)
    original = flux_transformer_to_original(transformer)
    config = detect_shapes({k: tuple(t.shape) for k, t in original.items()}, Path("f.safetensors"))
    assert config is not None
    _assert_same(_flux_to_diffusers(dict(original), config.transformer), transformer.state_dict())


def test_gguf_files_dequantise_to_the_weights_they_were_written_from(tmp_path: Path) -> None:
    original = flux_transformer_to_original(_randomised("flux-dev"))
    path = save_gguf(original, tmp_path / "flux.gguf", arch="flux")
    read = load_gguf_checkpoint(str(path))
    assert set(read) == set(original)
    for key, tensor in read.items():
        values = dequantize_gguf_tensor(tensor).float()
        assert values.shape == original[key].shape
        # Q8_0: 32 values share one fp16 scale (max |x| / 127), each rounded to it.
        tolerance = float(original[key].abs().max()) / 127 if tensor.dtype == torch.uint8 else 0.0
        assert float((values - original[key]).abs().max()) <= tolerance + 1e-6, key
    kinds = {t.name: t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}
    assert np.mean([kind == gguf.GGMLQuantizationType.Q8_0 for kind in kinds.values()]) > 0.3
