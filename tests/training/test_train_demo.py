"""training/train_demo.py end to end, with tiny step counts (seconds)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "training" / "train_demo.py"


def _load_module():
    spec = importlib.util.spec_from_file_location("train_demo", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("train_demo", mod)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def td():
    return _load_module()


TINY = [
    "--vae-steps",
    "100",
    "--vae-batch",
    "8",
    "--vae-lr",
    "1e-2",
    "--vae-channels",
    "16,16,32,32",
    "--measure-scenes",
    "128",
    "--cache-size",
    "256",
    "--hi-cache-size",
    "32",
    "--unet-steps",
    "40",
    "--unet-batch",
    "16",
    "--unet-lr",
    "2e-3",
    "--unet-channels",
    "32,64",
    "--text-hidden",
    "32",
    "--text-layers",
    "1",
    "--threads",
    "1",
    "--quiet",
]


@pytest.fixture(scope="module")
def tiny_run(td, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "model"
    summary = td.run(td.parse_args(["--out", str(out), "--seed", "3", *TINY]))
    return out, summary


def test_dataset_and_tokenizer(td, tmp_path):
    b = td.make_batch(64, torch.Generator().manual_seed(0))
    assert b.images.shape == (64, 3, 64, 64)
    assert float(b.images.min()) >= -1 and float(b.images.max()) <= 1
    assert bool((b.fg != b.bg).all())
    assert b.captions[0] == td.caption(int(b.fg[0]), int(b.shape[0]), int(b.bg[0]))
    # same seed, same data
    b2 = td.make_batch(64, torch.Generator().manual_seed(0))
    assert torch.equal(b.images, b2.images) and b.captions == b2.captions
    td.write_tokenizer_files(tmp_path)
    tok = td.load_tokenizer(tmp_path)
    td.check_tokenizer(tok)  # every word is one token
    ids = tok("a green triangle on a yellow background").input_ids
    assert tok.convert_ids_to_tokens(ids)[1:-1] == [
        "a</w>",
        "green</w>",
        "triangle</w>",
        "on</w>",
        "a</w>",
        "yellow</w>",
        "background</w>",
    ]


def test_captions_come_in_the_full_and_the_short_forms(td):
    red, circle, blue = td.COLOURS.index("red"), td.SHAPES.index("circle"), td.COLOURS.index("blue")
    captions = {td.varied_caption(red, circle, blue, u / 1000) for u in range(1000)}
    assert captions == {
        "a red circle on a blue background",
        "a red circle",
        "red circle",
        "a circle on a blue background",
        "red circle on a blue background",
        "circle on a blue background",
        "a circle",
    }
    forms = [td.varied_caption(red, circle, blue, u / 1000) for u in range(1000)]
    assert forms.count("a red circle on a blue background") == 450  # the full form stays the most common
    # the fine-tuning stage gives the full form less weight, so the short forms get more of the batch
    cdf = td.form_cdf(full_weight=0.2)
    forms = [td.varied_caption(red, circle, blue, u / 1000, cdf) for u in range(1000)]
    assert forms.count("a red circle on a blue background") == round(1000 * 0.2 / cdf[-1])


def test_losses_go_down(tiny_run):
    _, s = tiny_run
    vae, unet = s["vae_losses"], s["unet_losses"]
    assert len(vae) == 100 and len(unet) == 40
    assert np.mean(vae[-10:]) < 0.7 * np.mean(vae[:10]), (vae[:10], vae[-10:])
    assert np.mean(unet[-10:]) < 0.8 * np.mean(unet[:10]), (unet[:10], unet[-10:])
    assert 0.05 < s["scaling_factor"] < 50


def test_output_folder_loads_and_generates(tiny_run):
    from diffusers import StableDiffusionPipeline

    out, s = tiny_run
    index = json.loads((out / "model_index.json").read_text())
    assert index["requires_safety_checker"] is True
    assert (out / "tokenizer" / "merges.txt").is_file()
    assert json.loads((out / "sdserver.json").read_text()) == {"default_steps": 20}  # sdserver's defaults for it
    vae_cfg = json.loads((out / "vae" / "config.json").read_text())
    assert vae_cfg["scaling_factor"] == pytest.approx(s["scaling_factor"])
    pipe = StableDiffusionPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.dtype == torch.float32
    res = pipe(
        "a red circle on a blue background",
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    assert res.images.shape == (1, 64, 64, 3)
    assert np.isfinite(res.images).all()
    assert res.nsfw_content_detected == [False]


def test_fine_tuning_starts_from_the_given_model(td, tiny_run, tmp_path):
    """--init-from takes the UNet and text encoder of a trained folder: its first losses are the trained
    model's, far below a new UNet's."""
    out, s = tiny_run
    short = {"--unet-steps": "3", "--cache-size": "64", "--hi-cache-size": "0"}
    args = [short.get(previous, arg) for previous, arg in zip(["", *TINY[:-1]], TINY, strict=True)]
    args += ["--vae-from", str(out), "--init-from", str(out), "--full-form-weight", "0.2", "--unet-lr", "1e-5"]
    tuned = td.run(td.parse_args(["--out", str(tmp_path / "tuned"), "--seed", "4", *args]))
    assert np.mean(tuned["unet_losses"]) < 0.8 * np.mean(s["unet_losses"][:3]), (tuned["unet_losses"], s["unet_losses"])
    for sub in ("unet", "vae"):  # the saved configs do not record the trainer's own paths
        assert "_name_or_path" not in json.loads((tmp_path / "tuned" / sub / "config.json").read_text())


def test_reproducible_from_seed(td, tmp_path):
    """The same seed gives the same losses and weights (same thread count): two short runs of every stage."""
    short = {"--vae-steps": "6", "--unet-steps": "4", "--cache-size": "32", "--hi-cache-size": "8"}
    args = [short.get(previous, arg) for previous, arg in zip(["", *TINY[:-1]], TINY, strict=True)]
    s1 = td.run(td.parse_args(["--out", str(tmp_path / "first"), "--seed", "3", *args]))
    s2 = td.run(td.parse_args(["--out", str(tmp_path / "again"), "--seed", "3", *args]))
    assert len(s1["vae_losses"]) == 6 and len(s1["unet_losses"]) == 4
    assert s1["vae_losses"] == s2["vae_losses"]
    assert s1["unet_losses"] == s2["unet_losses"]
    a = (tmp_path / "first" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    b = (tmp_path / "again" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert a == b


def test_cli_help():
    r = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    for opt in ("--seed", "--out", "--threads", "--vae-steps", "--unet-steps", "--unet-minutes", "--init-from"):
        assert opt in r.stdout
