"""Benchmark: step-level batching (`--batching step`) against request-level batching, under mixed traffic.

Workload: open-loop Poisson arrivals, every request 64x64 (one latent shape) with its steps drawn from
{4, 10, 20, 30, 50}, its guidance from {4, 7.5} and its sampler from {Euler, DPM++ 2M}, all seeded, the
same sequence for both modes. Each request is a job (`POST /v1/jobs`, then its SSE stream to the end):
latency is submit -> last event, queue wait is the server's `timings.queued_s`.

Model: the SD 1.x block structure (shipped config: four UNet levels, cross-attention, 8x VAE) at a small
width (bench_models.py's builder), random weights, so that the UNet dominates the time as it does on real
models. One server per mode, started one after the other in the same run (`--max-batch-size 8`).

Load: first the request-level server's capacity is measured (closed loop, 8 clients, requests/s), then
each mode gets Poisson arrivals at 50%, 80% and 120% of that capacity for --duration seconds each.

    python bench/bench_continuous.py [--width 32] [--duration 40] [--loads 0.5,0.8,1.2] [--seed 1]

Targets: at 80% load, p95 latency at least 40% lower with `step` than with `request`; at 120% load,
throughput at least 1.3x. Run it alone: other CPU work on the machine is noise (the load average is
printed at the start and the end). About 10 minutes on an idle 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_batching import free_port

STEPS = (4, 10, 20, 30, 50)
GUIDANCE = (4.0, 7.5)
SAMPLERS = ("Euler", "DPM++ 2M")
SIZE = 64


@dataclass
class Outcome:
    latency: float
    queued: float
    ok: bool


def build_model(width: int, workdir: Path) -> Path:
    """The SD 1.x structure at `width` (bench_models.py's builder), built in a child process."""
    folder = workdir / f"sd1-w{width}"
    if not (folder / "model_index.json").is_file():
        code = (
            "import sys; from pathlib import Path; sys.path.insert(0, sys.argv[3]);"
            "from bench_models import build_pipeline;"
            "build_pipeline(int(sys.argv[1]), 0, Path(sys.argv[2]).parent).save_pretrained(sys.argv[2])"
        )
        subprocess.run([sys.executable, "-c", code, str(width), str(folder), str(Path(__file__).parent)], check=True)
    return folder


def start(model: Path, batching: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    command = [sys.executable, "-m", "sdserver", "serve", "--model", str(model), "--port", str(port)]
    command += ["--max-batch-size", "8", "--max-queue", "512", "--log-level", "warning"]
    env = {**os.environ, "SDSERVER_BATCHING": batching}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    process.kill()
    raise RuntimeError(f"the {batching} server did not start")


def workload(count: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [
        {
            "prompt": f"a red circle {index}",
            "width": SIZE,
            "height": SIZE,
            "steps": rng.choice(STEPS),
            "guidance_scale": rng.choice(GUIDANCE),
            "sampler": rng.choice(SAMPLERS),
            "seed": index + 1,
        }
        for index in range(count)
    ]


def run_job(url: str, body: dict[str, Any]) -> Outcome:
    started = time.perf_counter()
    with httpx.Client(base_url=url, timeout=httpx.Timeout(30.0, read=None)) as http:
        created = http.post("/v1/jobs", json=body)
        if created.status_code != 202:
            return Outcome(time.perf_counter() - started, 0.0, False)
        final: dict[str, Any] = {}
        with http.stream("GET", f"/v1/jobs/{created.json()['id']}/events") as events:
            event = ""
            for line in events.iter_lines():
                if line.startswith("event:"):
                    event = line.removeprefix("event:").strip()
                elif line.startswith("data:") and event in ("succeeded", "failed", "cancelled"):
                    final = json.loads(line.removeprefix("data:"))
                    break
    queued = (final.get("timings") or {}).get("queued_s") or 0.0
    return Outcome(time.perf_counter() - started, float(queued), final.get("status") == "succeeded")


def closed_loop(url: str, bodies: list[dict[str, Any]], clients: int) -> float:
    """Requests/s with `clients` clients sending back to back (the capacity)."""
    pending = list(bodies)
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                if not pending:
                    return
                body = pending.pop()
            run_job(url, body)

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(bodies) / (time.perf_counter() - started)


def open_loop(url: str, bodies: list[dict[str, Any]], rate: float, seed: int) -> tuple[list[Outcome], float]:
    """Poisson arrivals at `rate` per second; returns the outcomes and the throughput (requests/s)."""
    rng = random.Random(seed)
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    threads = []

    def one(body: dict[str, Any]) -> None:
        outcome = run_job(url, body)
        with lock:
            outcomes.append(outcome)

    started = time.perf_counter()
    for body in bodies:
        thread = threading.Thread(target=one, args=(body,))
        thread.start()
        threads.append(thread)
        time.sleep(rng.expovariate(rate))
    for thread in threads:
        thread.join()
    return outcomes, len(bodies) / (time.perf_counter() - started)


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=32, help="UNet width (block channels w, 2w, 4w, 4w)")
    parser.add_argument("--duration", type=float, default=40.0, help="seconds of arrivals per load and mode")
    parser.add_argument("--loads", default="0.5,0.8,1.2", help="fractions of the request batcher's capacity")
    parser.add_argument("--capacity-requests", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "sdserver-bench-continuous")
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    print(f"load average at start: {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)")
    model = build_model(args.width, args.workdir)
    loads = [float(load) for load in args.loads.split(",")]

    process, url = start(model, "request")
    try:
        closed_loop(url, workload(4, args.seed + 99), 2)  # warm-up
        capacity = closed_loop(url, workload(args.capacity_requests, args.seed), 8)
    finally:
        process.terminate()
        process.wait(30)
    print(f"request batcher capacity (8 clients, closed loop): {capacity:.2f} requests/s")

    rows: dict[tuple[str, float], tuple[float, list[Outcome]]] = {}
    for mode in ("request", "step"):
        process, url = start(model, mode)
        try:
            closed_loop(url, workload(4, args.seed + 99), 2)  # warm-up
            for index, load in enumerate(loads):
                rate = load * capacity
                bodies = workload(max(8, round(rate * args.duration)), args.seed + 10 * index)
                outcomes, throughput = open_loop(url, bodies, rate, args.seed + index)
                rows[mode, load] = (throughput, outcomes)
        finally:
            process.terminate()
            process.wait(30)

    header = ("mode", "load", "req/s", "p50 s", "p95 s", "p99 s", "wait p50", "wait p95")
    print("{:8} {:>5} {:>7} {:>7} {:>7} {:>7} {:>9} {:>9} ok".format(*header))
    for (mode, load), (throughput, outcomes) in sorted(rows.items(), key=lambda item: (item[0][1], item[0][0])):
        latencies = [o.latency for o in outcomes]
        waits = [o.queued for o in outcomes]
        print(
            f"{mode:8} {load:5.0%} {throughput:7.2f} {percentile(latencies, 50):7.2f} {percentile(latencies, 95):7.2f} "
            f"{percentile(latencies, 99):7.2f} {percentile(waits, 50):9.2f} {percentile(waits, 95):9.2f} "
            f"{sum(o.ok for o in outcomes)}/{len(outcomes)}"
        )
    print("--- step vs request ---")
    for load in loads:
        (t_req, o_req), (t_step, o_step) = rows["request", load], rows["step", load]
        p95_req = percentile([o.latency for o in o_req], 95)
        p95_step = percentile([o.latency for o in o_step], 95)
        print(f"{load:.0%} load: p95 latency {1 - p95_step / p95_req:+.0%} lower, throughput {t_step / t_req:.2f}x")
    print("targets: 80% load p95 >= 40% lower; 120% load throughput >= 1.3x")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
