"""Load: 200 concurrent clients against a small queue. Every request ends (200, 429 or 504), no 5xx,
the server stays ready throughout, and its memory comes back down afterwards."""

from __future__ import annotations

import asyncio
import collections
import signal
from pathlib import Path

import httpx

from tests.test_faults import serve

CLIENTS = 200


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def storm(url: str) -> tuple[collections.Counter[int], list[int]]:
    fields = {"prompt": "load", "width": "64", "height": "64", "num_inference_steps": "2"}
    limits = httpx.Limits(max_connections=CLIENTS + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=180, limits=limits) as http:
        done = asyncio.Event()
        ready_codes: list[int] = []

        async def watch_ready() -> None:
            while not done.is_set():
                ready_codes.append((await http.get("/ready")).status_code)
                await asyncio.sleep(0.2)

        async def one(seed: int) -> int:
            return (await http.post("/txt2img", data={**fields, "seed": str(seed + 1)})).status_code

        watcher = asyncio.create_task(watch_ready())
        codes = await asyncio.gather(*(one(seed) for seed in range(CLIENTS)))
        done.set()
        await watcher
    return collections.Counter(codes), ready_codes


def test_two_hundred_concurrent_clients(tiny_model: Path) -> None:
    process, url = serve("--model", str(tiny_model), "--max-queue", "8", "--queue-timeout", "30")
    try:
        asyncio.run(storm(url))  # warm-up round: allocator pools, thread pools, caches
        before = rss_mb(process.pid)
        codes, ready_codes = asyncio.run(storm(url))
        after = rss_mb(process.pid)
        assert httpx.get(f"{url}/ready").status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    print(f"load: {dict(codes)}; /ready polled {len(ready_codes)}x; RSS {before:.0f} -> {after:.0f} MB")
    assert sum(codes.values()) == CLIENTS
    assert set(codes) <= {200, 429, 504}, codes
    assert codes[200] >= 8 and codes[429] > 0, codes  # the queue both served and pushed back
    assert ready_codes and set(ready_codes) == {200}
    # A second identical storm must not grow memory: no per-request leak.
    assert after - before < 50, f"RSS {before:.0f} MB -> {after:.0f} MB"
