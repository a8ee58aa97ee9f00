"""What the HF transformers baselines (bench_hf.py, bench_hf_generate.py) share: an offline,
quiet environment, logging to stderr, and random prompt ids that avoid special tokens."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def special_ids(cfg) -> set:
    """bos / eos / pad ids of a model config."""
    special = set()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = getattr(cfg, key, None)
        special.update(v if isinstance(v, list) else ([v] if v is not None else []))
    return special


def prompt_sampler(cfg, seed: int):
    """rand_ids(batch, length): random prompt ids, avoiding special ids (the fixtures put
    specials at the low ids, so ids < 16 are skipped too)."""
    import torch

    special = special_ids(cfg)
    vocab = cfg.vocab_size
    lo = min(16, vocab // 4)
    allowed = torch.tensor([i for i in range(lo, vocab) if i not in special], dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)

    def rand_ids(b: int, n: int):
        return allowed[torch.randint(len(allowed), (b, n), generator=gen)]

    return rand_ids
