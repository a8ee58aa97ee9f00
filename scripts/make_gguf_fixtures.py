#!/usr/bin/env python3
"""Convert fixture models to GGUF with llama.cpp's own converter (convert_hf_to_gguf.py).

Writes tests/fixtures/gguf/<model>.gguf (f32 tensors, so the engine's greedy tokens can be held
to the same transformers references as the safetensors directories).

The converter comes from the llama.cpp sources vendored in PyPI's llama-cpp-python sdist
(pinned below), downloaded into target/llama-cpp-src the first time. It needs torch and
sentencepiece: run it with the reference venv:

    scripts/setup-reference-venv.sh
    .venv/bin/python scripts/make_gguf_fixtures.py

The fixtures' tokenizers are trained for the tests, so the converter cannot recognise their
pre-tokenizer by its hash of a probe text; the script tells it the name it would give the real
family (the split pattern is the family's). Everything else is the converter as shipped.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tarfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
OUT = FIXTURES / "gguf"
SRC = ROOT / "target" / "llama-cpp-src"
SDIST_VERSION = "0.3.36"
SDIST_URL = (
    "https://pypi.org/packages/ec/e9/e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/"
    f"llama_cpp_python-{SDIST_VERSION}.tar.gz"
)
# The llama.cpp pre-tokenizer name of each fixture's family (`llama2` has a SentencePiece
# `tokenizer.model`, which the converter reads without one).
PRE = {"llama": "gpt-2", "llama2": "default", "llama3.2": "llama-bpe", "mistral": "gpt-2",
       "qwen2": "qwen2", "qwen3": "qwen2"}


def llama_cpp_dir() -> Path:
    root = SRC / f"llama_cpp_python-{SDIST_VERSION}" / "vendor" / "llama.cpp"
    if root.exists():
        return root
    SRC.mkdir(parents=True, exist_ok=True)
    archive = SRC / "sdist.tar.gz"
    print(f"downloading {SDIST_URL}", file=sys.stderr)
    urllib.request.urlretrieve(SDIST_URL, archive)
    with tarfile.open(archive) as tar:
        tar.extractall(SRC, filter="data")
    return root


def main() -> None:
    src = llama_cpp_dir()
    sys.path[:0] = [str(src / "gguf-py"), str(src)]
    import convert_hf_to_gguf  # noqa: E402
    from conversion import base  # noqa: E402

    OUT.mkdir(parents=True, exist_ok=True)
    names = sys.argv[1:] or list(PRE)
    sums = {}
    for name in names:
        base.TextModel.get_vocab_base_pre = lambda self, tokenizer, pre=PRE[name]: pre
        out = OUT / f"{name}.gguf"
        sys.argv = ["convert_hf_to_gguf.py", str(FIXTURES / name), "--outfile", str(out),
                    "--outtype", "f32"]
        convert_hf_to_gguf.main()
        sums[name] = hashlib.sha256(out.read_bytes()).hexdigest()[:16]
        print(f"{name}: {out.stat().st_size} bytes, sha256 {sums[name]}", file=sys.stderr)
    print(json.dumps(sums, indent=1))


if __name__ == "__main__":
    main()
