"""The studio in a real browser (Debian's Chromium driven by Playwright), against a live server on a
tiny real model. Every request to a host other than 127.0.0.1 is blocked and counted: the count must
stay 0, so the page (and /docs) work with no network."""

from __future__ import annotations

import base64
import io
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, Playwright, Request, Route, expect, sync_playwright

from sdserver import metadata
from sdserver.imaging import encode_png
from tests.conftest import GatedFamily, LiveServer, png_b64, scene, spying, wait_until

CHROMIUM = "/usr/bin/chromium"
PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    if shutil.which(CHROMIUM) is None:
        pytest.skip(f"no browser at {CHROMIUM}: `apt-get install -y chromium` to run the studio's browser tests")
    expect.set_options(timeout=30_000)  # generous: CI machines have 2 cores, shared
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"])
    yield browser
    browser.close()


class Offline:
    """A browser context where every request whose host is not 127.0.0.1 is aborted and recorded.

    The pages also send a Content-Security-Policy that keeps the browser from even trying: what it
    refuses is recorded too (as `refused`)."""

    def __init__(self, browser: Browser, **options: Any) -> None:
        self.context = browser.new_context(**options)
        self.blocked: list[str] = []
        self.context.route("**/*", self._route)
        self.context.set_default_timeout(30_000)
        self.page = self.context.new_page()
        self.page_errors: list[str] = []
        self.refused: list[str] = []
        self.page.on("pageerror", lambda error: self.page_errors.append(str(error)))
        self.page.on("console", self._console)

    def _console(self, message: Any) -> None:
        if "Content Security Policy" in message.text:
            self.refused.append(message.text)

    def _route(self, route: Route, request: Request) -> None:
        if urlparse(request.url).hostname != "127.0.0.1":
            self.blocked.append(request.url)
            route.abort()
        else:
            route.continue_()


@pytest.fixture
def offline(browser: Browser) -> Iterator[Offline]:
    session = Offline(browser, viewport={"width": 1280, "height": 900})
    yield session
    session.context.close()
    assert session.blocked == [], f"requests left 127.0.0.1: {session.blocked}"
    assert session.refused == [], f"refused by the page's policy: {session.refused}"
    assert session.page_errors == [], f"errors in the page: {session.page_errors}"


@pytest.fixture
def page(offline: Offline) -> Page:
    return offline.page


@pytest.fixture(scope="module")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = LiveServer(model=str(tiny_model), outputs_dir=str(tmp_path_factory.mktemp("studio-outputs"))).start()
    yield live
    live.stop()


class SlowSteps(GatedFamily):
    """The real family, sleeping before each denoising step so a run lasts long enough to watch."""

    def __init__(self, real: Any, seconds: float) -> None:
        super().__init__(real)
        self.seconds = seconds

    def forward(self, model: Any, states: Any, inputs: Any, timesteps: Any) -> Any:
        time.sleep(self.seconds)
        return super().forward(model, states, inputs, timesteps)


@pytest.fixture
def slow(server: LiveServer) -> Iterator[None]:
    with spying(server.app, SlowSteps, seconds=0.05):
        yield


def open_studio(page: Page, server: LiveServer) -> None:
    page.goto(server.url + "/")
    expect(page.get_by_label("Model", exact=True)).not_to_have_value("")


def gallery_image(page: Page, prompt: str) -> Any:
    return page.locator("#gallery").get_by_role("img", name=prompt)


def history(server: LiveServer, **params: Any) -> list[dict[str, Any]]:
    import httpx

    return list(httpx.get(server.url + "/v1/history", params=params).json()["items"])


def submit_job(server: LiveServer, **fields: Any) -> dict[str, Any]:
    import httpx

    created = httpx.post(server.url + "/v1/jobs", json={"width": 64, "height": 64, "steps": 3, **fields}).json()
    wait_until(lambda: httpx.get(f"{server.url}/v1/jobs/{created['id']}").json()["status"] == "succeeded")
    wait_until(lambda: httpx.get(f"{server.url}/v1/jobs/{created['id']}").json()["images"][0]["history_id"])
    return dict(created)


# Records when the page first shows progress and when the image first appears in the gallery.
WATCH = """
window.__seen = {};
new MutationObserver(() => {
  const now = performance.now();
  const text = document.getElementById("progress-text")?.textContent ?? "";
  if (!window.__seen.progress && text.startsWith("Step")) window.__seen.progress = now;
  if (!window.__seen.preview && document.getElementById("preview")?.getAttribute("src")) window.__seen.preview = now;
  if (!window.__seen.image && document.querySelector("#gallery img[alt*='red circle']")) window.__seen.image = now;
}).observe(document, {subtree: true, childList: true, characterData: true, attributes: true});
"""


def test_txt2img_shows_progress_then_puts_the_image_in_the_gallery(page: Page, server: LiveServer, slow: None) -> None:
    page.add_init_script(WATCH)
    open_studio(page, server)
    expect(page.get_by_label("Width", exact=True)).to_have_value("64")  # the model's native size
    page.get_by_label("Prompt", exact=True).fill(PROMPT)
    page.get_by_label("Negative prompt", exact=True).fill("green")
    page.get_by_label("Steps", exact=True).fill("8")
    page.get_by_label("Seed", exact=True).fill("7")
    page.get_by_label("Sampler", exact=True).select_option("Euler a")
    page.get_by_role("button", name="Generate").click()
    expect(gallery_image(page, PROMPT)).to_be_visible()
    seen = page.evaluate("window.__seen")
    assert seen.get("progress") and seen.get("preview") and seen.get("image"), seen
    assert seen["progress"] < seen["image"] and seen["preview"] < seen["image"]
    expect(page.locator("#results").get_by_role("img", name=f"{PROMPT} (seed 7)")).to_be_visible()
    kept = history(server, prompt="red circle")[0]
    assert (kept["seed"], kept["negative_prompt"], kept["parameters"]["steps"]) == (7, "green", 8)
    assert kept["parameters"]["sampler"] == "Euler a"


def test_cancel_stops_a_long_run(page: Page, server: LiveServer, slow: None) -> None:
    open_studio(page, server)
    kept_before = len(history(server, limit=200))
    page.get_by_label("Prompt", exact=True).fill("a long run")
    page.get_by_label("Steps", exact=True).fill("150")  # over 7.5 s (50 ms a step) if it ran to the end
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#progress-text")).to_contain_text("Step")
    page.get_by_role("button", name="Cancel", exact=True).click()
    expect(page.get_by_role("status").filter(has_text="Cancelled.")).to_be_visible()
    expect(page.get_by_role("button", name="Cancel", exact=True)).to_be_hidden()
    jobs = server.scheduler.jobs.all()
    cancelled = [job for job in jobs if job.request.prompt == "a long run"]
    assert [job.status.value for job in cancelled] == ["cancelled"]
    assert cancelled[0].progress is not None and cancelled[0].progress.step < 150
    assert len(history(server, limit=200)) == kept_before


def _pixels(data_url: str) -> np.ndarray:
    raw = base64.b64decode(data_url.split(",", 1)[-1])
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"), dtype=np.int16)


def test_inpaint_changes_pixels_only_inside_the_drawn_mask(page: Page, server: LiveServer) -> None:
    open_studio(page, server)
    page.get_by_role("radio", name="Inpaint").check()
    page.locator("#file").set_input_files(
        files=[{"name": "scene.png", "mimeType": "image/png", "buffer": base64.b64decode(png_b64(scene()))}]
    )
    canvas = page.get_by_label("Mask: paint where the image should change")
    expect(canvas).to_be_visible()
    box = canvas.bounding_box()
    assert box is not None
    page.get_by_label("Brush size").fill("40")
    page.mouse.move(box["x"] + box["width"] * 0.2, box["y"] + box["height"] * 0.2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.35, box["y"] + box["height"] * 0.3, steps=5)
    page.mouse.up()
    page.get_by_label("Prompt", exact=True).fill("a yellow circle")
    with page.expect_request(lambda r: r.url.endswith("/v1/jobs") and r.method == "POST") as sent:
        page.get_by_role("button", name="Generate").click()
    body = sent.value.post_data_json
    assert body["task"] == "inpaint"
    result = page.locator("#results").get_by_role("img", name="a yellow circle")
    expect(result).to_be_visible()
    before, after = _pixels(body["init_image"]), _pixels(result.get_attribute("src") or "")
    mask = _pixels(body["mask_image"])[..., 0] > 127
    assert before.shape == after.shape == (64, 64, 3)
    assert int(np.abs(before - _pixels("," + png_b64(scene()))).max()) <= 1  # the picture as chosen
    assert mask[int(64 * 0.25), int(64 * 0.25)] and not mask[60, 60]  # painted where the mouse went
    assert 0.02 < mask.mean() < 0.6
    changed = np.abs(after - before).max(axis=2) > 0
    assert not changed[~mask].any(), "a pixel outside the mask changed"
    assert changed[mask].mean() > 0.5, "the masked area was not repainted"


def test_the_hires_fix_from_the_studio_doubles_the_size(page: Page, server: LiveServer) -> None:
    open_studio(page, server)
    page.get_by_text("Hires fix").click()
    page.get_by_label("Upscale, then a second pass at the larger size").check()
    expect(page.get_by_label("Hires upscaler")).to_have_value("Latent")
    page.get_by_label("Prompt", exact=True).fill("a hires circle")
    page.get_by_label("Steps", exact=True).fill("3")
    with page.expect_request(lambda r: r.url.endswith("/v1/jobs") and r.method == "POST") as sent:
        page.get_by_role("button", name="Generate").click()
    assert sent.value.post_data_json["hires"] == {"scale": 2, "upscaler": "Latent", "strength": 0.5}
    result = page.locator("#results").get_by_role("img", name="a hires circle")
    expect(result).to_be_visible()
    assert _pixels(result.get_attribute("src") or "").shape == (128, 128, 3)


def test_reuse_settings_from_a_history_item(page: Page, server: LiveServer) -> None:
    prompt = "a green square on a black background"
    submit_job(server, prompt=prompt, negative_prompt="blurry", steps=4, seed=1234, guidance_scale=3.5)
    open_studio(page, server)
    page.get_by_label("Prompt", exact=True).fill("something else")
    page.get_by_label("Steps", exact=True).fill("9")
    page.get_by_label("Seed", exact=True).fill("-1")
    gallery_image(page, prompt).click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text("1234")
    dialog.get_by_role("button", name="Reuse settings").click()
    expect(dialog).to_be_hidden()
    expect(page.get_by_label("Prompt", exact=True)).to_have_value(prompt)
    expect(page.get_by_label("Negative prompt", exact=True)).to_have_value("blurry")
    expect(page.get_by_label("Steps", exact=True)).to_have_value("4")
    expect(page.get_by_label("Seed", exact=True)).to_have_value("1234")
    expect(page.get_by_label("Guidance", exact=True)).to_have_value("3.5")
    expect(page.get_by_label("Width", exact=True)).to_have_value("64")
    # Send it to img2img: it becomes the image to work on, and a new image comes of it.
    gallery_image(page, prompt).click()
    dialog.get_by_role("button", name="Send to img2img").click()
    expect(page.get_by_role("radio", name="Image to image")).to_be_checked()
    page.get_by_label("Strength", exact=True).fill("0.5")
    with page.expect_request(lambda r: r.url.endswith("/v1/jobs") and r.method == "POST") as sent:
        page.get_by_role("button", name="Generate").click()
    body = sent.value.post_data_json
    assert (body["task"], body["strength"], body["seed"]) == ("img2img", 0.5, 1234)
    assert _pixels(body["init_image"]).shape == (64, 64, 3)
    expect(page.locator("#results").get_by_role("img", name=f"{prompt} (seed 1234)")).to_be_visible()


def drop_file(page: Page, data: bytes, name: str, selector: str = ".controls") -> None:
    page.evaluate(
        """([encoded, name, selector]) => {
            const bytes = Uint8Array.from(atob(encoded), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, {type: "image/png"}));
            document.querySelector(selector).dispatchEvent(
                new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
        }""",
        [base64.b64encode(data).decode(), name, selector],
    )


def test_dropping_a_png_fills_the_form_with_its_parameters(page: Page, server: LiveServer) -> None:
    params = {
        "prompt": "a white triangle on a green background <lora:none-here:0.5>",
        "negative_prompt": "red",
        "steps": 17,
        "sampler": "DPM++ 2M Karras",
        "cfg_scale": 4.5,
        "seed": 99,
        "width": 48,
        "height": 40,
        "model": "someone-elses-model",
    }
    open_studio(page, server)
    drop_file(page, encode_png(scene(), metadata.text_chunks(params)), "made-here.png")
    expect(page.get_by_label("Prompt", exact=True)).to_have_value("a white triangle on a green background")
    expect(page.get_by_label("Weight of none-here")).to_have_value("0.5")
    expect(page.get_by_label("Negative prompt", exact=True)).to_have_value("red")
    expect(page.get_by_label("Steps", exact=True)).to_have_value("17")
    expect(page.get_by_label("Sampler", exact=True)).to_have_value("DPM++ 2M Karras")
    expect(page.get_by_label("Seed", exact=True)).to_have_value("99")
    expect(page.get_by_label("Width", exact=True)).to_have_value("48")
    expect(page.get_by_label("Height", exact=True)).to_have_value("40")
    # An AUTOMATIC1111 PNG carries only its infotext: read too.
    a1111 = "a black square\nNegative prompt: blue\nSteps: 8, Sampler: Euler a, CFG scale: 6, Seed: 5, Size: 64x56"
    drop_file(page, encode_png(scene(), {"parameters": a1111}), "from-a1111.png")
    expect(page.get_by_label("Prompt", exact=True)).to_have_value("a black square")
    expect(page.get_by_label("Steps", exact=True)).to_have_value("8")
    expect(page.get_by_label("Height", exact=True)).to_have_value("56")
    drop_file(page, encode_png(scene(), {}), "plain.png")
    expect(page.get_by_role("alert")).to_contain_text("plain.png carries no generation parameters")


def test_history_survives_a_reload_and_a_restart(offline: Offline, tiny_model: Path, tmp_path: Path) -> None:
    page, outputs = offline.page, str(tmp_path / "outputs")
    first = LiveServer(model=str(tiny_model), outputs_dir=outputs).start()
    try:
        open_studio(page, first)
        page.get_by_label("Prompt", exact=True).fill("kept across restarts")
        page.get_by_label("Seed", exact=True).fill("31")
        page.get_by_role("button", name="Generate").click()
        expect(gallery_image(page, "kept across restarts")).to_be_visible()
        page.reload()
        expect(gallery_image(page, "kept across restarts")).to_be_visible()
    finally:
        first.stop()
    second = LiveServer(model=str(tiny_model), outputs_dir=outputs).start()
    try:
        open_studio(page, second)
        gallery_image(page, "kept across restarts").click()
        expect(page.get_by_role("dialog")).to_contain_text("31")
        image = page.get_by_role("dialog").get_by_role("img", name="kept across restarts")
        expect(image).to_be_visible()
        assert page.evaluate("(img) => img.naturalWidth", image.element_handle()) == 64
        page.get_by_role("dialog").get_by_role("button", name="Delete").click()
        expect(gallery_image(page, "kept across restarts")).to_have_count(0)
        assert list((tmp_path / "outputs").rglob("*.png")) == []
    finally:
        second.stop()


def test_with_an_api_key_the_page_asks_for_it_then_works(offline: Offline, tiny_model: Path, tmp_path: Path) -> None:
    page = offline.page
    server = LiveServer(model=str(tiny_model), api_keys=["open-sesame"], outputs_dir=str(tmp_path)).start()
    try:
        page.goto(server.url + "/")
        dialog = page.get_by_role("dialog", name="API key")
        expect(dialog).to_be_visible()
        dialog.get_by_label("API key").fill("wrong")
        dialog.get_by_role("button", name="Use this key").click()
        expect(dialog.get_by_role("alert")).to_contain_text("wrong API key")
        dialog.get_by_label("API key").fill("open-sesame")
        dialog.get_by_role("button", name="Use this key").click()
        expect(dialog).to_be_hidden()
        expect(page.get_by_label("Model", exact=True)).not_to_have_value("")
        page.get_by_label("Prompt", exact=True).fill("behind a key")
        page.get_by_role("button", name="Generate").click()
        expect(gallery_image(page, "behind a key")).to_be_visible()
        assert page.evaluate("localStorage.getItem('sdserver.apiKey')") == "open-sesame"
        page.reload()
        expect(page.get_by_label("Model", exact=True)).not_to_have_value("")
        expect(gallery_image(page, "behind a key")).to_be_visible()
        expect(page.get_by_role("dialog", name="API key")).to_be_hidden()
    finally:
        server.stop()


def test_api_errors_are_shown_as_the_api_message(page: Page, server: LiveServer) -> None:
    open_studio(page, server)
    page.get_by_label("Prompt", exact=True).fill("too many steps")
    page.get_by_label("Steps", exact=True).fill("9999")
    page.get_by_role("button", name="Generate").click()
    expect(page.get_by_role("alert")).to_have_text("steps: is over the limit of 150, got 9999")


@pytest.mark.parametrize("width", [1280, 390])
def test_the_layout_fits_a_desktop_and_a_phone(browser: Browser, server: LiveServer, width: int) -> None:
    session = Offline(browser, viewport={"width": width, "height": 800})
    try:
        open_studio(session.page, server)
        overflow = session.page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0
        for name in ("Prompt", "Steps", "Seed", "Width", "Height"):
            assert session.page.get_by_label(name, exact=True).is_visible()
        assert session.page.get_by_role("button", name="Generate").is_visible()
    finally:
        session.context.close()
    assert session.blocked == [] and session.refused == [] and session.page_errors == []


def test_docs_and_redoc_render_offline(offline: Offline, server: LiveServer) -> None:
    page = offline.page
    page.goto(server.url + "/docs")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("sdserver")
    expect(page.locator(".swagger-ui").get_by_text("/v1/history", exact=True).first).to_be_visible()
    page.goto(server.url + "/redoc")
    expect(page.locator("h1").first).to_contain_text("sdserver")
    expect(page.get_by_text("API docs by Redocly")).to_be_visible()
    # ReDoc's bundle asks for its logo from its CDN: the page's policy refuses it before any request.
    for _ in range(100):
        if offline.refused:
            break
        page.wait_for_timeout(100)
    assert len(offline.refused) == 1 and "cdn.redoc.ly/redoc/logo-mini.svg" in offline.refused[0]
    offline.refused.clear()
