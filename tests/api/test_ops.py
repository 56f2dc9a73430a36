"""Operations: health, readiness, metrics, request ids and the access log, the body size limit."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.conftest import SIZE, STEPS, ClientFactory

TXT2IMG = {"prompt": "x", "width": SIZE, "height": SIZE, "num_inference_steps": STEPS}


def test_health_and_ready(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


def test_not_ready_while_draining_and_new_work_is_503(client: TestClient) -> None:
    client.app.state.scheduler.stop_accepting()  # type: ignore[attr-defined]
    assert client.get("/ready").status_code == 503
    assert client.get("/ready").json()["status"] == "draining"
    refused = client.post("/txt2img", data=TXT2IMG)
    assert refused.status_code == 503 and refused.json()["status"] == "failure"
    assert client.get("/health").status_code == 200


def test_not_ready_after_the_worker_died(client: TestClient) -> None:
    scheduler = client.app.state.scheduler  # type: ignore[attr-defined]
    scheduler.stop()
    assert client.get("/ready").json()["status"] == "worker stopped"
    assert client.post("/v1/jobs", json={"prompt": "x"}).status_code == 503


def test_metrics_count_requests_batches_images_and_memory(client: TestClient) -> None:
    assert client.post("/txt2img", data={**TXT2IMG, "num_outputs": 2}).status_code == 200
    text = client.get("/metrics").text
    assert 'sdserver_http_requests_total{method="POST",route="/txt2img",status="200"} 1.0' in text
    assert "sdserver_batch_images_count 1.0" in text
    assert "sdserver_images_generated_total" in text and "sdserver_denoising_step_seconds_bucket" in text
    assert 'sdserver_queue{kind="depth"} 0.0' in text
    assert 'sdserver_models{kind="loaded"} 1.0' in text
    assert "process_resident_memory_bytes" in text
    assert 'sdserver_jobs_finished_total{status="succeeded"} 1.0' in text


def test_request_id_is_returned_and_logged(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="sdserver.access"):
        response = client.post("/txt2img", data=TXT2IMG, headers={"X-Request-ID": "abc-123"})
        fresh = client.get("/ping")
    assert response.headers["x-request-id"] == "abc-123"
    assert len(fresh.headers["x-request-id"]) == 32
    lines = [json.loads(record.getMessage()) for record in caplog.records if record.name == "sdserver.access"]
    line = next(entry for entry in lines if entry["id"] == "abc-123")
    assert line["status"] == 200 and line["path"] == "/txt2img"
    assert line["model"] == "tiny" and line["size"] == f"{SIZE}x{SIZE}" and line["steps"] == STEPS
    assert line["queue_wait_s"] >= 0 and line["run_s"] > 0


def test_hostile_request_id_is_replaced(client: TestClient) -> None:
    response = client.get("/ping", headers={"X-Request-ID": "x" * 500})
    assert response.headers["x-request-id"] != "x" * 500


class TestBodyLimit:
    @pytest.fixture
    def small(self, make_client: ClientFactory, tiny_model: Path) -> TestClient:
        return make_client(model=str(tiny_model), max_body_mb=0.001)

    def test_declared_oversized_body_is_413(self, small: TestClient) -> None:
        response = small.post("/txt2img", data={**TXT2IMG, "prompt": "x" * 5000})
        assert response.status_code == 413 and "limit" in response.json()["message"]

    def test_streamed_oversized_body_is_413(self, small: TestClient) -> None:
        def chunks():  # type: ignore[no-untyped-def]
            for _ in range(10):
                yield b"prompt=" + b"x" * 500

        response = small.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
        assert response.status_code == 413 and response.json()["error"]["type"] == "PayloadTooLarge"

    def test_small_body_passes(self, small: TestClient) -> None:
        assert small.post("/txt2img", data=TXT2IMG).status_code == 200
