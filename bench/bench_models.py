"""Benchmark: model loading, switching and the memory they leave, through the model registry.

Builds one random-weight model (about 294 MB of fp32 weights at the default --width 96): the shipped SD 1.x config
(assets/architectures/sd1) scaled down, UNet block_out_channels (w, 2w, 4w, 4w), VAE (w/2, w, 2w, 2w), a CLIP text
encoder 256 wide with the real 49,408-token vocabulary and 64 channels per head, so that a single-file copy loads
back the same config. It is saved as a diffusers folder, a .safetensors and a .ckpt; the single files are written
by the test suite's helper `tests.support.original_layout.save_single_file` (borrowed: the repository root goes on
sys.path). The build runs in a child process first, so its memory is not in the numbers.

Then, in one process on the CPU, through `sdserver.engine.registry.Registry` (base model: the bundled demo), after
a sanity step (one 64x64, 2-step image from each model, untimed):
1. cold load: the model not loaded -> `registry.get(name)` returns; median of --repeats per source form (the files
   are in the OS page cache after the first read: this times loading, not the disk);
2. cached get: the model already loaded -> `registry.get(name)`, and cold / cached;
3. memory: process RSS before any load, loaded, unloaded; then --switches switches over --switch-models in turn
   with max_loaded=2 (base + one), so each switch unloads one model and loads another; then the same with a
   max_memory_bytes budget (room for one model) instead of the count (--budget-switches).

4. SD 3 and FLUX.1 (tiny models from engine/tiny_flow.py): the cold load of each form users download (a
   folder, an all-in-one .safetensors, a transformer-only .safetensors or Q8_0 .gguf with `encoders`), and
   switches between an SD 3 folder and a FLUX GGUF file (`--families` runs only this part).

RSS is read as is and after gc.collect() + malloc_trim(0) ("trimmed": glibc keeps freed heap; the server never
trims), split into anonymous and file-backed pages (.safetensors weights stay mapped from their files). A leak
shows as trimmed RSS growing from switch 10 to the last switch that loaded the same model; "kept after unload"
near the model's size means its memory was not returned.

    python bench/bench_models.py [--width 96] [--repeats 3] [--switches 50] [--budget-switches 20] [--workdir DIR]
    python bench/bench_models.py --families [--repeats 3]

About 1.5 minutes on an idle 2-core CPU. Other CPU work on the machine slows torch badly (threads wait on each
other): the load average is printed at the start and the end.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
FORMS = ("folder", "safetensors", "ckpt")
TEXT_HIDDEN = 256
PROMPT = "x"

# --- model building (child process) ---------------------------------------------------------------------------


def _shipped(component: str) -> dict[str, Any]:
    from sdserver.engine.architectures import architectures_root

    config = json.loads((architectures_root() / "sd1" / component / "config.json").read_text(encoding="utf-8"))
    return {key: value for key, value in config.items() if not key.startswith("_") and key != "architectures"}


def _clip_tokenizer(folder: Path) -> Any:
    """The real CLIP tokenizer (49,408 tokens), as tiny.py builds it: single files need CLIP's vocabulary."""
    from transformers import CLIPTokenizer

    from sdserver.engine.architectures import architectures_root

    shutil.copytree(architectures_root() / "sd1" / "tokenizer", folder)
    for file in (architectures_root() / "clip-tokenizer").iterdir():
        shutil.copy(file, folder / file.name)
    return CLIPTokenizer.from_pretrained(folder)


def build_pipeline(width: int, seed: int, scratch: Path) -> Any:
    """A random-weight SD 1.x pipeline, the shipped config with sizes shrunk (heads follow the shipped rules)."""
    import diffusers
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPImageProcessor, CLIPTextConfig, CLIPTextModel

    from sdserver.engine.architectures import architectures_root

    torch.manual_seed(seed)
    vae_first = max(32, (width // 2 + 31) // 32 * 32)  # GroupNorm(32) needs multiples of 32
    unet = UNet2DConditionModel(
        **_shipped("unet")
        | {"block_out_channels": (width, 2 * width, 4 * width, 4 * width), "layers_per_block": 1}
        | {"cross_attention_dim": TEXT_HIDDEN}
    )
    vae = AutoencoderKL(
        **_shipped("vae") | {"block_out_channels": (vae_first, width, 2 * width, 2 * width), "layers_per_block": 1}
    )
    text = {"hidden_size": TEXT_HIDDEN, "intermediate_size": 4 * TEXT_HIDDEN, "num_hidden_layers": 4}
    text["num_attention_heads"] = max(1, TEXT_HIDDEN // 64)  # single-file loading assumes 64 channels per head
    encoder = CLIPTextModel(CLIPTextConfig(**_shipped("text_encoder") | text))
    scheduler_config = json.loads((architectures_root() / "sd1" / "scheduler" / "scheduler_config.json").read_text())
    scheduler = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=encoder,
        tokenizer=_clip_tokenizer(scratch / "tokenizer"),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        requires_safety_checker=False,
    )


def model_paths(workdir: Path, width: int) -> dict[str, Path]:
    folder = workdir / f"w{width}"
    return {"folder": folder / "model", "safetensors": folder / "model.safetensors", "ckpt": folder / "model.ckpt"}


def build_models(workdir: Path, width: int, seed: int) -> None:
    sys.path.insert(0, str(ROOT))  # for tests.support
    from tests.support.original_layout import save_single_file

    paths = model_paths(workdir, width)
    with tempfile.TemporaryDirectory(prefix="sdserver-bench-tok-") as scratch:
        pipe = build_pipeline(width, seed, Path(scratch))
    pipe.save_pretrained(paths["folder"], safe_serialization=True)
    save_single_file(pipe, paths["safetensors"])
    save_single_file(pipe, paths["ckpt"])
    (paths["folder"].parent / "done").write_text("ok")


def ensure_models(workdir: Path, width: int, seed: int) -> dict[str, Path]:
    """Build the model (in a child process) unless `workdir` already has it."""
    paths = model_paths(workdir, width)
    if not (paths["folder"].parent / "done").is_file():
        started = time.perf_counter()
        command = [sys.executable, __file__, "--build-only", "--workdir", str(workdir), "--width", str(width)]
        subprocess.run([*command, "--seed", str(seed)], check=True)
        print(f"built the model in {time.perf_counter() - started:.1f} s")
    return paths


# --- memory ---------------------------------------------------------------------------------------------------


def _libc() -> Any:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


LIBC = _libc()


def _status_kb(field: str) -> float:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return float(match.group(1)) if match else float("nan")


def raw_rss_mb() -> float:
    """Resident memory as it is now (psutil, else /proc/self/status)."""
    try:
        import psutil

        return float(psutil.Process().memory_info().rss) / 2**20
    except ImportError:
        return _status_kb("VmRSS") / 1024


def trimmed_rss_mb() -> float:
    """Resident memory after gc.collect() and glibc's malloc_trim(0) hand freed heap back to the OS."""
    gc.collect()
    if LIBC is not None:
        LIBC.malloc_trim(0)
    return raw_rss_mb()


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    return _status_kb("VmHWM") / 1024


@dataclass
class Rss:
    raw: float  # as is
    trimmed: float  # after gc + malloc_trim
    anon: float  # of `trimmed`: anonymous memory (heap, tensors read into memory)
    file: float  # of `trimmed`: file-backed pages (weights mapped from .safetensors files, libraries)

    @classmethod
    def now(cls) -> Rss:
        raw = raw_rss_mb()
        trimmed = trimmed_rss_mb()
        return cls(raw, trimmed, _status_kb("RssAnon") / 1024, _status_kb("RssFile") / 1024)


# --- measurements ---------------------------------------------------------------------------------------------


def make_registry(paths: dict[str, Path]) -> Any:
    from sdserver.engine.registry import ModelSpec, Registry

    specs = [ModelSpec(name="base", source="demo", label="base", is_base=True, origin="base")]
    for form in FORMS:
        specs.append(ModelSpec(name=form, source=str(paths[form]), label=form, requires_safety_checker=False))
    return Registry(specs, device=torch.device("cpu"), dtype=torch.float32, token=None, max_loaded=2)


def component_sizes(pipe: Any) -> str:
    sizes = {
        name: sum(p.numel() * p.element_size() for p in getattr(pipe, name).parameters()) / 2**20
        for name in ("unet", "vae", "text_encoder")
    }
    return ", ".join(f"{name} {mb:.0f} MB" for name, mb in sizes.items())


def sanity(registry: Any) -> None:
    """One 64x64, 2-step image from each model (untimed), and the three forms' UNets must be identical."""
    for name in ("base", *FORMS):
        started = time.perf_counter()
        pipelines = registry.get(name)
        images = pipelines.txt2img(prompt=PROMPT, num_inference_steps=2, width=64, height=64).images
        took = time.perf_counter() - started
        print(f"sanity: {name}: {images[0].size[0]}x{images[0].size[1]} image in {took:.1f} s (load + first image)")
        if name == FORMS[0]:
            print(f"model: {pipelines.memory_bytes / 2**20:.0f} MB fp32 ({component_sizes(pipelines.txt2img)})")
        del pipelines
        if name != "base":
            registry.unload(name)
    hashes = {registry.weights_hash(form) for form in FORMS}
    print(f"sanity: UNet weights identical across the three forms: {'yes' if len(hashes) == 1 else 'NO'}")


@dataclass
class FormResult:
    form: str
    model_mb: float
    cold_s: list[float]
    cached_us: float
    loaded_delta: Rss  # loaded minus before
    peak_delta_mb: float  # peak RSS during the load minus before
    kept_raw_mb: float  # RSS after unload (as is) minus before (trimmed)
    kept_trimmed_mb: float  # the same, both trimmed


def time_cached(registry: Any, name: str, batches: int = 5, calls: int = 1000) -> float:
    """µs per `registry.get(name)` on a loaded model: the median over batches of the batch's mean."""
    means = []
    for _ in range(batches):
        started = time.perf_counter()
        for _ in range(calls):
            registry.get(name)
        means.append((time.perf_counter() - started) / calls * 1e6)
    return statistics.median(means)


def delta(after: Rss, before: Rss) -> Rss:
    return Rss(*(getattr(after, f) - getattr(before, f) for f in ("raw", "trimmed", "anon", "file")))


def measure_form(registry: Any, form: str, repeats: int, log: list[tuple[str, Rss]]) -> FormResult:
    """Cold-load `form` `repeats` times (unloading after each), with RSS around each load."""
    cold: list[float] = []
    loaded: list[Rss] = []
    peaks: list[float] = []
    kept_raw: list[float] = []
    kept_trimmed: list[float] = []
    cached, model_mb = 0.0, 0.0
    for repeat in range(repeats):
        before = Rss.now()
        has_peak = reset_peak()
        started = time.perf_counter()
        pipelines = registry.get(form)
        cold.append(time.perf_counter() - started)
        peaks.append(peak_rss_mb() - before.trimmed if has_peak else float("nan"))
        model_mb = pipelines.memory_bytes / 2**20
        del pipelines
        after = Rss.now()
        loaded.append(delta(after, before))
        if repeat == 0:
            cached = time_cached(registry, form)
            log.append((f"{form} model loaded (first cold load)", after))
        registry.unload(form)
        unloaded = Rss.now()
        kept_raw.append(unloaded.raw - before.trimmed)
        kept_trimmed.append(unloaded.trimmed - before.trimmed)
        if repeat == 0:
            log.append((f"{form} model unloaded", unloaded))
    med = statistics.median
    middle = sorted(loaded, key=lambda rss: rss.trimmed)[len(loaded) // 2]
    return FormResult(form, model_mb, cold, cached, middle, med(peaks), med(kept_raw), med(kept_trimmed))


@dataclass
class SwitchRun:
    label: str
    rss: dict[int, tuple[str, Rss]]  # after switch n: the model it loaded, RSS
    same: int  # the last switch that loaded the same model as switch 10 (growth compares like with like)
    times: list[float]
    loads: int
    unloads: int
    max_others: int  # most non-base models loaded at once


def switch(registry: Any, names: list[str], count: int, label: str) -> SwitchRun:
    """`registry.get` on `names` in turn, `count` times; the budget allows one model besides the base."""
    same = count - (count - 10) % len(names)
    marks = {1, 10, 25, same, count}
    rss: dict[int, tuple[str, Rss]] = {}
    times: list[float] = []
    loads, unloads, max_others = registry.load_count, registry.unload_count, 0
    for n in range(1, count + 1):
        started = time.perf_counter()
        name = names[(n - 1) % len(names)]
        registry.get(name)
        times.append(time.perf_counter() - started)
        max_others = max(max_others, len(registry.loaded_names()) - 1)
        if n in marks:
            rss[n] = name, Rss.now()
    loads, unloads = registry.load_count - loads, registry.unload_count - unloads
    return SwitchRun(label, rss, same, times, loads, unloads, max_others)


def unload_others(registry: Any) -> None:
    for name in registry.loaded_names():
        if name != registry.base_name:
            registry.unload(name)


# --- output ---------------------------------------------------------------------------------------------------


def machine_info(threads: int) -> str:
    cpu = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    import diffusers

    load = os.getloadavg()
    return (
        f"machine: {os.cpu_count()} CPUs ({cpu.group(1) if cpu else platform.processor()}), "
        f"{_meminfo_gb():.0f} GB RAM, load average {load[0]:.2f} at start; python {platform.python_version()}, "
        f"torch {torch.__version__} ({threads} threads), diffusers {diffusers.__version__}"
    )


def _meminfo_gb() -> float:
    match = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
    return int(match.group(1)) / 2**20 if match else float("nan")


def print_forms(results: list[FormResult], repeats: int) -> None:
    print(f"\n### Cold load vs cached get (median of {repeats} cold loads; cached: 5 x 1000 gets)\n")
    print(
        "| form | model MB | cold load s | (min-max) | cached get µs | cold / cached | RSS +loaded MB (anon / file) "
        "| peak RSS +during load MB | RSS kept after unload MB (as is / trimmed) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        cold = statistics.median(r.cold_s)
        print(
            f"| {r.form} | {r.model_mb:.0f} | {cold:.2f} | {min(r.cold_s):.2f}-{max(r.cold_s):.2f} "
            f"| {r.cached_us:.2f} | {cold / (r.cached_us / 1e6):,.0f}x | {r.loaded_delta.trimmed:+.0f} "
            f"({r.loaded_delta.anon:+.0f} / {r.loaded_delta.file:+.0f}) "
            f"| {r.peak_delta_mb:+.0f} | {r.kept_raw_mb:+.0f} / {r.kept_trimmed_mb:+.0f} |"
        )
    base = statistics.median(results[0].cold_s)
    ratios = ", ".join(f"{r.form} {statistics.median(r.cold_s) / base:.2f}x" for r in results[1:])
    print(f"\ncold load relative to the folder: {ratios}")
    print(
        "RSS is read after gc + malloc_trim unless 'as is'; 'file' is file-backed pages: weights mapped from "
        ".safetensors files, paged in as they are first read (a .ckpt is read into anonymous memory)."
    )


def print_log(log: list[tuple[str, Rss]]) -> None:
    print("\n### RSS before any load, loaded, unloaded\n")
    print("| point | RSS MB (as is) | RSS MB (trimmed) | change MB (trimmed) | anon MB | file MB |")
    print("|---|---:|---:|---:|---:|---:|")
    previous = log[0][1].trimmed
    for point, rss in log:
        print(
            f"| {point} | {rss.raw:.0f} | {rss.trimmed:.0f} | {rss.trimmed - previous:+.0f} "
            f"| {rss.anon:.0f} | {rss.file:.0f} |"
        )
        previous = rss.trimmed


def print_switches(run: SwitchRun, model_mb: float) -> None:
    print(f"\n### {run.label}\n")
    print("| after switch | loaded | RSS MB (as is) | RSS MB (gc + malloc_trim) |")
    print("|---:|---|---:|---:|")
    for n, (name, rss) in sorted(run.rss.items()):
        print(f"| {n} | {name} | {rss.raw:.0f} | {rss.trimmed:.0f} |")
    first, last = run.rss[10][1], run.rss[run.same][1]
    raw, trimmed = last.raw - first.raw, last.trimmed - first.trimmed
    print(
        f"\ngrowth switch 10 -> {run.same} (same model loaded): {raw:+.0f} MB as is, {trimmed:+.0f} MB trimmed "
        f"({trimmed / model_mb:+.2f} model sizes); switch median {statistics.median(run.times):.2f} s; "
        f"load_count +{run.loads}, unload_count +{run.unloads}; at most {run.max_others} non-base model(s) loaded"
    )


def command_line(args: argparse.Namespace) -> str:
    workdir = f" --workdir {args.workdir}" if args.workdir else ""
    return (
        f".venv/bin/python bench/bench_models.py --width {args.width} --repeats {args.repeats} "
        f"--switches {args.switches} --budget-switches {args.budget_switches} --switch-models {args.switch_models} "
        f"--threads {args.threads}{workdir}"
    )


# --- SD 3 and FLUX.1: each form a user downloads --------------------------------------------------------------

FLOW_FORMS = {  # name -> (architecture, form); "+ encoders": the parts the file lacks come from the folder
    "sd3 folder": ("sd3", "folder"),
    "sd3 all-in-one": ("sd3", "all-in-one"),
    "sd3 transformer + encoders": ("sd3", "transformer"),
    "flux folder": ("flux", "folder"),
    "flux transformer + encoders": ("flux", "transformer"),
    "flux gguf Q8_0 + encoders": ("flux", "gguf"),
}


def build_flow_models(workdir: Path) -> dict[str, tuple[str, str | None]]:
    """Tiny SD3 and FLUX models (engine/tiny_flow.py) in every form: name -> (source, encoders)."""
    sys.path.insert(0, str(ROOT))  # for tests.support
    from diffusers import DiffusionPipeline

    from sdserver.engine.tiny import make_tiny_model
    from tests.support.flow_layout import all_in_one, save_gguf, save_safetensors, transformer_to_original

    sources: dict[str, tuple[str, str | None]] = {}
    for arch in ("sd3", "flux"):
        folder = workdir / f"flow-{arch}"
        if not (folder / "model_index.json").is_file():
            make_tiny_model(folder, arch=arch, seed=1)
        pipe = DiffusionPipeline.from_pretrained(folder)
        original = transformer_to_original(pipe.transformer)
        files = {
            "folder": (str(folder), None),
            "all-in-one": (
                str(save_safetensors(all_in_one(pipe, t5=False), workdir / f"{arch}-all.safetensors")),
                None,
            ),
            "transformer": (str(save_safetensors(original, workdir / f"{arch}-transformer.safetensors")), str(folder)),
            "gguf": (str(save_gguf(original, workdir / f"{arch}-Q8_0.gguf", arch=arch)), str(folder)),
        }
        for name, (model_arch, form) in FLOW_FORMS.items():
            if model_arch == arch:
                sources[name] = files[form]
    return sources


def measure_flow_families(workdir: Path, repeats: int, switches: int) -> None:
    from sdserver.engine.registry import ModelSpec, Registry

    sources = build_flow_models(workdir)
    specs = [ModelSpec(name="base", source="demo", label="base", is_base=True, origin="base")]
    for name, (source, encoders) in sources.items():
        slug = name.replace(" ", "-").replace("+", "with")
        specs.append(ModelSpec(slug, source, name, requires_safety_checker=False, encoders=encoders))
    registry = Registry(specs, device=torch.device("cpu"), dtype=torch.float32, token=None, max_loaded=2)
    registry.preload()
    print(f"\n### SD 3 and FLUX.1: cold load per form (tiny models; median of {repeats})\n")
    print("| form | kind | model MB | cold load s | relative to its folder |")
    print("|---|---|---:|---:|---:|")
    folder_times: dict[str, float] = {}
    for spec in specs[1:]:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            loaded = registry.get(spec.name)
            times.append(time.perf_counter() - started)
            kind, megabytes = loaded.description.kind, loaded.memory_bytes / 2**20
            del loaded
            registry.unload(spec.name)
        cold = statistics.median(times)
        folder_times.setdefault(kind, cold)
        print(f"| {spec.label} | {kind} | {megabytes:.0f} | {cold:.2f} | {cold / folder_times[kind]:.2f}x |")
    pair = [specs[1].name, specs[-1].name]  # an SD3 folder and a FLUX GGUF file, in turn
    run = switch(registry, pair, switches, f"{switches} switches between {pair[0]} and {pair[1]}")
    print(f"\n{run.label}: median switch (unload + load) {statistics.median(run.times):.2f} s")


# --- main -----------------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=96, help="UNet's first block channels (a multiple of 32)")
    parser.add_argument("--repeats", type=int, default=3, help="cold loads per form")
    parser.add_argument("--switches", type=int, default=50, help="switches with max_loaded=2 (at least 10)")
    parser.add_argument("--budget-switches", type=int, default=20, help="switches with max_memory_bytes (0: skip)")
    parser.add_argument("--switch-models", default=",".join(FORMS), help="2 or 3 of: " + ", ".join(FORMS))
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, help="where the model is built (kept; reused when there)")
    parser.add_argument("--families", action="store_true", help="only SD 3 / FLUX.1 load and switch times")
    parser.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.width % 32 or args.switches < 10 or 0 < args.budget_switches < 10:
        parser.error("--width must be a multiple of 32, and --switches / --budget-switches (if not 0) at least 10")
    names = args.switch_models.split(",")
    if not 2 <= len(set(names)) == len(names) <= 3 or not set(names) <= set(FORMS):
        parser.error(f"--switch-models: 2 or 3 different names of {', '.join(FORMS)}")
    return args


def quiet_libraries() -> None:
    """No progress bars or warnings from diffusers / transformers (e.g. single files' float32 casting notice)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity_error()
        library.disable_progress_bar()


def main() -> None:
    args = parse_args()
    quiet_libraries()
    torch.set_num_threads(args.threads)
    if args.build_only:
        build_models(args.workdir, args.width, args.seed)
    elif args.families:
        with tempfile.TemporaryDirectory(prefix="sdserver-bench-flow-") as workdir:
            measure_flow_families(args.workdir or Path(workdir), args.repeats, max(10, args.switches // 5))
    elif args.workdir:
        run(args, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="sdserver-bench-models-") as workdir:
            run(args, Path(workdir))


def run(args: argparse.Namespace, workdir: Path) -> None:
    started = time.perf_counter()
    print(f"command: {command_line(args)}")
    print(machine_info(args.threads))
    paths = ensure_models(workdir, args.width, args.seed)

    import diffusers.pipelines  # noqa: F401 (imported before the first RSS reading, as the registry needs it)

    log = [("imports done, nothing loaded", Rss.now())]
    registry = make_registry(paths)
    registry.preload()
    log.append(("base (bundled demo) loaded (and first-use imports)", Rss.now()))
    sanity(registry)
    log.append(("after the sanity step (each model loaded, used, unloaded)", Rss.now()))

    results = [measure_form(registry, form, args.repeats, log) for form in FORMS]
    model_mb = results[0].model_mb
    print_forms(results, args.repeats)
    print_log(log)

    names = args.switch_models.split(",")
    label = f"{args.switches} switches over {', '.join(names)}, max_loaded=2 (base + one)"
    runs = [switch(registry, names, args.switches, label)]
    if args.budget_switches:
        unload_others(registry)
        registry.max_loaded = 10
        registry.max_memory_bytes = int(registry.loaded_bytes() + 1.5 * model_mb * 2**20)  # base + one model
        label = f"{args.budget_switches} switches, max_loaded=10, max_memory_bytes = base + 1.5 model sizes"
        runs.append(switch(registry, names, args.budget_switches, label))
    for switch_run in runs:
        print_switches(switch_run, model_mb)
    print(f"\nregistry totals: load_count {registry.load_count}, unload_count {registry.unload_count}")
    measure_flow_families(workdir, args.repeats, max(10, args.switches // 5))
    load = os.getloadavg()[0]
    print(
        f"total time {time.perf_counter() - started:.0f} s (model build included); load average {load:.2f} at the end"
    )


if __name__ == "__main__":
    main()
