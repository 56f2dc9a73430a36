"""Benchmark: batching across concurrent clients, latency, and HTTP overhead.

Starts `sdserver serve` on a tiny model (8x-VAE geometry) twice — batching on (`--max-batch-size 8`)
and off (`--max-batch-size 1`) — and, in the same run, drives it with 1, 4 and 8 concurrent clients,
then times the same pipeline call in-process. Prints images/s, p50/p95 latency and the ratios.

    python bench/bench_batching.py [--size 128] [--steps 20] [--requests 6]

Targets (2-core CPU): with 8 clients, batching >= 2x the images/s of batch size 1; a single request's
HTTP round trip adds <= 10% to the direct pipeline time.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(model: Path, max_batch_size: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sdserver",
            "serve",
            "--model",
            str(model),
            "--port",
            str(port),
            "--max-batch-size",
            str(max_batch_size),
            "--log-level",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/ping", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("server did not start")


def drive(url: str, clients: int, requests_each: int, fields: dict[str, str]) -> tuple[float, list[float]]:
    """Each client sends `requests_each` requests back to back; returns (images/s, latencies)."""
    latencies: list[float] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        with httpx.Client(timeout=600) as http:
            for n in range(requests_each):
                started = time.perf_counter()
                response = http.post(f"{url}/txt2img", data={**fields, "seed": str(1 + index * 1000 + n)})
                response.raise_for_status()
                with lock:
                    latencies.append(time.perf_counter() - started)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return clients * requests_each / (time.perf_counter() - started), latencies


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def direct_pipeline_time(model: Path, size: int, steps: int, repeats: int) -> float:
    """Median time of the same pipeline call in-process (no HTTP, no queue, no PNG)."""
    import torch

    from sdserver.engine.loaders import load_pipelines

    pipes = load_pipelines(str(model), device=torch.device("cpu"), dtype=torch.float32)
    times = []
    for seed in range(repeats + 1):
        started = time.perf_counter()
        pipes.txt2img(
            prompt=["a red circle on a blue background"],
            width=size,
            height=size,
            num_inference_steps=steps,
            generator=[torch.Generator().manual_seed(seed)],
        )
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])  # the first call warms up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--requests", type=int, default=6, help="requests per client")
    parser.add_argument("--clients", default="1,4,8")
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    from sdserver.engine.tiny import make_tiny_model

    model = make_tiny_model(Path(tempfile.mkdtemp(prefix="sdserver-bench-")) / "tiny")
    fields = {
        "prompt": "a red circle on a blue background",
        "width": str(args.size),
        "height": str(args.size),
        "num_inference_steps": str(args.steps),
    }
    client_counts = [int(c) for c in args.clients.split(",")]
    print(
        f"tiny model, {args.size}x{args.size}, {args.steps} steps, {args.requests} requests per client, "
        f"torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}, {os.cpu_count()} CPUs"
    )

    rates: dict[tuple[int, int], float] = {}
    single_p50: dict[int, float] = {}
    for batch in (8, 1):
        process, url = start_server(model, batch)
        try:
            drive(url, 2, 1, fields)  # warm-up
            for clients in client_counts:
                rate, latencies = drive(url, clients, args.requests, fields)
                rates[batch, clients] = rate
                p50, p95 = percentile(latencies, 50), percentile(latencies, 95)
                if clients == 1:
                    single_p50[batch] = p50
                print(
                    f"max-batch-size {batch}: {clients} clients: {rate:6.2f} images/s  "
                    f"p50 {p50 * 1000:7.0f} ms  p95 {p95 * 1000:7.0f} ms"
                )
        finally:
            process.terminate()
            process.wait(30)

    direct = direct_pipeline_time(model, args.size, args.steps, repeats=max(5, args.requests))
    print(f"direct pipeline call (in-process): {direct * 1000:.0f} ms")
    print("--- ratios ---")
    for clients in client_counts:
        print(f"{clients} clients: batching / batch-size-1 images/s = {rates[8, clients] / rates[1, clients]:.2f}x")
    overhead = single_p50[8] / direct - 1
    print(f"single request over HTTP vs direct pipeline: {overhead * 100:+.1f}% (target <= +10%)")


if __name__ == "__main__":
    main()
