"""A1111's listing and utility routes answer in A1111's shape (webuiapi and plugins call them at start-up)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.conftest import ClientFactory


@pytest.fixture(scope="module")
def client(make_module_client: ClientFactory, tiny_model: Path) -> TestClient:
    return make_module_client(model=str(tiny_model), hf_token="hf_secret_token")


@pytest.mark.parametrize(
    ("route", "empty"),
    [
        ("hypernetworks", []),
        ("face-restorers", []),
        ("prompt-styles", []),
        ("script-info", []),
        ("extensions", []),
        ("scripts", {"txt2img": [], "img2img": []}),
    ],
)
def test_what_sdserver_does_not_have_is_an_honest_empty_answer(client: TestClient, route: str, empty: object) -> None:
    response = client.get(f"/sdapi/v1/{route}")
    assert response.status_code == 200
    assert response.json() == empty


def test_cmd_flags_show_the_settings_but_never_a_secret(client: TestClient) -> None:
    flags = client.get("/sdapi/v1/cmd-flags").json()
    assert flags["api"] is True and flags["port"] == flags["sdserver"]["port"]
    assert "hf_token" not in flags["sdserver"] and "hf_secret_token" not in str(flags)


def test_memory_reports_ram_and_says_when_there_is_no_accelerator(client: TestClient) -> None:
    memory = client.get("/sdapi/v1/memory").json()
    assert memory["ram"]["total"] >= memory["ram"]["free"] > 0 and memory["ram"]["used"] > 0
    assert "error" in memory["cuda"]  # the tests run on a CPU


def test_options_carry_a1111s_names_with_their_defaults(client: TestClient) -> None:
    options = client.get("/sdapi/v1/options").json()
    assert options["send_seed"] is True and options["send_size"] is True
