"""Benchmark: images/s of `sdserver serve --ray` with 1 and 2 engine replicas at 16 concurrent clients,
against the single-process server, in the same run.

Workload: closed loop, --clients clients each sending `POST /txt2img` (the original API, one image,
64x64, --steps steps, seeded) back to back until --requests have been answered. Images/s is answered
images over the wall time; latency is each request's round trip.

Model: the SD 1.x block structure at a small width (bench_models.py's builder, random weights) so the
UNet dominates as it does on real models. Each replica reserves --cpus-per-replica CPUs (torch uses as
many threads); the single-process server gets the same number of threads (OMP_NUM_THREADS). On GPUs,
pass --gpus-per-replica 1 (each replica owns a GPU) or 0.5 (two share one).

    python bench/bench_ray.py [--replicas 1,2] [--clients 16] [--requests 96] [--steps 20] [--width 32]

Ray runs locally (started and stopped here). On a shared or loaded machine the numbers are noise: the
load average is printed at the start and the end. The scaling to expect: N replicas on N free devices
give up to N times the images/s of one; fewer free cores than replicas give less.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_batching import free_port
from bench_continuous import build_model

SIZE = 64


@dataclass
class Row:
    name: str
    images_per_s: float
    latencies: list[float]
    failures: int


def closed_loop(url: str, requests: int, clients: int, steps: int) -> Row:
    """`clients` clients back to back until `requests` are answered."""
    remaining = [requests]
    latencies: list[float] = []
    failures = [0]
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(base_url=url, timeout=httpx.Timeout(30.0, read=None)) as http:
            while True:
                with lock:
                    if remaining[0] <= 0:
                        return
                    remaining[0] -= 1
                    seed = remaining[0] + 1
                form = {"prompt": "a red circle", "width": SIZE, "height": SIZE, "num_inference_steps": steps}
                started = time.perf_counter()
                response = http.post("/txt2img", data={**form, "seed": seed})
                elapsed = time.perf_counter() - started
                with lock:
                    latencies.append(elapsed)
                    failures[0] += response.status_code != 200

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return Row("", (requests - failures[0]) / wall, latencies, failures[0])


def wait_ready(url: str, replicas: int | None = None, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{url}/ready", timeout=2)
            body = response.json()
            if response.status_code == 200 and (replicas is None or body["replicas"]["up"] == replicas):
                return
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not become ready")


def single_process(model: Path, args: argparse.Namespace) -> Row:
    port = free_port()
    command = [sys.executable, "-m", "sdserver", "serve", "--model", str(model), "--port", str(port)]
    command += ["--max-queue", "512", "--log-level", "warning"]
    threads = str(max(1, int(args.cpus_per_replica)))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "SDSERVER_HISTORY": "off"}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url)
        closed_loop(url, 8, 4, args.steps)  # warm-up
        row = closed_loop(url, args.requests, args.clients, args.steps)
    finally:
        process.terminate()
        process.wait(60)
    row.name = "single process (no Ray)"
    return row


def on_ray(model: Path, replica_counts: list[int], args: argparse.Namespace) -> list[Row]:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from sdserver.cluster.app import build
    from sdserver.cluster.board import NAMESPACE, board_name
    from sdserver.settings import Settings

    cpus = max(os.cpu_count() or 1, int(max(replica_counts) * args.cpus_per_replica))
    ray.init(num_cpus=cpus, namespace=NAMESPACE, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        for count in replica_counts:
            settings = Settings(
                model=str(model),
                replicas=count,
                cpus_per_replica=args.cpus_per_replica,
                gpus_per_replica=args.gpus_per_replica,
                max_queue=512,
                history="off",
                port=port,
            )
            serve.run(build(settings), name=settings.ray_app_name, route_prefix="/")
            wait_ready(url, count)
            closed_loop(url, 4 * count, 2 * count, args.steps)  # warm-up: every replica
            row = closed_loop(url, args.requests, args.clients, args.steps)
            row.name = f"Ray Serve, {count} replica{'s' if count > 1 else ''}"
            rows.append(row)
            serve.delete(settings.ray_app_name)
            ray.kill(ray.get_actor(board_name(settings.ray_app_name), namespace=NAMESPACE))
    finally:
        serve.shutdown()
        ray.shutdown()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", default="1,2", help="engine replica counts to measure, one after the other")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=96, help="requests answered per configuration")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--width", type=int, default=32, help="UNet width (block channels w, 2w, 4w, 4w)")
    parser.add_argument("--cpus-per-replica", type=float, default=1.0)
    parser.add_argument("--gpus-per-replica", type=float, default=None, help="default: 1 if Ray sees GPUs, else 0")
    parser.add_argument("--no-baseline", action="store_true", help="skip the single-process server")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "sdserver-bench-ray")
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    print(f"load average at start: {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)", flush=True)
    model = build_model(args.width, args.workdir)
    rows = [] if args.no_baseline else [single_process(model, args)]
    rows += on_ray(model, [int(count) for count in args.replicas.split(",")], args)
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    print(f"\n{args.clients} clients, {args.requests} requests of 1 image {SIZE}x{SIZE}, {args.steps} steps each\n")
    first_ray = next((row for row in rows if row.name.startswith("Ray")), rows[0])
    print("| server | images/s | vs 1 replica | p50 latency (s) | p95 latency (s) | failed |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        p50 = statistics.median(row.latencies)
        p95 = statistics.quantiles(row.latencies, n=20)[-1] if len(row.latencies) > 1 else p50
        ratio = row.images_per_s / first_ray.images_per_s
        print(f"| {row.name} | {row.images_per_s:.2f} | {ratio:.2f}x | {p50:.2f} | {p95:.2f} | {row.failures} |")


if __name__ == "__main__":
    main()
