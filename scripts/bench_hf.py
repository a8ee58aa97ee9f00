#!/usr/bin/env python3
"""HF transformers CPU baseline for the engine benchmark.

Measures (median over --repeats after one warm-up, time.perf_counter):
  prefill_tok_s        one forward of [1, P] ids with use_cache=True (logits of the
                       last position only, as generate() does)               -> P / t
  single_decode_tok_s  after an untimed [1, P] prefill, D greedy decode steps
                       fed back through past_key_values                     -> D / t
  batch_decode_tok_s   untimed [B, P] prefill, then D decode steps on [B, 1] -> B*D / t

Prints ONE line of JSON on stdout; everything else goes to stderr.
Example:
  .venv/bin/python scripts/bench_hf.py --model tests/fixtures/llama --threads 2
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
import time

from hf_baseline import log, prompt_sampler


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF model directory")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16", "f16"])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    P, D, B, R = args.prompt_len, args.decode_steps, args.batch, args.repeats

    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[args.dtype]
    device = torch.device(args.device)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()

    def sync():
        """Waits for queued GPU work, so that wall-clock times cover it."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    # transformers >= 5.2x renamed the forward kwarg / output field `past_key_values` -> `cache`.
    fwd_params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in fwd_params else "past_key_values"
    # Like generate(): only compute the logits of the last position (when supported).
    extra = {"logits_to_keep": 1} if "logits_to_keep" in fwd_params else {}
    cfg = model.config
    max_pos = getattr(cfg, "max_position_embeddings", None)
    if max_pos is not None and P + D > max_pos:
        log(f"warning: prompt_len + decode_steps = {P + D} > max_position_embeddings = {max_pos}")

    rand_ids = prompt_sampler(cfg, args.seed)

    prompt_1 = rand_ids(1, P).to(device)
    prompt_b = rand_ids(B, P).to(device)

    def prefill(ids):
        return model(input_ids=ids, use_cache=True, **extra)

    def decode(ids, steps):
        """Untimed prefill, then `steps` timed greedy decode steps. Returns seconds."""
        out = prefill(ids)
        past = getattr(out, cache_kw)
        nxt = out.logits[:, -1:].argmax(-1)
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            out = model(input_ids=nxt, use_cache=True, **{cache_kw: past}, **extra)
            past = getattr(out, cache_kw)
            nxt = out.logits[:, -1:].argmax(-1)
        sync()
        return time.perf_counter() - t0

    def time_prefill():
        sync()
        t0 = time.perf_counter()
        prefill(prompt_1)
        sync()
        return time.perf_counter() - t0

    def median_time(fn):
        fn()  # warm-up
        ts = [fn() for _ in range(R)]
        return statistics.median(ts), ts

    with torch.inference_mode():
        t_pre, ts = median_time(time_prefill)
        log(f"prefill [1,{P}]: {['%.4f' % t for t in ts]} s")
        t_dec, ts = median_time(lambda: decode(prompt_1, D))
        log(f"decode [1,1] x {D}: {['%.4f' % t for t in ts]} s")
        t_bdec, ts = median_time(lambda: decode(prompt_b, D))
        log(f"decode [{B},1] x {D}: {['%.4f' % t for t in ts]} s")

    result = {
        "engine": "hf-transformers",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": args.threads,
        "device": args.device,
        "dtype": args.dtype,
        "prompt_len": P,
        "decode_steps": D,
        "batch": B,
        "prefill_tok_s": round(P / t_pre, 2),
        "single_decode_tok_s": round(D / t_dec, 2),
        "batch_decode_tok_s": round(B * D / t_bdec, 2),
    }
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
