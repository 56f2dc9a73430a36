"""Write CLIP's BPE tokenizer files (vocab.json, merges.txt) from OpenAI's `bpe_simple_vocab_16e6.txt.gz`.

That file ships in the PyPI packages `open-clip-torch` and `openai-clip`; the hub being out of reach,
this is how the tokenizer under `src/sdserver/assets/architectures/clip-tokenizer` was made:

    pip download open-clip-torch --no-deps -d /tmp/oc && unzip -o /tmp/oc/*.whl 'open_clip/*.gz' -d /tmp/oc
    python scripts/build_clip_vocab.py /tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz src/sdserver/assets/architectures/clip-tokenizer

The ids are those of `openai/clip-vit-large-patch14` (49,408 tokens), built as CLIP's SimpleTokenizer builds them.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

from sdserver.engine.tiny import byte_symbols

MERGES = 49152 - 256 - 2  # CLIP keeps this many merges; the rest of the file is unused


def clip_base_symbols() -> list[str]:
    """The 256 byte symbols in CLIP's order: the printable ones first, then the remapped ones."""
    symbols = byte_symbols()
    return [s for s in symbols if ord(s) < 256] + [s for s in symbols if ord(s) >= 256]


def build(source: Path, out: Path) -> None:
    lines = gzip.decompress(source.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : MERGES + 1]]
    base = clip_base_symbols()
    tokens = base + [s + "</w>" for s in base] + ["".join(pair) for pair in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    out.mkdir(parents=True, exist_ok=True)
    vocab = {token: index for index, token in enumerate(tokens)}
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    body = "\n".join(" ".join(pair) for pair in merges)
    (out / "merges.txt").write_text("#version: 0.2\n" + body + "\n", encoding="utf-8")


if __name__ == "__main__":
    build(Path(sys.argv[1]), Path(sys.argv[2]))
