"""Textual-inversion embeddings from embeddings_dir: a file's name in a prompt brings in its vectors (in any
case, every vector of a multi-vector one); files for another architecture, and unreadable ones, are
skipped with the reason; other words encode exactly as without embeddings; the image's parameters carry
A1111's "TI hashes"."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from sdserver.core.types import validate_request
from sdserver.engine import Engine
from sdserver.engine.embeddings import EmbeddingInfo, EmbeddingSet, Skipped, load_embeddings
from sdserver.engine.families import all_families
from sdserver.engine.loaders import LoadedPipelines, load_pipelines
from sdserver.metadata import params_of, parse_infotext
from sdserver.settings import Settings
from tests.conftest import SIZE, STEPS, ArchModels
from tests.support.embeddings import make_tiny_embedding, text_widths

EngineFactory = Callable[..., Engine]


class Evil:
    """Unpickling it would run a command."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("echo pwned",))


@pytest.fixture(scope="module")
def embeddings_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, arch_model: ArchModels) -> Path:
    folder = tmp_path_factory.mktemp("embeddings")
    (sd1,) = text_widths(tiny_model)
    xl = text_widths(arch_model("sdxl").folder)
    make_tiny_embedding(folder / "CharTurner.pt", sd1, vectors=3, seed=1)  # A1111 .pt, mixed-case name
    make_tiny_embedding(folder / "flat.safetensors", sd1, vectors=1, fmt="safetensors", seed=2)
    make_tiny_embedding(folder / "styles" / "concept.bin", sd1, vectors=1, fmt="diffusers", seed=3)  # a subfolder
    make_tiny_embedding(folder / "xlstyle.safetensors", xl, vectors=2, fmt="sdxl", seed=4)
    make_tiny_embedding(folder / "wide.pt", 2 * sd1 + 1, seed=5)  # no tiny model is this wide
    (sd2,) = text_widths(arch_model("sd2").folder)
    make_tiny_embedding(folder / "v2style.safetensors", sd2, fmt="safetensors", seed=8)
    make_tiny_embedding(folder / "legacy.pt", sd1, vectors=1, fmt="pt-module", seed=6)
    (folder / "broken.pt").write_bytes(b"not a pickle at all")
    torch.save({"string_to_param": {"*": Evil()}}, folder / "evil.pt")
    return folder


@pytest.fixture(scope="module")
def engines() -> EngineFactory:
    """Loaded CPU engines, one per (model, embeddings_dir), kept for the module."""
    built: dict[tuple[str, str | None], Engine] = {}

    def get(model: Path, folder: Path | None) -> Engine:
        key = (str(model), None if folder is None else str(folder))
        if key not in built:
            settings = Settings(model=str(model), device="cpu", embeddings_dir=key[1])
            built[key] = engine = Engine.from_settings(settings)
            engine.load()
        return built[key]

    return get


def encoded(engine: Engine, prompt: str, **fields: Any) -> torch.Tensor:
    model = engine.registry.get(None)
    values = {"prompt": prompt, "seed": 1, "steps": STEPS, "width": SIZE, "height": SIZE, "guidance_scale": 1.0}
    request = engine.prepare(validate_request({**values, **fields}))
    with torch.no_grad():
        return model.family.encode(model, request).tensors["encoder_hidden_states"]


def fed_ids(engine: Engine, prompt: str, **fields: Any) -> dict[str, list[int]]:
    """The token ids each text encoder is given for `prompt` (its first call) as the family encodes it."""
    model = engine.registry.get(None)
    seen: dict[str, list[int]] = {}
    hooks = []
    for name in model.family.embedding_encoders:

        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], name: str = name) -> None:
            ids = args[0] if args else kwargs["input_ids"]
            seen.setdefault(name, ids[0].tolist())

        hooks.append(getattr(model.txt2img, name).register_forward_pre_hook(hook, with_kwargs=True))
    try:
        encoded(engine, prompt, **fields)
    finally:
        for handle in hooks:
            handle.remove()
    return seen


def token_ids(model: LoadedPipelines, tokens: list[str], encoder: str = "text_encoder") -> list[int]:
    ids: list[int] = getattr(model.txt2img, encoder.replace("text_encoder", "tokenizer")).convert_tokens_to_ids(tokens)
    return ids


def follows(found: list[int], ids: list[int]) -> bool:
    """`ids` appear in `found` one after the other."""
    return any(found[start : start + len(ids)] == ids for start in range(len(found)))


def test_every_file_format_loads_and_the_others_are_skipped_with_the_reason(
    engines: EngineFactory, tiny_model: Path, embeddings_dir: Path
) -> None:
    found = engines(tiny_model, embeddings_dir).registry.get(None).embeddings
    assert set(found.loaded) == {"CharTurner", "flat", "concept", "legacy"}
    assert (found.loaded["CharTurner"].vectors, found.loaded["CharTurner"].step) == (3, 1000)
    skipped = {name: skip.reason for name, skip in found.skipped.items()}
    assert set(skipped) == {"xlstyle", "v2style", "wide", "broken", "evil"}
    assert skipped["v2style"] == "it is for another architecture (64-wide, this model needs 32)"
    assert "refused" in skipped["evil"] and "posix.system" in skipped["evil"]
    assert skipped["wide"] == "it is for another architecture (65-wide, this model needs 32)"
    assert skipped["xlstyle"] == "it is for another architecture (32+64-wide, this model needs 32)"
    assert "cannot be read" in skipped["broken"]


def test_the_vectors_go_into_the_text_encoder_shared_by_every_pipeline(
    engines: EngineFactory, tiny_model: Path, embeddings_dir: Path
) -> None:
    model = engines(tiny_model, embeddings_dir).registry.get(None)
    pipe = model.txt2img
    for other in (model.img2img, model.inpaint):  # loaded once, on the parts the three pipelines share
        assert other.tokenizer is pipe.tokenizer and other.text_encoder is pipe.text_encoder
    vectors = torch.load(embeddings_dir / "CharTurner.pt", weights_only=True)["string_to_param"]["*"]
    table = pipe.text_encoder.get_input_embeddings().weight
    ids = pipe.tokenizer.convert_tokens_to_ids(["charturner", "charturner_1", "charturner_2"])
    assert torch.equal(table[ids], vectors)


def test_a_name_brings_in_all_its_vectors_in_any_case(
    engines: EngineFactory, tiny_model: Path, embeddings_dir: Path
) -> None:
    engine = engines(tiny_model, embeddings_dir)
    ids = token_ids(engine.registry.get(None), ["charturner", "charturner_1", "charturner_2"])
    for prompt in ("a CharTurner, b", "a charturner, b", "a CHARTURNER, b"):
        for fields in ({}, {"clip_skip": 2}):  # diffusers' encode_prompt, and our own CLIP-skip path
            assert follows(fed_ids(engine, prompt, **fields)["text_encoder"], ids), (prompt, fields)


def test_a_named_embedding_changes_the_conditioning_and_other_words_do_not(
    engines: EngineFactory, tiny_model: Path, embeddings_dir: Path
) -> None:
    with_embeddings, plain = engines(tiny_model, embeddings_dir), engines(tiny_model, None)
    for fields in ({}, {"clip_skip": 2}):  # diffusers' encode_prompt, and our own CLIP-skip path
        named = encoded(with_embeddings, "a CharTurner portrait", **fields)
        assert not torch.allclose(named, encoded(plain, "a CharTurner portrait", **fields))
        assert torch.equal(named, encoded(with_embeddings, "a charturner portrait", **fields))
        assert torch.equal(encoded(with_embeddings, "a red circle", **fields), encoded(plain, "a red circle", **fields))
    negative = encoded(with_embeddings, "a red circle", negative_prompt="flat", guidance_scale=7.0)
    assert not torch.allclose(negative, encoded(plain, "a red circle", negative_prompt="flat", guidance_scale=7.0))


def test_sdxl_takes_both_parts_of_its_files_and_skips_sd1_files(
    engines: EngineFactory, arch_model: ArchModels, embeddings_dir: Path
) -> None:
    folder = arch_model("sdxl").folder
    engine = engines(folder, embeddings_dir)
    model = engine.registry.get(None)
    assert set(model.embeddings.loaded) == {"xlstyle"}
    assert model.embeddings.skipped["flat"].reason == "it is for another architecture (32-wide, this model needs 32+64)"
    parts = load_file(embeddings_dir / "xlstyle.safetensors")
    fed = fed_ids(engine, "an XLStyle house")
    for encoder, key in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g")):
        ids = token_ids(model, ["xlstyle", "xlstyle_1"], encoder)
        assert torch.equal(getattr(model.txt2img, encoder).get_input_embeddings().weight[ids], parts[key])
        assert follows(fed[encoder], ids)
    plain = engines(folder, None)
    assert not torch.allclose(encoded(engine, "an xlstyle house"), encoded(plain, "an xlstyle house"))
    assert torch.equal(encoded(engine, "a house"), encoded(plain, "a house"))


def test_sd2_takes_its_own_width(engines: EngineFactory, arch_model: ArchModels, embeddings_dir: Path) -> None:
    found = engines(arch_model("sd2").folder, embeddings_dir).registry.get(None).embeddings
    assert set(found.loaded) == {"v2style"}
    assert found.skipped["flat"].reason == "it is for another architecture (32-wide, this model needs 64)"


def test_flow_models_take_no_embeddings(embeddings_dir: Path) -> None:
    flux = next(family for family in all_families() if family.name == "flux")
    found = load_embeddings(flux, None, embeddings_dir)  # never touches the pipeline
    assert not found.loaded
    assert found.skipped["flat"].reason == "flux models take no textual-inversion embeddings"


def test_the_image_parameters_carry_ti_hashes(engines: EngineFactory, tiny_model: Path, embeddings_dir: Path) -> None:
    engine = engines(tiny_model, embeddings_dir)
    fields = {"seed": 3, "steps": STEPS, "width": SIZE, "height": SIZE}
    request = validate_request({"prompt": "a charturner, wide", "negative_prompt": "flat, blurry", **fields})
    image = engine.run([request], lambda *_: None)[0][0].image

    def short(name: str) -> str:
        return hashlib.sha256((embeddings_dir / name).read_bytes()).hexdigest()[:12]

    expected = f"CharTurner: {short('CharTurner.pt')}, flat: {short('flat.safetensors')}"  # not "wide": skipped
    assert parse_infotext(image.info["parameters"])["TI hashes"] == expected
    assert (params_of(image) or {})["ti_hashes"] == expected
    plain = engine.run([validate_request({"prompt": "a red circle", **fields})], lambda *_: None)[0][0].image
    assert "TI hashes" not in plain.info["parameters"]


def test_notes_name_the_skipped_embeddings_a_prompt_uses(
    engines: EngineFactory, tiny_model: Path, embeddings_dir: Path
) -> None:
    engine = engines(tiny_model, embeddings_dir)
    notes = engine.embedding_notes(
        validate_request({"prompt": "a Wide shot of flat land", "negative_prompt": "xlstyle"})
    )
    assert notes == [
        "embedding 'wide' was not used: it is for another architecture (65-wide, this model needs 32)",
        "embedding 'xlstyle' was not used: it is for another architecture (32+64-wide, this model needs 32)",
    ]
    assert engine.embedding_notes(validate_request({"prompt": "a charturner and a zebra"})) == []  # plain words


def test_a_skipped_name_inside_a_loaded_one_is_not_noted() -> None:
    info = EmbeddingInfo(name="flatcolor", file="flatcolor.pt", vectors=1, widths=(32,), sha256="0" * 64)
    found = EmbeddingSet(loaded={"flatcolor": info}, skipped={"flat": Skipped("it is for another architecture")})
    assert found.notes("a FlatColor house") == []
    assert found.notes("a flat color") == ["embedding 'flat' was not used: it is for another architecture"]


def test_an_offloaded_model_takes_new_files_only_when_it_loads_again(
    engines: EngineFactory, tiny_model: Path, embeddings_dir: Path, tmp_path: Path
) -> None:
    model = engines(tiny_model, embeddings_dir).registry.get(None)
    make_tiny_embedding(tmp_path / "newer.pt", text_widths(tiny_model)[0], seed=9)
    found = load_embeddings(model.family, model.txt2img, tmp_path, model.embeddings, offloaded=True)
    assert found.loaded == model.embeddings.loaded  # what was registered stays
    assert "added after the model loaded" in found.skipped["newer"].reason
    assert "newer" not in model.txt2img.tokenizer.get_vocab()


def test_a_failed_registration_skips_them_and_the_model_still_serves(
    tiny_model: Path, embeddings_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("out of memory (injected)")

    monkeypatch.setattr(StableDiffusionPipeline, "load_textual_inversion", refuse)
    model = load_pipelines(
        str(tiny_model), device=torch.device("cpu"), dtype=torch.float32, embeddings_dir=str(embeddings_dir)
    )
    assert model.embeddings.loaded == {}
    assert model.embeddings.skipped["flat"].reason == "registering it failed (RuntimeError: out of memory (injected))"
