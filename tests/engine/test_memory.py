"""Memory: the estimator calibrated at load, batches split to fit a budget, and the VAE tiled when short."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdserver.engine.loaders import LoadedPipelines, load_pipelines
from sdserver.engine.memory import SAFETY, Fit, LiveTensors, margin
from sdserver.engine.session import Session
from sdserver.engine.speed import Tuning, probe

CPU = torch.device("cpu")
GB = 10**9


@pytest.fixture(scope="module")
def measured(tiny_model: Path) -> LoadedPipelines:
    """The tiny model loaded with a (simulated) 2 GB budget: its memory is measured at load."""
    return load_pipelines(str(tiny_model), device=CPU, dtype=torch.float32, tuning=Tuning(memory_limit=2 * GB))


@pytest.fixture
def limit(measured: LoadedPipelines) -> Iterator[None]:
    """Restore the budget after a test that shrinks it."""
    assert measured.memory is not None
    before = measured.memory.limit
    yield
    measured.memory.limit = before


def draw(model: LoadedPipelines, images: int, side: int = 64) -> list[Image.Image]:
    session = Session(model, "tiny", lambda name: None)
    state = session.admit(probe(model, side, images).model_copy(update={"steps": 3, "seed": 7}))
    while not state.done:
        session.step([state])
    return [out.image for out in session.finish([state])[0]]


def max_diff(a: list[Image.Image], b: list[Image.Image]) -> int:
    assert len(a) == len(b)
    return max(int(np.abs(np.asarray(x, np.int16) - np.asarray(y, np.int16)).max()) for x, y in zip(a, b, strict=True))


def budget_for(model: LoadedPipelines, rows: int, side: int) -> int:
    """A memory limit under which exactly `rows` denoiser rows at side x side fit in one step."""
    assert model.memory is not None
    fit = model.memory.denoiser
    need = SAFETY * (fit.fixed + (rows + 0.5) * fit.per_row(side * side))
    return int(model.memory.weights_bytes + margin(GB) + need)


def test_the_estimate_is_measured_at_load_and_grows_with_rows_and_size(measured: LoadedPipelines) -> None:
    memory = measured.memory
    assert memory is not None
    assert memory.denoiser.per_row(64 * 64) > 0 and memory.decoder.per_row(64 * 64) > 0
    sides = (64, 128, 256, 512, 1024)
    for side in sides:
        by_rows = [memory.estimate(rows, side, side) for rows in range(1, 17)]
        assert by_rows == sorted(by_rows) and len(set(by_rows)) == len(by_rows)
    for rows in (1, 2, 8):
        by_side = [memory.estimate(rows, side, side) for side in sides]
        assert by_side == sorted(by_side) and len(set(by_side)) == len(by_side)
    assert [memory.denoiser_rows(side * side) for side in sides] == sorted(
        (memory.denoiser_rows(side * side) for side in sides), reverse=True
    )


def test_a_fit_stays_monotonic_whatever_the_probes_say() -> None:
    """Noisy probes (a second row that measured less than the first, a big size that measured less per
    pixel) still give an estimate that never shrinks as rows or pixels grow."""
    for probes in ((100.0, 90.0, 400.0), (100.0, 150.0, 120.0), (0.0, 0.0, 0.0), (100.0, 300.0, 5000.0)):
        fit = Fit.from_probes(probes[0], probes[1], (2, 4), probes[2], (4096, 16384))
        assert min(fit.fixed, fit.linear, fit.quadratic) >= 0
        grid = [[fit.bytes(rows, pixels) for pixels in (1024, 4096, 16384, 65536)] for rows in (1, 2, 4)]
        assert all(row == sorted(row) for row in grid)
        assert all(list(column) == sorted(column) for column in zip(*grid, strict=True))


def test_live_tensor_tracking_counts_what_is_alive_at_the_peak() -> None:
    with LiveTensors() as tracker:
        a = torch.ones(1000)  # 4000 bytes
        b = a * 2  # 8000 alive
        del a
        c = b + 1  # a was freed: 8000 alive again
    assert tracker.peak == 8000 and tracker.current == 8000
    del b, c


def test_a_batch_split_to_fit_a_budget_draws_the_same_images(measured: LoadedPipelines, limit: None) -> None:
    assert measured.memory is not None and measured.splitter is not None
    calls = measured.splitter.calls
    whole = draw(measured, 3)  # 6 denoiser rows (guidance): one forward per step
    steps = measured.splitter.calls - calls
    measured.memory.limit = budget_for(measured, 2, 64)
    assert measured.memory.denoiser_rows(64 * 64) == 2
    calls = measured.splitter.calls
    split = draw(measured, 3)
    assert measured.splitter.calls - calls == 3 * steps  # each step in 3 forwards of 2 rows
    assert max_diff(whole, split) <= 1


def test_the_running_batch_admits_only_what_fits(measured: LoadedPipelines, limit: None) -> None:
    assert measured.memory is not None
    session = Session(measured, "tiny", lambda name: None)
    one = probe(measured, 64, 1)  # 2 rows each
    running = [session.admit(one)]
    assert session.fits(running, [one, one])
    measured.memory.limit = budget_for(measured, 4, 64)
    assert session.fits(running, [one])  # 4 rows
    assert not session.fits(running, [one, one])  # 6 rows
    assert not session.fits(running, [probe(measured, 64, 2)])


def test_tiled_and_untiled_decodes_agree_closely(measured: LoadedPipelines) -> None:
    """Tiles see only part of the picture (the VAE's attention and group norms are global), so a tiled decode
    is not bit-exact; it must still be the same picture: far closer to the untiled decode than a decode of
    other latents is, and strongly correlated with it. (A random-weight VAE is the worst case for this.)"""
    vae, decoder = measured.txt2img.vae, measured.decoder
    assert decoder is not None
    generator = torch.Generator().manual_seed(0)
    latents, other = torch.randn(2, 1, 4, 48, 48, generator=generator)  # 384 px
    tile_sample, tile_latent = vae.tile_sample_min_size, vae.tile_latent_min_size
    vae.tile_sample_min_size, vae.tile_latent_min_size = 256, 32  # 4 tiles of 256 px, blended over 64 px
    try:
        with torch.no_grad():
            decoder.tiling = "off"
            plain, different = vae.decode(torch.cat([latents, other]), return_dict=False)[0]
            decoder.tiling, tiled_calls = "on", decoder.tiled_calls
            tiled = vae.decode(latents, return_dict=False)[0][0]
    finally:
        decoder.tiling = "auto"
        vae.tile_sample_min_size, vae.tile_latent_min_size = tile_sample, tile_latent
    assert decoder.tiled_calls == tiled_calls + 1
    gap = float((plain - tiled).abs().mean())
    assert gap < 0.2 * float((plain - different).abs().mean())
    assert float(torch.corrcoef(torch.stack([plain.flatten(), tiled.flatten()]))[0, 1]) > 0.95


def test_the_vae_tiles_when_memory_is_short_or_the_image_is_large(measured: LoadedPipelines, limit: None) -> None:
    decoder, memory = measured.decoder, measured.memory
    assert decoder is not None and memory is not None
    latents = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        before = decoder.tiled_calls
        measured.txt2img.vae.decode(latents, return_dict=False)
        assert decoder.tiled_calls == before  # fits, and small
        memory.limit = int(memory.weights_bytes + margin(GB))  # nothing left for a decode
        assert memory.decode_rows(64 * 64) == 0
        measured.txt2img.vae.decode(latents, return_dict=False)
        assert decoder.tiled_calls == before + 1
        memory.limit = 2 * GB
        decoder.tile_above, tile_above = 32 * 32, decoder.tile_above
        try:
            measured.txt2img.vae.decode(latents, return_dict=False)
        finally:
            decoder.tile_above = tile_above
        assert decoder.tiled_calls == before + 2


def test_a_decode_that_runs_out_of_memory_is_retried_tiled(measured: LoadedPipelines) -> None:
    decoder = measured.decoder
    assert decoder is not None
    vae, real = measured.txt2img.vae, decoder.original

    def short_of_memory(z: torch.Tensor, *args: object, **kwargs: object) -> object:
        if not vae.use_tiling:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return real(z, *args, **kwargs)

    decoder.original = short_of_memory
    try:
        with torch.no_grad():
            pixels = vae.decode(torch.randn(2, 4, 8, 8), return_dict=False)[0]
    finally:
        decoder.original = real
    assert pixels.shape == (2, 3, 64, 64)


@pytest.mark.parametrize("arch", ["sdxl", "sd3", "flux"])
def test_every_family_splits_a_batch_into_the_same_images(arch: str, family_model: Callable[[str], Path]) -> None:
    """SDXL's added conditions, SD3's pooled projections, FLUX's packed latents and shared position ids:
    each row of a split forward gets exactly its own inputs."""
    model = load_pipelines(str(family_model(arch)), device=CPU, dtype=torch.float32, tuning=Tuning(memory_limit=2 * GB))
    assert model.memory is not None and model.splitter is not None
    calls = model.splitter.calls
    whole = draw(model, 3)
    steps = model.splitter.calls - calls
    rows = 6 if model.family.options.guidance == "cfg" else 3
    model.memory.limit = budget_for(model, 2, 64)
    calls = model.splitter.calls
    split = draw(model, 3)
    assert model.splitter.calls - calls == steps * -(-rows // 2)
    assert max_diff(whole, split) <= 1
