"""Benchmark for a GPU machine: vanilla diffusers against sdserver's engine with each speed switch, the server
under 8 concurrent clients, and each offload mode under a simulated 8 GB card. One table, and JSON.

    python bench/gpu.py                          # CUDA: SD 1.5 + SDXL + FLUX.1-schnell, fp16, 20 steps
    python bench/gpu.py --device cpu --quick     # the same code paths on tiny models, on a CPU

Models: random weights, built on the device from the shipped architecture configs (SD 1.5:
assets/architectures/sd1, SDXL: .../sdxl) and, for FLUX.1-schnell, from diffusers' FLUX defaults (its
published dimensions: 19 double + 38 single blocks, 3072 wide) with a T5-XXL encoder; fp16 (FLUX bf16).
Random weights cost what trained ones cost: the images are noise, the timings are real.

Sections (in one process, one after the other, so every ratio compares numbers from the same run):
1. speed: it/s of the denoising loop (20 steps; the rate between the first and the last step, the GPU
   synchronised at each) at 512² and 1024², batch 1, 4 and 8, for vanilla diffusers (fp16 + SDPA: the
   pipeline's own __call__) and for sdserver's engine (its own loop: engine/session.py) with no switch,
   with each switch alone (channels_last, fuse_qkv, tf32; batch 1), with the defaults, and with the
   defaults + compile (SD 1.5 at 512²; its start-up compile and warm-up time reported). Peak memory each.
2. server: images/s of the real app (step batching) with 8 concurrent clients, SD 1.5 at 512², 20 steps.
3. offload: SDXL at 1024² (20 steps) and FLUX.1-schnell at 1024² (4 steps) with the CUDA allocator capped at
   8 GB (torch.cuda.set_per_process_memory_fraction): offload none, model and sequential, each one image:
   OOM or not, s/step, peak memory; plus what `offload auto` chooses there.

--quick (any device): tiny models (64² and 128², batch 1 and 2, 4 steps), compile with 2 rows at most, no
FLUX unless the tiny FLUX builder is installed. Expected: under 3 minutes on a 2-core CPU, under 8 on an
H100/H200 for the full run. --budget-s stops starting new measurements past that many seconds (they are
listed as skipped); --sections offload (or speed, server) runs only those, e.g. to finish a cut run.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import platform
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from sdserver.engine import loaders  # noqa: E402
from sdserver.engine.loaders import LoadedPipelines, load_pipelines  # noqa: E402
from sdserver.engine.session import Session  # noqa: E402
from sdserver.engine.speed import Tuning, choose_offload, probe  # noqa: E402

log = logging.getLogger("bench.gpu")
GB = 1e9
PROMPT = "a photograph of a lighthouse on a cliff at dusk"


@dataclass
class Plan:
    device: torch.device
    quick: bool
    steps: int
    sizes: dict[str, tuple[int, ...]]  # model -> sides
    batches: tuple[int, ...]
    compile_model: str
    compile_rows: int
    cap_gb: float
    budget_s: float
    started: float = field(default_factory=time.perf_counter)
    skipped: list[str] = field(default_factory=list)

    def over(self, what: str) -> bool:
        if time.perf_counter() - self.started > self.budget_s:
            self.skipped.append(what)
            return True
        return False


# -- models ----------------------------------------------------------------------------------------


def _no_hash(module: torch.nn.Module) -> str:
    return "bench"  # hashing 24 GB of random FLUX weights per load would dominate the run


def build_shipped(arch: str, device: torch.device, dtype: torch.dtype) -> Any:
    """A random-weight pipeline from the shipped configs of `arch` (sd1, sdxl), built on `device`."""
    import diffusers
    import transformers

    from sdserver.engine.architectures import architectures_root
    from sdserver.engine.tiny import _clip_tokenizer

    folder = architectures_root() / arch
    index = json.loads((folder / "model_index.json").read_text())
    parts: dict[str, Any] = {}
    for name, value in index.items():
        if not isinstance(value, list) or value[0] is None:
            continue
        library, class_name = value
        if name.startswith("tokenizer"):
            parts[name] = _clip_tokenizer(arch, name)  # type: ignore[arg-type]
        elif name == "scheduler":
            parts[name] = getattr(diffusers, class_name).from_pretrained(folder, subfolder="scheduler")
        elif library == "diffusers":
            cls = getattr(diffusers, class_name)
            with torch.device(device):
                parts[name] = cls.from_config(cls.load_config(folder / name)).to(dtype)
        elif library == "transformers":
            cls = getattr(transformers, class_name)
            with torch.device(device):
                parts[name] = cls(transformers.AutoConfig.from_pretrained(folder / name)).to(dtype)
    pipeline_class = getattr(diffusers, index["_class_name"])
    extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    return pipeline_class(**parts, **(extra if "safety_checker" in index else {})).to(device)


def build_flux_schnell(device: torch.device, dtype: torch.dtype) -> Any:
    """FLUX.1-schnell's architecture (diffusers' FluxTransformer2DModel defaults) with random weights, T5-XXL
    and CLIP-L encoders, the 16-channel VAE, and a small stand-in T5 tokenizer (the real one cannot ship)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel

    from sdserver.engine.tiny import _clip_tokenizer

    words = ["<pad>", "</s>", "<unk>", *PROMPT.split()]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t5_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )
    clip = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                          projection_dim=768, hidden_act="quick_gelu")  # fmt: skip
    t5 = T5Config(d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64, vocab_size=32128,
                  feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)  # fmt: skip
    with torch.device(device):
        parts = {
            "transformer": FluxTransformer2DModel().to(dtype),
            "text_encoder": CLIPTextModel(clip).to(dtype),
            "text_encoder_2": T5EncoderModel(t5).to(dtype),
            "vae": AutoencoderKL(
                latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
                sample_size=1024,
            ).to(dtype),
        }  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    return FluxPipeline(scheduler=scheduler, tokenizer=_clip_tokenizer("sd1", "tokenizer"), tokenizer_2=t5_tokenizer,
                        **parts)  # fmt: skip


def build(name: str, plan: Plan, workdir: Path) -> Any:
    """A pipeline of model `name` on the plan's device (quick: a tiny saved model, loaded)."""
    dtype = torch.float32 if plan.device.type == "cpu" else torch.float16
    if plan.quick:
        from diffusers import DiffusionPipeline

        from sdserver.engine.tiny import make_tiny_model

        arch = {"sd15": "sd1", "sdxl": "sdxl", "flux-schnell": "flux-schnell"}[name]
        options = {} if arch.startswith("flux") else {"safety_checker": False}
        folder = make_tiny_model(workdir / name, arch=arch, seed=5, **options)  # type: ignore[arg-type]
        return DiffusionPipeline.from_pretrained(folder).to(plan.device)
    if name == "flux-schnell":
        return build_flux_schnell(plan.device, torch.bfloat16)
    return build_shipped({"sd15": "sd1", "sdxl": "sdxl"}[name], plan.device, dtype)


def native(name: str, quick: bool) -> int:
    return 64 if quick else {"sd15": 512, "sdxl": 1024, "flux-schnell": 1024}[name]


# -- measuring -------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def peak(device: torch.device, into: dict[str, Any]) -> Iterator[None]:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    yield
    if device.type == "cuda":
        into["peak_gb"] = round(torch.cuda.max_memory_allocated(device) / GB, 2)


def rate(stamps: list[float]) -> float:
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")


def vanilla(pipe: Any, side: int, batch: int, steps: int, device: torch.device) -> dict[str, Any]:
    """diffusers' own __call__ (fp16 + SDPA, nothing else)."""
    stamps: list[float] = []

    def on_step(pipeline: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        sync(device)
        stamps.append(time.perf_counter())
        return kwargs

    flux = type(pipe).__name__.startswith("Flux")
    out: dict[str, Any] = {}
    with peak(device, out), torch.no_grad():
        started = time.perf_counter()
        pipe(prompt=PROMPT, height=side, width=side, num_inference_steps=steps, num_images_per_prompt=batch,
             guidance_scale=0.0 if flux else 7.5, generator=torch.Generator().manual_seed(1),
             callback_on_step_end=on_step)  # fmt: skip
        sync(device)
        out["wall_s"] = round(time.perf_counter() - started, 3)
    out["it_s"] = round(rate(stamps), 2)
    return out


def engine_run(model: LoadedPipelines, side: int, batch: int, steps: int, device: torch.device) -> dict[str, Any]:
    """sdserver's engine: admit, one denoiser forward per step, finish (decode + metadata)."""
    session = Session(model, "bench", lambda name: None)
    request = probe(model, side, batch).model_copy(update={"steps": steps, "seed": 1, "prompt": PROMPT})
    if model.family.options.guidance != "cfg":
        request = request.model_copy(update={"guidance_scale": model.default_guidance})
    out: dict[str, Any] = {}
    stamps: list[float] = []
    with peak(device, out), torch.no_grad():
        started = time.perf_counter()
        state = session.admit(request)
        while not state.done:
            session.step([state])
            sync(device)
            stamps.append(time.perf_counter())
        session.finish([state])
        sync(device)
        out["wall_s"] = round(time.perf_counter() - started, 3)
    out["it_s"] = round(rate(stamps), 2)
    return out


def release(*objects: Any) -> None:
    del objects
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def engine_model(pipe: Any, name: str, plan: Plan, **tuning: Any) -> tuple[LoadedPipelines, float]:
    """sdserver's load path over a copy of `pipe` (switches change weights in place); (model, seconds)."""
    started = time.perf_counter()
    model = load_pipelines(
        name, device=plan.device, dtype=pipe.dtype, pipe=copy.deepcopy(pipe), tuning=Tuning(**tuning)
    )
    return model, time.perf_counter() - started


def defaults(device: torch.device) -> dict[str, Any]:
    """The switches `auto` turns on for this device (engine/speed.py)."""
    from sdserver.settings import Settings

    tuning = Tuning.from_settings(Settings(), device)
    return {"channels_last": tuning.channels_last, "fuse_qkv": tuning.fuse_qkv, "tf32": tuning.tf32}


# -- sections --------------------------------------------------------------------------------------


def speed_section(name: str, pipe: Any, plan: Plan, rows: list[dict[str, Any]]) -> None:
    device, steps = plan.device, plan.steps
    tf32 = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)
    switches = [{"channels_last": True}, {"fuse_qkv": True}, *([{"tf32": True}] if tf32 else [])]

    def add(variant: str, side: int, batch: int, run: Callable[[], dict[str, Any]], **extra: Any) -> None:
        if plan.over(f"{name} {variant} {side} b{batch}"):
            return
        try:
            row = run()
        except torch.OutOfMemoryError:
            row = {"error": "OOM"}
            release()
        rows.append({"model": name, "variant": variant, "size": side, "batch": batch, **row, **extra})
        log.info("%s", rows[-1])

    for side in plan.sizes[name]:
        for batch in plan.batches:
            add("vanilla diffusers", side, batch, partial(vanilla, pipe, side, batch, steps, device))
    model, _ = engine_model(pipe, name, plan)
    for side in plan.sizes[name]:
        for batch in plan.batches:
            add("engine, no switch", side, batch, partial(engine_run, model, side, batch, steps, device))
    release(model)
    side = native(name, plan.quick)
    for switch in switches:
        with tf32_flag(switch.pop("tf32", False)):
            model, _ = engine_model(pipe, name, plan, **switch)
            label = "engine + " + ("tf32" if not switch else next(iter(switch)))
            add(label, side, plan.batches[0], partial(engine_run, model, side, plan.batches[0], steps, device))
            release(model)
    on = defaults(device)
    with tf32_flag(on.pop("tf32")):
        model, _ = engine_model(pipe, name, plan, **on)
        for side in plan.sizes[name]:
            for batch in plan.batches:
                add("engine, defaults", side, batch, partial(engine_run, model, side, batch, steps, device))
        release(model)
        if name == plan.compile_model and not plan.over(f"{name} compile"):
            compiled_run(name, pipe, plan, on, add)


def compiled_run(name: str, pipe: Any, plan: Plan, on: dict[str, Any], add: Callable[..., None]) -> None:
    side = native(name, plan.quick)
    torch._dynamo.reset()
    try:
        model, warm_up = engine_model(
            pipe, name, plan, **on, compile=True, compile_sizes=((side, side),), max_rows=plan.compile_rows
        )
        for batch in plan.batches:
            add("engine, defaults + compile", side, batch,
                lambda batch=batch: engine_run(model, side, batch, plan.steps, plan.device),
                compile_and_load_s=round(warm_up, 1))  # fmt: skip
        release(model)
    finally:
        torch.compiler.set_stance("default")
        torch._dynamo.reset()


@contextmanager
def tf32_flag(on: bool) -> Iterator[None]:
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def server_section(pipe: Any, plan: Plan, workdir: Path) -> dict[str, Any]:
    """The real app (uvicorn in a thread, step batching) and 8 client threads posting /txt2img."""
    import httpx
    import uvicorn

    from sdserver.api.app import create_app
    from sdserver.settings import Settings

    if plan.over("server"):
        return {}
    folder = workdir / "server-model"
    pipe.save_pretrained(folder)
    side, clients, per_client = native("sd15", plan.quick), 8, 2 if plan.quick else 4
    settings = Settings(model=str(folder), device=str(plan.device), max_batch_size=8, history="off", port=_port())
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=settings.port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{settings.port}"
    while not server.started:
        time.sleep(0.1)
    form = {"prompt": PROMPT, "width": side, "height": side, "num_inference_steps": plan.steps}

    def client(index: int) -> int:
        done = 0
        with httpx.Client(base_url=url, timeout=600) as http:
            for n in range(per_client):
                response = http.post("/txt2img", data={**form, "seed": index * 100 + n})
                done += response.status_code == 200
        return done

    client(99)  # warm: the first request pays for the CUDA kernels' first use
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        images = sum(pool.map(client, range(clients)))
    wall = time.perf_counter() - started
    server.should_exit = True
    thread.join(60)
    release()
    result = {
        "size": side,
        "clients": clients,
        "images": images,
        "wall_s": round(wall, 2),
        "images_s": round(images / wall, 3),
    }
    log.info("server: %s", result)
    return result


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def offload_section(name: str, pipe: Any, plan: Plan, rows: list[dict[str, Any]]) -> None:
    """Each mode under the cap, one image at the native size; the pipe is reused (sequential goes last:
    it leaves the weights on the meta device)."""
    device, cap = plan.device, int(plan.cap_gb * GB)
    side, steps = native(name, plan.quick), 4 if name == "flux-schnell" else plan.steps
    pipe.to("cpu")
    release()
    cuda = device.type == "cuda"
    auto = choose_offload(pipe, device, Tuning(offload="auto", memory_limit=cap), name) if cuda else "none"
    if cuda:
        torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(device).total_memory, device)
    try:
        for mode in ("none", "model", "sequential") if cuda else ("none", "model"):
            if plan.over(f"{name} offload {mode}"):
                continue
            row: dict[str, Any] = {"model": name, "offload": mode, "size": side, "steps": steps, "auto_chooses": auto}
            row["cap_gb"] = plan.cap_gb if cuda else None
            model = None
            try:
                model = load_pipelines(name, device=device, dtype=pipe.dtype, pipe=pipe,
                                       tuning=Tuning(offload=mode, memory_limit=cap if cuda else None))  # fmt: skip
                result = engine_run(model, side, 1, steps, device)
                row.update(result, s_per_step=round(1 / result["it_s"], 3), ok=True)
            except torch.OutOfMemoryError:
                row.update(ok=False, error="OOM")
            rows.append(row)
            log.info("%s", row)
            _undo(pipe, model)
    finally:
        if cuda:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
        release()


def _undo(pipe: Any, model: LoadedPipelines | None) -> None:
    """Back to a plain CPU pipeline: offload hooks off, the memory wrappers off."""
    pipe.remove_all_hooks()
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.__dict__.pop("forward", None)
            module.__dict__.pop("decode", None)
    if model is not None:
        model.txt2img.remove_all_hooks()
    del model
    pipe.to("cpu")
    release()


# -- report ----------------------------------------------------------------------------------------


def table(speed: list[dict[str, Any]], server: dict[str, Any], offload: list[dict[str, Any]]) -> str:
    lines = ["| model | variant | size | batch | it/s | x vanilla | wall s | peak GB | note |", "|" + "---|" * 9]
    base = {(r["model"], r["size"], r["batch"]): r.get("it_s") for r in speed if r["variant"] == "vanilla diffusers"}
    for r in speed:
        ref = base.get((r["model"], r["size"], r["batch"]))
        ratio = f"{r['it_s'] / ref:.2f}" if ref and r.get("it_s") else ""
        note = r.get("error", "") or (f"compile+load {r['compile_and_load_s']} s" if "compile_and_load_s" in r else "")
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['size']} | {r['batch']} | {r.get('it_s', '')} | {ratio} | "
            f"{r.get('wall_s', '')} | {r.get('peak_gb', '')} | {note} |"
        )
    if server:
        lines.append(
            f"| sd15 | server, {server['clients']} clients | {server['size']} | - | | | {server['wall_s']} | | "
            f"{server['images_s']} images/s ({server['images']} images) |"
        )
    for r in offload:
        note = f"auto chooses {r['auto_chooses']}" + ("" if r.get("ok") else f"; {r.get('error')}")
        cap = f" ({r['cap_gb']} GB cap)" if r.get("cap_gb") else ""
        lines.append(
            f"| {r['model']} | offload {r['offload']}{cap} | {r['size']} | 1 | {r.get('it_s', '')} | | "
            f"{r.get('wall_s', '')} | {r.get('peak_gb', '')} | {note} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny models: the code paths, in minutes on a CPU")
    parser.add_argument("--out", type=Path, default=Path("bench-gpu.json"))
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="start nothing new past this many seconds (default: 450; --quick: no limit)",
    )
    parser.add_argument("--cap-gb", type=float, default=8.0, help="the simulated card for the offload section")
    parser.add_argument("--no-flux", action="store_true")
    parser.add_argument(
        "--sections", default="speed,server,offload", help="which to run (e.g. offload alone, to finish a cut run)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    loaders.weights_hash = _no_hash  # type: ignore[assignment]
    device = torch.device(args.device)
    sections = set(args.sections.split(","))
    quick = args.quick
    plan = Plan(
        device=device,
        quick=quick,
        steps=4 if quick else 20,
        sizes={"sd15": (64, 128), "sdxl": (64,)} if quick else {"sd15": (512, 1024), "sdxl": (512, 1024)},
        batches=(1, 2) if quick else (1, 4, 8),
        compile_model="sd15",
        compile_rows=2 if quick else 16,
        cap_gb=args.cap_gb,
        budget_s=args.budget_s or (float("inf") if quick else 450),
    )
    meta = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(), "quick": quick}
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(device)
    speed: list[dict[str, Any]] = []
    offload: list[dict[str, Any]] = []
    server: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="sdserver-bench-") as tmp:
        workdir = Path(tmp)
        for name in ("sd15", "sdxl"):
            if not ({"speed", "server"} & sections if name == "sd15" else {"speed", "offload"} & sections):
                continue
            pipe = build(name, plan, workdir)
            if "speed" in sections:
                speed_section(name, pipe, plan, speed)
            if name == "sd15" and "server" in sections:
                server = server_section(pipe, plan, workdir)
            if name == "sdxl" and "offload" in sections:
                offload_section(name, pipe, plan, offload)
            release(pipe)
        flux = not args.no_flux and "offload" in sections and _flux_available(quick)
        if flux and not plan.over("flux-schnell offload"):
            try:  # built here for the first time on a GPU: a failure is reported, the rest is kept
                pipe = build("flux-schnell", plan, workdir)
                offload_section("flux-schnell", pipe, plan, offload)
                release(pipe)
            except Exception as exc:
                log.exception("FLUX.1-schnell failed")
                offload.append({"model": "flux-schnell", "offload": "-", "size": 1024, "ok": False,
                                "auto_chooses": "-", "error": f"{type(exc).__name__}: {exc}"[:200]})  # fmt: skip
    meta["seconds"] = round(time.perf_counter() - plan.started, 1)
    meta["skipped"] = plan.skipped
    report = table(speed, server, offload)
    print(report)
    print(json.dumps(meta))
    args.out.write_text(json.dumps({"meta": meta, "speed": speed, "server": server, "offload": offload}, indent=1))


def _flux_available(quick: bool) -> bool:
    if not quick:
        return True
    from sdserver.engine import tiny

    return "flux-schnell" in getattr(tiny, "TINY_ARCHS", ())


if __name__ == "__main__":
    main()
