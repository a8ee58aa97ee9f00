#!/usr/bin/env python3
"""HF transformers `generate` baseline for `openinfer bench --hf-baseline`.

For each batch size B in --batches, on random prompts of --prompt-len token ids:
  e2e_ms       wall time of model.generate on [B, P] with exactly --output-len new tokens
               (greedy, min_new_tokens = max_new_tokens, KV cache): every request of a
               static batch finishes together, so this is each request's end-to-end latency
  ttft_ms      wall time of the same generate with max_new_tokens = 1 (prefill + one token)
  output_tok_s B * output_len / (e2e_ms / 1000)
each the median of --repeats after one warm-up generate.

Prints ONE line of JSON on stdout; everything else goes to stderr.
Example:
  .venv/bin/python scripts/bench_hf_generate.py --model target/openinfer-models/small \\
      --prompt-len 128 --output-len 64 --batches 1,2,4,8,16,32 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from hf_baseline import log, prompt_sampler


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF model directory")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--batches", default="1,2,4,8,16,32", help="comma-separated batch sizes")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    P, O = args.prompt_len, args.output_len
    batches = [int(b) for b in args.batches.split(",") if b.strip()]

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    cfg = model.config
    eos = getattr(cfg, "eos_token_id", None)
    pad = getattr(cfg, "pad_token_id", None)
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else (eos if eos is not None else 0)
    rand_ids = prompt_sampler(cfg, args.seed)

    def generate(ids: torch.Tensor, new: int) -> float:
        t0 = time.perf_counter()
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=pad,
        )
        elapsed = time.perf_counter() - t0
        assert out.shape[1] == ids.shape[1] + new, out.shape
        return elapsed

    rows = []
    with torch.inference_mode():
        warm = rand_ids(1, P)
        generate(warm, min(O, 8))
        for b in batches:
            ids = rand_ids(b, P)
            ttft = statistics.median(generate(ids, 1) for _ in range(args.repeats))
            e2e = statistics.median(generate(ids, O) for _ in range(args.repeats))
            rows.append(
                {
                    "batch": b,
                    "ttft_ms": round(ttft * 1e3, 2),
                    "e2e_ms": round(e2e * 1e3, 2),
                    "output_tok_s": round(b * O / e2e, 2),
                }
            )
            log(f"batch {b}: ttft {ttft * 1e3:.1f} ms, e2e {e2e * 1e3:.1f} ms, {b * O / e2e:.1f} tok/s")

    result = {
        "engine": "hf-transformers generate",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": args.threads,
        "prompt_len": P,
        "output_len": O,
        "batches": rows,
    }
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
