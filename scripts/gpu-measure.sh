#!/usr/bin/env bash
# The GPU figures of issue 6, on a GPU host with the binary from scripts/build-cuda.sh (no
# Rust toolchain needed there) and a Python with torch + transformers:
#   1. parity: the committed HF references on `cuda`, in f32 (every token) and bf16
#      (teacher-forced: log-probability bound and top-token agreement at every step), with
#      `openinfer parity`;
#   2. decode speed of the `llama3-8b` preset in bf16 at batch 1 and 32, beside HF
#      transformers on the same GPU in the same run and beside the copy-bandwidth limit,
#      with `openinfer bench-engine`.
# Results under target/gpu/. Usage:
#   scripts/gpu-measure.sh [BINARY] [PYTHON]
#   (defaults: target/cuda/release/openinfer, python3)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BIN="${1:-target/cuda/release/openinfer}"
PY="${2:-python3}"
OUT=target/gpu
mkdir -p "$OUT"
# The CUDA and NCCL libraries of the Python environment (pip's nvidia-* wheels).
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
for d in "$SITE"/nvidia/*/lib; do
    [ -d "$d" ] && LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
export LD_LIBRARY_PATH
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

"$BIN" parity --device cuda --dtype f32 --out "$OUT/parity-f32"
"$BIN" parity --device cuda --dtype bf16 --out "$OUT/parity-bf16"

# "decode, 1 sequence" is batch 1; "decode, batch" is batch 32.
"$BIN" bench-engine --preset llama3-8b --cache-dir "$OUT/models" --device cuda --dtype bf16 \
    --batch 32 --repeats 3 --python "$(command -v "$PY")" --out "$OUT/bench-engine"
echo "results under $OUT"
