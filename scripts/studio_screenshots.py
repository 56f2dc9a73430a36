"""Take the studio screenshots in docs/ on the bundled demo model (offline; needs Debian's chromium).

    python scripts/studio_screenshots.py [--out docs]
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import threading
import time
from pathlib import Path

import httpx
import uvicorn
from playwright.sync_api import Page, expect, sync_playwright

from sdserver.api.app import create_app
from sdserver.settings import Settings

PROMPTS = [
    ("a yellow triangle on a black background", 3),
    ("a white square on a red background", 11),
    ("a green circle on a yellow background", 5),
    ("a blue triangle on a white background", 8),
    ("a red square on a green background", 2),
    ("a black circle on a white background", 4),
]


def serve(outputs: str) -> tuple[str, uvicorn.Server]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app = create_app(Settings(model="demo", outputs_dir=outputs))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.1)
    return f"http://127.0.0.1:{port}", server


def fill_history(url: str) -> None:
    for prompt, seed in PROMPTS:
        job = httpx.post(f"{url}/v1/jobs", json={"prompt": prompt, "seed": seed, "steps": 20}).json()
        while httpx.get(f"{url}/v1/jobs/{job['id']}").json()["status"] in ("queued", "running"):
            time.sleep(0.1)


def generate(page: Page, prompt: str, count: int, seed: int) -> None:
    page.get_by_label("Prompt", exact=True).fill(prompt)
    page.get_by_label("Images", exact=True).fill(str(count))
    page.get_by_label("Seed", exact=True).fill(str(seed))
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#results img")).to_have_count(count, timeout=60_000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "docs")
    out = parser.parse_args().out
    with tempfile.TemporaryDirectory() as outputs, sync_playwright() as playwright:
        url, server = serve(outputs)
        fill_history(url)
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 760}, device_scale_factor=1)
        page.goto(url + "/")
        generate(page, "a red circle on a blue background", 4, 42)
        page.wait_for_timeout(500)
        page.screenshot(path=out / "studio.png")

        page.locator("#gallery button").nth(1).click()
        page.get_by_role("button", name="Send to inpaint").click()
        canvas = page.get_by_label("Mask: paint where the image should change")
        box = canvas.bounding_box()
        assert box is not None
        page.get_by_label("Brush size").fill("70")
        page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.35)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * 0.7, box["y"] + box["height"] * 0.65, steps=8)
        page.mouse.up()
        page.get_by_label("Prompt", exact=True).fill("a blue circle on a red background")
        page.wait_for_timeout(300)
        page.screenshot(path=out / "studio-inpaint.png")

        phone = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2)
        phone.goto(url + "/")
        expect(phone.locator("#gallery img").first).to_be_visible()
        phone.screenshot(path=out / "studio-phone.png")
        browser.close()
        server.should_exit = True
    print(f"wrote {out / 'studio.png'}, {out / 'studio-inpaint.png'}, {out / 'studio-phone.png'}")


if __name__ == "__main__":
    main()
