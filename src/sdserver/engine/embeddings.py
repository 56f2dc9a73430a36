"""Textual-inversion embeddings from `embeddings_dir`, used as AUTOMATIC1111 does: by file name in a prompt.

Every `.pt`, `.bin` and `.safetensors` file of the folder (and its subfolders) is read once per model
load: A1111's `.pt` (`string_to_param`), its `.safetensors` (`emb_params`; SDXL: `clip_l` + `clip_g`)
and diffusers' own `{token: tensor}`. A `.pt` goes through the weights-only unpickler (checkpoint.py).
Those that fit the model's text encoders are registered with diffusers' `load_textual_inversion` (SDXL:
once per encoder, each with its part); the others are kept as skipped, with the reason.

Tokens are the file's name in lower case (`name`, then `name_1`, ... for the further vectors). CLIP's
tokenizer matches added tokens in lower-cased text, but diffusers' `maybe_convert_prompt` (which expands
a multi-vector name into all its tokens) looks for the name as written, so the families pass prompts
through `EmbeddingSet.rewrite` first: every mention of a name, in any case, becomes its token.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from sdserver.core.errors import SDServerError
from sdserver.engine.checkpoint import _unpickle_weights

if TYPE_CHECKING:
    from sdserver.engine.families import Family

log = logging.getLogger(__name__)

SUFFIXES = (".pt", ".bin", ".safetensors")
MAX_FILE_BYTES = 32 * 2**20  # embeddings are KBs; past this it is something else (a model), not read
SHORT_HASH = 12  # A1111's `shorthash`: what its infotext's "TI hashes" and Civitai carry
# Older .pt files (the original textual-inversion code, early A1111) pickle `string_to_param` as a module:
# read into an inert stub, whose `_parameters` hold the tensors (never built, nothing of it runs).
PARAMETER_DICT = "torch.nn.modules.container.ParameterDict"


class EmbeddingError(ValueError):
    """A file that is not a readable embedding; the message says why (after "it ...")."""


@dataclass(frozen=True)
class EmbeddingInfo:
    """What is known of an embedding file, without its tensors."""

    name: str
    file: str  # the file's name
    vectors: int
    widths: tuple[int, ...]  # one per text encoder part: (768,) SD 1.x, (1024,) SD 2.x, (768, 1280) SDXL
    sha256: str
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None

    @property
    def shorthash(self) -> str:
        return self.sha256[:SHORT_HASH]

    def a1111(self) -> dict[str, Any]:
        """A1111's entry in /sdapi/v1/embeddings (`shape`: the widths added up, as A1111 reports SDXL's)."""
        return {
            "step": self.step,
            "sd_checkpoint": self.sd_checkpoint,
            "sd_checkpoint_name": self.sd_checkpoint_name,
            "shape": sum(self.widths),
            "vectors": self.vectors,
        }


@dataclass(frozen=True)
class EmbeddingFile:
    info: EmbeddingInfo
    parts: tuple[torch.Tensor, ...]  # [vectors, width] each, in the order of the family's encoders

    @property
    def tokens(self) -> list[str]:
        token = self.info.name.lower()
        return [token] + [f"{token}_{index}" for index in range(1, self.info.vectors)]


@dataclass(frozen=True)
class Skipped:
    reason: str  # reads after "was not used: "
    info: EmbeddingInfo | None = None  # None: the file could not be read


@dataclass
class EmbeddingSet:
    """The embeddings of one loaded model: those registered with its text encoders, and the others."""

    loaded: dict[str, EmbeddingInfo] = field(default_factory=dict)
    skipped: dict[str, Skipped] = field(default_factory=dict)

    @cached_property
    def _loaded_pattern(self) -> re.Pattern[str] | None:
        return _pattern(self.loaded)

    @cached_property
    def _skipped_pattern(self) -> re.Pattern[str] | None:
        return _pattern(self.skipped)

    def rewrite(self, text: str) -> str:
        """`text` with every mention of a loaded embedding, in any case, as its token (see the module doc)."""
        pattern = self._loaded_pattern
        if pattern is None:
            return text
        return pattern.sub(lambda match: match.group(0).lower(), text)

    def used(self, *texts: str | None) -> dict[str, str]:
        """The loaded embeddings `texts` name, with their short hashes (A1111's "TI hashes")."""
        by_token = {name.lower(): name for name in self.loaded}
        names = _mentioned(self._loaded_pattern, texts)
        return {by_token[token]: self.loaded[by_token[token]].shorthash for token in names}

    def notes(self, *texts: str | None) -> list[str]:
        """One line per skipped embedding that `texts` name (outside the names of loaded ones)."""
        loaded, by_token = self._loaded_pattern, {name.lower(): name for name in self.skipped}
        rest = tuple(loaded.sub(" ", text) if loaded is not None and text else text for text in texts)
        names = [by_token[token] for token in _mentioned(self._skipped_pattern, rest)]
        return [f"embedding {name!r} was not used: {self.skipped[name].reason}" for name in names]

    def a1111(self) -> dict[str, dict[str, dict[str, Any]]]:
        """A1111's /sdapi/v1/embeddings; a skipped entry also says why (`reason`)."""
        blank = dict.fromkeys(("step", "sd_checkpoint", "sd_checkpoint_name", "shape", "vectors"))
        return {
            "loaded": {name: info.a1111() for name, info in self.loaded.items()},
            "skipped": {
                name: {**(skip.info.a1111() if skip.info is not None else blank), "reason": skip.reason}
                for name, skip in self.skipped.items()
            },
        }


def _pattern(names: dict[str, Any]) -> re.Pattern[str] | None:
    """Any of `names`, ignoring case, the longest first (as the tokenizer matches added tokens: anywhere)."""
    if not names:
        return None
    return re.compile("|".join(re.escape(name) for name in sorted(names, key=len, reverse=True)), re.IGNORECASE)


def _mentioned(pattern: re.Pattern[str] | None, texts: tuple[str | None, ...]) -> list[str]:
    """The lower-cased names `pattern` finds in `texts`, each once, in order of first mention."""
    if pattern is None:
        return []
    found = [match.group(0).lower() for text in texts if text for match in pattern.finditer(text)]
    return list(dict.fromkeys(found))


# -- reading files ---------------------------------------------------------------------------------


def embedding_files(folder: Path) -> list[Path]:
    """The candidate files of `folder` and its subfolders, hidden ones left out, in name order."""
    if not folder.is_dir():
        return []
    found = [
        path
        for path in folder.rglob("*")
        if path.suffix.lower() in SUFFIXES
        and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    ]
    return sorted(found, key=lambda path: (path.name.lower(), str(path)))


def read_embedding(path: Path) -> EmbeddingFile:
    """One embedding file; EmbeddingError (with the reason) for anything else."""
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise EmbeddingError(f"it is {size / 2**20:.0f} MB, too large for an embedding (a model?)")
    data = _read(path)
    parts, meta = _parts(data)
    rows = {int(part.shape[0]) for part in parts}
    if len(rows) != 1:
        raise EmbeddingError(f"its parts have different numbers of vectors ({sorted(rows)})")
    info = EmbeddingInfo(
        name=path.stem,
        file=path.name,
        vectors=rows.pop(),
        widths=tuple(int(part.shape[1]) for part in parts),
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        step=meta.get("step") if isinstance(meta.get("step"), int) else None,
        sd_checkpoint=meta.get("sd_checkpoint") if isinstance(meta.get("sd_checkpoint"), str) else None,
        sd_checkpoint_name=meta.get("sd_checkpoint_name") if isinstance(meta.get("sd_checkpoint_name"), str) else None,
    )
    return EmbeddingFile(info, parts)


def _read(path: Path) -> dict[str, Any]:
    if path.suffix.lower() == ".safetensors":
        try:
            return dict(load_file(str(path), device="cpu"))
        except (SafetensorError, OSError) as exc:
            raise EmbeddingError(f"it is not a valid .safetensors file ({exc})") from None
    try:
        data = _unpickle_weights(path, inert=[PARAMETER_DICT])
    except SDServerError as exc:  # a refused pickle included
        raise EmbeddingError(f"it cannot be read: {exc.message}") from None
    if not isinstance(data, dict):
        raise EmbeddingError(f"it holds a {type(data).__name__}, not an embedding")
    return data


def _parts(data: dict[str, Any]) -> tuple[tuple[torch.Tensor, ...], dict[str, Any]]:
    """The tensors (one per text encoder) and A1111's metadata of a file's contents."""
    if "string_to_param" in data:  # A1111 .pt
        params = data["string_to_param"]
        state = getattr(params, "state", None)  # an older file's ParameterDict (see PARAMETER_DICT)
        params = state.get("_parameters") if isinstance(state, dict) else params
        if not isinstance(params, dict) or len(params) != 1:
            raise EmbeddingError("its string_to_param is not a single term")
        return (_matrix(next(iter(params.values())), "string_to_param"),), data
    if "clip_l" in data and "clip_g" in data:  # SDXL: CLIP-L for text_encoder, OpenCLIP-G for text_encoder_2
        return (_matrix(data["clip_l"], "clip_l"), _matrix(data["clip_g"], "clip_g")), {}
    if "emb_params" in data:  # A1111 / kohya .safetensors for SD 1.x and 2.x
        return (_matrix(data["emb_params"], "emb_params"),), {}
    tensors = [value for value in data.values() if isinstance(value, torch.Tensor)]
    if len(data) == 1 and len(tensors) == 1:  # diffusers: {token: tensor}
        return (_matrix(tensors[0], "its tensor"),), {}
    raise EmbeddingError("it is not a textual-inversion embedding (no string_to_param, emb_params or clip_l/clip_g)")


def _matrix(value: Any, what: str) -> torch.Tensor:
    """[vectors, width] in float32 (a single vector may be stored 1-D)."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise EmbeddingError(f"its {what} is not a tensor of floats")
    matrix = value.detach().to(torch.float32)
    matrix = matrix.unsqueeze(0) if matrix.ndim == 1 else matrix
    if matrix.ndim != 2 or matrix.shape[0] == 0:
        raise EmbeddingError(f"its {what} has shape {list(value.shape)}, not [vectors, width]")
    return matrix


def scan(folder: Path) -> tuple[list[EmbeddingFile], dict[str, Skipped]]:
    """Every embedding of `folder`, and the files that are none (by name, with the reason). Of two files
    with one name (in any case), the first in name order counts."""
    files: list[EmbeddingFile] = []
    unreadable: dict[str, Skipped] = {}
    seen: dict[str, Path] = {}
    for path in embedding_files(folder):
        first = seen.setdefault(path.stem.lower(), path)
        if first != path:
            log.warning("embeddings: %s ignored, %s has the same name", path, first)
            continue
        try:
            files.append(read_embedding(path))
        except (EmbeddingError, OSError) as exc:
            log.warning("embeddings: skipping %s: %s", path.name, exc)
            unreadable[path.stem] = Skipped(str(exc))
    return files, unreadable


def listing(folder: str | Path | None, reason: str) -> EmbeddingSet:
    """The folder's embeddings, all skipped for `reason` (a model that is not loaded matches none yet)."""
    if folder is None:
        return EmbeddingSet()
    files, unreadable = scan(Path(folder).expanduser())
    return EmbeddingSet(skipped={**{f.info.name: Skipped(reason, f.info) for f in files}, **unreadable})


# -- registering with a model ----------------------------------------------------------------------


def load_embeddings(
    family: Family, pipe: Any, folder: str | Path | None, known: EmbeddingSet | None = None, *, offloaded: bool = False
) -> EmbeddingSet:
    """Register the folder's embeddings that fit `pipe`'s text encoders (the family's
    `embedding_encoders`); the pipelines built from `pipe` share its tokenizers and encoders.
    A refresh passes `known` (what the model registered before): those stay registered, and only new
    names are added; an `offloaded` model takes none then (registering would undo its offload hooks)."""
    if folder is None:
        return known or EmbeddingSet()
    files, unreadable = scan(Path(folder).expanduser())
    found = EmbeddingSet(loaded=dict(known.loaded) if known is not None else {}, skipped=dict(unreadable))
    files = [file for file in files if file.info.name not in found.loaded]
    unusable = _unusable(family, offloaded and known is not None)
    if unusable is not None:
        if files:
            log.info("embeddings: %d not used, %s", len(files), unusable)
        found.skipped.update({file.info.name: Skipped(unusable, file.info) for file in files})
        return found
    widths = tuple(
        int(getattr(pipe, encoder).get_input_embeddings().weight.shape[-1]) for encoder in family.embedding_encoders
    )
    vocabularies = [set(_tokenizer(pipe, encoder).get_vocab()) for encoder in family.embedding_encoders]
    accepted: list[EmbeddingFile] = []
    for file in files:
        reason = _misfit(file, widths, vocabularies)
        if reason is not None:
            log.warning("embeddings: skipping %s: %s", file.info.file, reason)
            found.skipped[file.info.name] = Skipped(reason, file.info)
            continue
        for vocabulary in vocabularies:
            vocabulary.update(file.tokens)  # a later file may not take these tokens
        accepted.append(file)
    _register(pipe, family.embedding_encoders, accepted, found)
    if accepted:
        log.info(
            "embeddings: registered %s",
            ", ".join(file.info.name for file in accepted if file.info.name in found.loaded),
        )
    return found


def _unusable(family: Family, offloaded_refresh: bool) -> str | None:
    """Why no embedding can be registered now (None: they can)."""
    if not family.embedding_encoders:
        return f"{family.name} models take no textual-inversion embeddings"
    if offloaded_refresh:
        return "it was added after the model loaded, and an offloaded model takes new ones only when it loads again"
    return None


def _misfit(file: EmbeddingFile, widths: tuple[int, ...], vocabularies: list[set[str]]) -> str | None:
    """Why `file` cannot be registered with encoders of `widths` (None: it fits)."""
    if file.info.widths != widths:
        found, needed = _widths(file.info.widths), _widths(widths)
        return f"it is for another architecture ({found}-wide, this model needs {needed})"
    # `name_1` taken by another would also be read as this one's second vector (diffusers' expansion)
    tokens = [*file.tokens, f"{file.tokens[0]}_1"]
    taken = [token for token in tokens if any(token in vocabulary for vocabulary in vocabularies)]
    if taken:
        return f"its token {taken[0]!r} is already a word of this model's tokenizer or another embedding's"
    return None


def _widths(widths: tuple[int, ...]) -> str:
    return "+".join(str(width) for width in widths)


def _tokenizer(pipe: Any, encoder: str) -> Any:
    return getattr(pipe, encoder.replace("text_encoder", "tokenizer"))


def _register(pipe: Any, encoders: tuple[str, ...], files: list[EmbeddingFile], found: EmbeddingSet) -> None:
    """One `load_textual_inversion` per encoder for all `files` (one resize of the token table each)."""
    if not files:
        return
    names = [file.info.name.lower() for file in files]
    tokens = [token for file in files for token in file.tokens]
    done: list[str] = []
    try:
        for index, encoder in enumerate(encoders):
            tokenizer, text_encoder = _tokenizer(pipe, encoder), getattr(pipe, encoder)
            # Grown here first, so diffusers' own resize to the same size is a no-op: transformers' default
            # would fill the new rows from the old table's covariance (seconds on a CPU, the global RNG),
            # only for them to be overwritten.
            text_encoder.resize_token_embeddings(len(tokenizer) + len(tokens), mean_resizing=False)
            pipe.load_textual_inversion(
                [file.parts[index] for file in files],
                token=names,
                tokenizer=tokenizer,
                text_encoder=text_encoder,
            )
            done.append(encoder)
    except Exception as exc:  # diffusers raises ValueError and others; checked above, so unexpected
        log.exception("embeddings: registering %d embeddings failed; none is used", len(files))
        for encoder in done:
            with contextlib.suppress(Exception):  # best effort: what is left of them is never named
                pipe.unload_textual_inversion(
                    tokens, tokenizer=_tokenizer(pipe, encoder), text_encoder=getattr(pipe, encoder)
                )
        reason = f"registering it failed ({type(exc).__name__}: {exc})".splitlines()[0]
        found.skipped.update({file.info.name: Skipped(reason, file.info) for file in files})
        return
    found.loaded.update({file.info.name: file.info for file in files})
