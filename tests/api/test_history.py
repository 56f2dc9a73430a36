"""/v1/history on the real app: what each protocol keeps, reading it back, deleting it, and a failed
write reported in the job without losing it."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from sdserver.api.app import create_app
from sdserver.settings import Settings
from tests.conftest import SIZE, STEPS, ClientFactory, wait_until
from tests.support.history import generated

JOB = {"prompt": "a red circle", "width": SIZE, "height": SIZE, "steps": STEPS, "seed": 11}


def run_job(client: TestClient, **fields: Any) -> dict[str, Any]:
    created = client.post("/v1/jobs", json={**JOB, **fields})
    assert created.status_code == 202, created.text
    url = f"/v1/jobs/{created.json()['id']}"
    wait_until(lambda: client.get(url).json()["status"] not in ("queued", "running"))
    # The images are saved right after the job ends; the SSE's final event waits for that.
    with client.stream("GET", url + "/events") as stream:
        lines = [line for line in stream.iter_lines() if line.startswith("data: ")]
    return dict(json.loads(lines[-1].removeprefix("data: ")))


def kept(client: TestClient, **params: Any) -> list[dict[str, Any]]:
    response = client.get("/v1/history", params=params)
    assert response.status_code == 200, response.text
    return list(response.json()["items"])


@pytest.fixture
def client(make_client: ClientFactory, tiny_model: Path, tmp_path: Path) -> TestClient:
    return make_client(model=str(tiny_model), outputs_dir=str(tmp_path / "outputs"))


def test_a_job_is_kept_and_read_back(client: TestClient, tmp_path: Path) -> None:
    job = run_job(client, num_images=2, negative_prompt="blue")
    ids = [image["history_id"] for image in job["images"]]
    assert all(ids) and job["warnings"] == []
    items = kept(client)
    assert [item["id"] for item in items] == ids[::-1] and [item["seed"] for item in items] == [12, 11]
    item = client.get(f"/v1/history/{ids[0]}").json()
    assert (item["prompt"], item["negative_prompt"], item["task"], item["width"]) == (
        "a red circle",
        "blue",
        "txt2img",
        SIZE,
    )
    assert item["parameters"]["seed"] == 11 and item["parameters"]["steps"] == STEPS
    png = client.get(item["image_url"])
    assert png.headers["content-type"] == "image/png" and "immutable" in png.headers["cache-control"]
    assert png.content == client.get(f"/v1/jobs/{job['id']}/images/0").content  # the same file, parameters and all
    thumb = client.get(item["image_url"], params={"size": 32})
    assert thumb.headers["content-type"] == "image/webp" and Image.open(io.BytesIO(thumb.content)).size == (32, 32)
    assert len(list((tmp_path / "outputs").rglob("*.png"))) == 2


def test_filters_paging_and_bad_values(client: TestClient) -> None:
    for prompt in ("a red circle", "a blue square", "a RED square"):
        run_job(client, prompt=prompt)
    assert [i["prompt"] for i in kept(client, prompt="red")] == ["a RED square", "a red circle"]
    assert [i["prompt"] for i in kept(client, limit=1, offset=1)] == ["a blue square"]
    assert client.get("/v1/history", params={"limit": 1}).json()["total"] == 3
    assert len(kept(client, model=client.get("/models").json()[0]["name"])) == 3
    assert kept(client, model="other") == []
    assert len(kept(client, since="2000-01-01", until="2999-12-31")) == 3
    assert kept(client, until="2000-01-01") == [] and kept(client, since="4102444800") == []
    for params, field in (({"since": "yesterday"}, "since"), ({"limit": 0}, "limit"), ({"size": 3}, "size")):
        path = "/v1/history" if "size" not in params else f"/v1/history/{kept(client)[0]['id']}/image"
        response = client.get(path, params=params)
        assert response.status_code == 400, (params, response.text)
        assert response.json()["error"]["param"] == field


def test_delete_removes_the_item_and_its_file(client: TestClient, tmp_path: Path) -> None:
    item_id = run_job(client)["images"][0]["history_id"]
    assert client.delete(f"/v1/history/{item_id}").json()["id"] == item_id
    assert list((tmp_path / "outputs").rglob("*.png")) == []
    for method in ("GET", "DELETE"):
        response = client.request(method, f"/v1/history/{item_id}")
        assert response.status_code == 404 and "not found" in response.json()["error"]["message"]
    assert client.get(f"/v1/history/{item_id}/image").status_code == 404


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("api", {"jobs", "a1111 asked"}), ("all", {"jobs", "not asked", "original", "a1111 asked"})],
)
def test_what_each_protocol_keeps(
    make_client: ClientFactory, tiny_model: Path, tmp_path: Path, mode: str, expected: set[str]
) -> None:
    client = make_client(model=str(tiny_model), outputs_dir=str(tmp_path), history=mode)
    run_job(client, prompt="jobs")
    run_job(client, prompt="not asked", save=False)
    original = client.post(
        "/txt2img", data={"prompt": "original", "width": SIZE, "height": SIZE, "num_inference_steps": STEPS}
    )
    assert original.status_code == 200
    a1111 = {"prompt": "a1111 asked", "save_images": True, "width": SIZE, "height": SIZE, "steps": STEPS}
    assert client.post("/sdapi/v1/txt2img", json=a1111).status_code == 200
    wait_until(lambda: len(kept(client)) == len(expected))  # the synchronous APIs answer before the save
    assert {item["prompt"] for item in kept(client)} == expected


def test_with_history_off_nothing_is_kept(make_client: ClientFactory, tiny_model: Path, tmp_path: Path) -> None:
    client = make_client(model=str(tiny_model), outputs_dir=str(tmp_path / "off"), history="off")
    assert run_job(client)["images"][0]["history_id"] is None
    assert client.get("/v1/history").json() == {"items": [], "total": 0, "limit": 50, "offset": 0, "enabled": False}
    assert not (tmp_path / "off").exists()


def test_a_failed_write_is_reported_in_the_job_and_loses_nothing(
    make_client: ClientFactory, tiny_model: Path, tmp_path: Path
) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    client = make_client(model=str(tiny_model), outputs_dir=str(blocked))
    final = run_job(client)
    assert final["status"] == "succeeded" and final["images"][0]["base64"]
    assert final["images"][0]["history_id"] is None
    assert "not saved" in final["warnings"][0]
    polled = client.get(f"/v1/jobs/{final['id']}").json()
    assert polled["warnings"] == final["warnings"] and polled["images"][0]["base64"] == final["images"][0]["base64"]
    assert client.get(f"/v1/jobs/{final['id']}/images/0").status_code == 200


def test_a_named_key_sees_only_its_own_history(tiny_model: Path, tmp_path: Path) -> None:
    settings = Settings(
        model=str(tiny_model), outputs_dir=str(tmp_path), api_keys=["alice:a-key", "bob:b-key"], admin_keys=["root"]
    )
    app = create_app(settings)
    with TestClient(app) as client:
        history = app.state.history
        alice = history.save(generated("alice's"), job_id=None, owner="alice", task="txt2img")
        bob = history.save(generated("bob's"), job_id=None, owner="bob", task="txt2img")
        as_alice = {"Authorization": "Bearer a-key"}
        listed = client.get("/v1/history", headers=as_alice).json()
        assert [item["id"] for item in listed["items"]] == [alice] and listed["total"] == 1
        for method, path in (
            ("GET", f"/v1/history/{bob}"),
            ("GET", f"/v1/history/{bob}/image"),
            ("DELETE", f"/v1/history/{bob}"),
        ):
            assert client.request(method, path, headers=as_alice).status_code == 404, (method, path)
        assert client.get(f"/v1/history/{alice}", headers=as_alice).status_code == 200
        as_admin = {"Authorization": "Bearer root"}
        assert client.get("/v1/history", headers=as_admin).json()["total"] == 2  # the admin key: everything
