"""The jobs API end to end on a tiny real pipeline: submit, poll, stream, cancel, limits."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import SIZE, STEPS, ClientFactory, GatedFamily, decode_png, max_pixel_diff, spying, wait_until

JOB = {"prompt": "a red circle", "width": SIZE, "height": SIZE, "steps": STEPS}


def submit(client: TestClient, **fields: Any) -> dict[str, Any]:
    response = client.post("/v1/jobs", json={**JOB, **fields})
    assert response.status_code == 202, response.text
    return dict(response.json())


def finished(client: TestClient, job_id: str) -> dict[str, Any]:
    wait_until(lambda: client.get(f"/v1/jobs/{job_id}").json()["status"] not in ("queued", "running"))
    return dict(client.get(f"/v1/jobs/{job_id}").json())


def events(client: TestClient, job_id: str) -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        name = ""
        for line in stream.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                out.append((name, json.loads(line.removeprefix("data: "))))
    return out


def test_submit_then_poll_to_the_result(client: TestClient) -> None:
    created = submit(client, seed=40, num_images=2)
    assert set(created) == {"id", "status", "queue_position"}
    assert created["status"] in ("queued", "running")  # the idle worker may take it at once
    job = finished(client, created["id"])
    assert job["status"] == "succeeded" and job["task"] == "txt2img"
    assert [image["seed"] for image in job["images"]] == [40, 41]
    assert job["progress"]["percent"] == 100.0 and job["timings"]["running_s"] > 0
    png = client.get(f"/v1/jobs/{created['id']}/images/1")
    assert png.headers["content-type"] == "image/png" and png.content.startswith(b"\x89PNG")


def test_every_task_through_jobs(client: TestClient) -> None:
    from tests.conftest import half_mask, png_b64, scene

    img2img = submit(client, task="img2img", init_image=png_b64(scene()), strength=0.5)
    inpaint = submit(client, task="inpaint", init_image=png_b64(scene()), mask_image=png_b64(half_mask()))
    for created in (img2img, inpaint):
        assert finished(client, created["id"])["status"] == "succeeded"


def test_idempotency_key_returns_the_same_job(client: TestClient) -> None:
    first = client.post("/v1/jobs", json=JOB, headers={"Idempotency-Key": "abc"}).json()
    again = client.post("/v1/jobs", json=JOB, headers={"Idempotency-Key": "abc"}).json()
    other = client.post("/v1/jobs", json=JOB, headers={"Idempotency-Key": "xyz"}).json()
    assert first["id"] == again["id"] != other["id"]


def test_events_stream_progress_previews_and_the_result(client: TestClient) -> None:
    created = submit(client, steps=6, preview_every=2, seed=5)
    stream = events(client, created["id"])
    names = [name for name, _ in stream]
    assert names[0] == "status" and names[-1] == "succeeded"
    steps = [data["progress"]["step"] for name, data in stream if name == "progress" and "progress" in data]
    assert steps == sorted(steps) and steps[-1] == stream[-1][1]["progress"]["total"]
    previews = [data["preview"] for name, data in stream if "preview" in data]
    assert previews and decode_png(previews[0]).size == (SIZE // 8, SIZE // 8)
    assert stream[-1][1]["images"][0]["seed"] == 5


def test_events_of_a_finished_job_give_the_result_at_once(client: TestClient) -> None:
    created = submit(client)
    finished(client, created["id"])
    assert [name for name, _ in events(client, created["id"])] == ["status", "succeeded"]


def test_cancel_a_queued_job(client: TestClient, gated: GatedFamily) -> None:
    gated.gate.clear()
    blocker = submit(client, prompt="blocker")
    assert gated.entered.wait(30)
    queued = submit(client, prompt="never drawn", steps=STEPS + 1)
    assert client.delete(f"/v1/jobs/{queued['id']}").json()["status"] == "cancelled"
    gated.gate.set()
    assert finished(client, blocker["id"])["status"] == "succeeded"
    assert client.get(f"/v1/jobs/{queued['id']}").json()["status"] == "cancelled"
    assert all("never drawn" not in call for call in gated.calls)


def test_cancel_a_running_job_stops_within_a_step(client: TestClient) -> None:
    created = submit(client, steps=150)
    wait_until(lambda: (client.get(f"/v1/jobs/{created['id']}").json()["progress"] or {}).get("step", 0) >= 2)
    step_at_cancel = client.delete(f"/v1/jobs/{created['id']}").json()["progress"]["step"]
    job = finished(client, created["id"])
    assert job["status"] == "cancelled" and job["error"]["type"] == "Cancelled"
    assert job["progress"]["step"] <= step_at_cancel + 1 < job["progress"]["total"]


def test_jobs_joining_a_running_one_match_their_solo_results(client: TestClient, gated: GatedFamily) -> None:
    specs = [{"prompt": f"prompt {i}", "seed": 100 + i, "num_images": 1 + i % 2} for i in range(4)]
    solo = [finished(client, submit(client, **spec)["id"])["images"] for spec in specs]
    gated.calls.clear()
    gated.entered.clear()
    gated.gate.clear()
    blocker = submit(client, prompt="blocker", steps=STEPS + 1)
    assert gated.entered.wait(30)
    batched_ids = [submit(client, **spec)["id"] for spec in specs]
    gated.gate.set()
    finished(client, blocker["id"])
    batched = [finished(client, job_id)["images"] for job_id in batched_ids]
    joined = [spec["prompt"] for spec in specs for _ in range(int(spec["num_images"]))]
    assert gated.calls == [["blocker"], ["blocker", *joined]]  # all four joined the blocker's second step
    for alone, together in zip(solo, batched, strict=True):
        for a, b in zip(alone, together, strict=True):
            assert a["seed"] == b["seed"]
            assert max_pixel_diff(decode_png(a["base64"]), decode_png(b["base64"])) <= 2


def test_a_failing_request_does_not_fail_its_batch_neighbours(client: TestClient, gated: GatedFamily) -> None:
    gated.gate.clear()
    blocker = submit(client, prompt="blocker", steps=STEPS + 1)
    assert gated.entered.wait(30)
    ids = {prompt: submit(client, prompt=prompt)["id"] for prompt in ("good one", "boom", "good two")}
    gated.fail_on = "boom"
    gated.gate.set()
    finished(client, blocker["id"])
    outcome = {prompt: finished(client, job_id) for prompt, job_id in ids.items()}
    assert outcome["good one"]["status"] == outcome["good two"]["status"] == "succeeded"
    assert outcome["boom"]["status"] == "failed" and "injected fault" in outcome["boom"]["error"]["message"]


def test_full_queue_is_429_with_retry_after(make_client: ClientFactory, tiny_model: Path) -> None:
    client = make_client(model=str(tiny_model), max_queue=1)
    with spying(client.app) as spy:
        spy.gate.clear()
        submit(client, prompt="running")
        assert spy.entered.wait(30)
        submit(client, prompt="waiting")
        refused = client.post("/v1/jobs", json=JOB)
        assert refused.status_code == 429 and refused.headers["retry-after"]
        assert "queue is full" in refused.json()["error"]["message"]
        original = client.post("/txt2img", data={"prompt": "x", "width": SIZE, "height": SIZE})
        assert original.status_code == 429 and original.headers["retry-after"]
        assert original.json()["status"] == "failure"


def test_request_past_its_deadline_is_504_and_never_runs(make_client: ClientFactory, tiny_model: Path) -> None:
    client = make_client(model=str(tiny_model), queue_timeout=0.3)
    responses: list[Any] = []
    with spying(client.app) as spy:
        spy.gate.clear()
        submit(client, prompt="running")
        assert spy.entered.wait(30)
        thread = threading.Thread(
            target=lambda: responses.append(
                client.post("/txt2img", data={"prompt": "too late", "width": SIZE, "height": SIZE})
            )
        )
        thread.start()
        wait_until(lambda: client.app.state.scheduler.queue_depth == 1)  # type: ignore[attr-defined]
        threading.Event().wait(0.5)
    thread.join(30)
    assert responses[0].status_code == 504 and "waited" in responses[0].json()["message"]
    assert all("too late" not in call for call in spy.calls)


def test_finished_jobs_are_kept_only_up_to_max_jobs_kept(make_client: ClientFactory, tiny_model: Path) -> None:
    client = make_client(model=str(tiny_model), max_jobs_kept=1)
    first = submit(client)["id"]
    finished(client, first)
    second = submit(client)["id"]
    finished(client, second)
    submit(client)  # pruning happens as jobs are added
    assert client.get(f"/v1/jobs/{first}").status_code == 404
    assert client.get(f"/v1/jobs/{second}").status_code == 200


def test_finished_jobs_expire_after_job_ttl(make_client: ClientFactory, tiny_model: Path) -> None:
    client = make_client(model=str(tiny_model), job_ttl=0.2)
    first = submit(client)["id"]
    finished(client, first)
    threading.Event().wait(0.3)
    submit(client)
    assert client.get(f"/v1/jobs/{first}").status_code == 404


def test_queue_lists_jobs(client: TestClient) -> None:
    created = submit(client)
    finished(client, created["id"])
    listing = client.get("/v1/queue").json()
    assert listing["queued"] == 0 and created["id"] in [job["id"] for job in listing["jobs"]]


class TestWebhooks:
    def test_refused_unless_allowed(self, client: TestClient) -> None:
        response = client.post("/v1/jobs", json={**JOB, "webhook_url": "http://127.0.0.1:9/hook"})
        assert response.status_code == 400 and "allow-webhooks" in response.json()["error"]["message"]

    def test_result_is_posted_with_retries(self, make_client: ClientFactory, tiny_model: Path) -> None:
        received: list[dict[str, Any]] = []
        attempts: list[int] = []

        class Hook(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                attempts.append(1)
                body = self.rfile.read(int(self.headers["content-length"]))
                if len(attempts) == 1:
                    self.send_response(500)  # the first delivery fails: it must be retried
                else:
                    received.append(json.loads(body))
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        server = HTTPServer(("127.0.0.1", 0), Hook)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            client = make_client(
                model=str(tiny_model), allow_webhooks=True, webhook_secret="s", webhook_allowed_hosts=["127.0.0.1"]
            )
            url = f"http://127.0.0.1:{server.server_port}/hook"
            created = submit(client, webhook_url=url, seed=9)
            wait_until(lambda: bool(received))
        finally:
            server.shutdown()
        assert received[0]["id"] == created["id"] and received[0]["status"] == "succeeded"
        assert received[0]["images"][0]["seed"] == 9 and len(attempts) == 2


@pytest.mark.parametrize(
    "body,words",
    [
        ({"width": 64}, ["prompt"]),
        ({**JOB, "task": "paint"}, ["task", "paint"]),
        ({**JOB, "model": "nope"}, ["nope"]),
        ({**JOB, "steps": 1000}, ["steps", "1000"]),
        ({**JOB, "preview_every": -1}, ["preview_every"]),
        ({**JOB, "colour": "red"}, ["colour"]),
        ({**JOB, "task": "img2img"}, ["init_image"]),
    ],
)
def test_bad_submissions_name_the_field(client: TestClient, body: dict[str, Any], words: list[str]) -> None:
    response = client.post("/v1/jobs", json=body)
    assert response.status_code in (400, 404), response.text
    message = response.json()["error"]["message"]
    for word in words:
        assert word in message, message


def test_unknown_job_is_404(client: TestClient) -> None:
    for response in (client.get("/v1/jobs/nope"), client.delete("/v1/jobs/nope"), client.get("/v1/jobs/nope/events")):
        assert response.status_code == 404 and response.json()["error"]["type"] == "NotFound"
