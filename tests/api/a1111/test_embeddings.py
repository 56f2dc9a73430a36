"""AUTOMATIC1111's embeddings: `GET /sdapi/v1/embeddings` lists the selected checkpoint's loaded and
skipped embeddings in A1111's shape; a prompt that names a loaded one draws with it (and its infotext
says so); one that names a skipped one is told why in `info.notes`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from sdserver.metadata import parse_infotext
from tests.conftest import SIZE, STEPS, ArchModels, ClientFactory, decode_png, max_pixel_diff
from tests.support.embeddings import make_tiny_embedding, text_widths

FAST: dict[str, Any] = {"steps": STEPS, "width": SIZE, "height": SIZE, "seed": 11, "cfg_scale": 7}


@pytest.fixture(scope="module")
def embeddings_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, arch_model: ArchModels) -> Path:
    folder = tmp_path_factory.mktemp("a1111-embeddings")
    (width,) = text_widths(tiny_model)
    make_tiny_embedding(folder / "CharTurner.pt", width, vectors=3, seed=1)
    make_tiny_embedding(folder / "flat.safetensors", width, vectors=1, fmt="safetensors", seed=2)
    make_tiny_embedding(folder / "xlstyle.safetensors", text_widths(arch_model("sdxl").folder), fmt="sdxl", seed=3)
    return folder


@pytest.fixture(scope="module")
def client(
    make_module_client: ClientFactory, tiny_model: Path, tiny_model_without_checker: Path, embeddings_dir: Path
) -> TestClient:
    custom = [{"model_path": str(tiny_model_without_checker), "ui_label": "Mine", "url_path": "mine"}]
    return make_module_client(model=str(tiny_model), custom_models=custom, embeddings_dir=str(embeddings_dir))


@pytest.fixture(scope="module")
def plain_client(make_module_client: ClientFactory, tiny_model: Path) -> TestClient:
    return make_module_client(model=str(tiny_model))


def txt2img(client: TestClient, **fields: Any) -> tuple[Any, dict[str, Any]]:
    response = client.post("/sdapi/v1/txt2img", json={**FAST, **fields})
    assert response.status_code == 200, response.text
    body = response.json()
    return decode_png(body["images"][0]), json.loads(body["info"])


def test_the_listing_has_a1111s_shape(client: TestClient, tiny_model: Path) -> None:
    response = client.get("/sdapi/v1/embeddings")
    assert response.status_code == 200, response.text
    listing = response.json()
    (width,) = text_widths(tiny_model)
    assert listing["loaded"] == {
        "CharTurner": {"step": 1000, "sd_checkpoint": "0123456789", "sd_checkpoint_name": "tiny", "shape": width,
                       "vectors": 3},
        "flat": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": width, "vectors": 1},
    }  # fmt: skip
    skipped = listing["skipped"]["xlstyle"]
    assert (skipped["shape"], skipped["vectors"]) == (width + 64, 2)
    assert skipped["reason"] == f"it is for another architecture ({width}+64-wide, this model needs {width})"


def test_a_loaded_embedding_changes_the_image_and_is_in_the_infotext(
    client: TestClient, plain_client: TestClient, embeddings_dir: Path
) -> None:
    named, info = txt2img(client, prompt="a portrait, CharTurner")
    assert max_pixel_diff(named, txt2img(plain_client, prompt="a portrait, CharTurner")[0]) > 0  # without the file
    assert max_pixel_diff(txt2img(client, prompt="a portrait, charturner")[0], named) == 0  # the name in any case
    digest = hashlib.sha256((embeddings_dir / "CharTurner.pt").read_bytes()).hexdigest()[:12]
    assert parse_infotext(info["infotexts"][0])["TI hashes"] == f"CharTurner: {digest}"
    assert info["notes"] == []
    # other words draw as on a server without embeddings
    assert max_pixel_diff(txt2img(client, prompt="a zebra")[0], txt2img(plain_client, prompt="a zebra")[0]) == 0


def test_a_skipped_embedding_is_noted_and_unknown_words_are_words(client: TestClient) -> None:
    _, info = txt2img(client, prompt="a house", negative_prompt="xlstyle, blurry")
    assert info["notes"] == [
        "embedding 'xlstyle' was not used: it is for another architecture (32+64-wide, this model needs 32)"
    ]
    assert "TI hashes" not in info["infotexts"][0]
    _, info = txt2img(client, prompt="a house, nosuchembedding")
    assert info["notes"] == []


def test_a_model_not_loaded_lists_every_file_as_skipped(client: TestClient) -> None:
    listing = client.app.state.engine.embeddings("mine")  # type: ignore[attr-defined]
    assert listing["loaded"] == {}
    assert set(listing["skipped"]) == {"CharTurner", "flat", "xlstyle"}
    assert all("not loaded" in entry["reason"] for entry in listing["skipped"].values())


def test_refresh_registers_the_files_added_since(make_client: ClientFactory, tiny_model: Path, tmp_path: Path) -> None:
    client = make_client(model=str(tiny_model), embeddings_dir=str(tmp_path))
    assert client.get("/sdapi/v1/embeddings").json() == {"loaded": {}, "skipped": {}}
    (width,) = text_widths(tiny_model)
    make_tiny_embedding(tmp_path / "later.pt", width, seed=7)
    before, _ = txt2img(client, prompt="a later portrait")
    assert client.get("/sdapi/v1/embeddings").json()["loaded"] == {}  # not until the refresh
    for _ in range(2):  # a second refresh changes nothing
        assert client.post("/sdapi/v1/refresh-embeddings").status_code == 200
        assert set(client.get("/sdapi/v1/embeddings").json()["loaded"]) == {"later"}
        after, info = txt2img(client, prompt="a later portrait")
        assert max_pixel_diff(after, before) > 0 and "TI hashes" in info["infotexts"][0]
