#!/usr/bin/env bash
# Re-measures the load-benchmark figures of docs/performance.md ("Load benchmark"), each with
# `openinfer bench`, into target/bench-serving/:
#   vs-hf/        the `small` preset served on CPU, concurrency 1..32, beside HF transformers
#                 `generate` at the same batch sizes, in the same run
#   scaling-N/    a router in front of N = 1, 2, 4 sim workers, every slot busy
#   overload-*/   one sim worker offered 10x its capacity: unloaded priority-5 baseline, then
#                 priority 5 at a fifth of capacity (three rounds on one router; once more
#                 without preemption), then the 0:80,5:20 mix
#   deadlines*/   one sim worker offered 10x its capacity for 30 s, every request with a 5 s
#                 deadline; then the same with deadline admission off
#   tenants/      two tenants at one priority on one sim worker, `heavy` at 10x its capacity
#                 and `light` at a fifth: light alone, beside heavy with fair shares, and
#                 beside heavy first come, first served
# Usage: scripts/bench-serving.sh [vs-hf|scaling|overload|deadlines|tenants]...   (default: all)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT=target/bench-serving
BIN=target/release/openinfer
cargo build --release -p openinfer-cli
mkdir -p "$OUT"

vs_hf() {
    [ -x .venv/bin/python ] || scripts/setup-reference-venv.sh
    [ -f target/openinfer-models/small/config.json ] ||
        "$BIN" make-model --preset small --out target/openinfer-models/small
    "$BIN" bench --spawn --model target/openinfer-models/small --sweep --hf-baseline \
        --num-requests 128 --input-len 64 --output-len 64 --out "$OUT/vs-hf"
}

scaling() {
    for n in 1 2 4; do
        c=$((n * 32))
        "$BIN" bench --spawn-sim-workers "$n" --concurrency "$c" --num-requests $((c * 16)) \
            --input-len 32 --output-len 32 --out "$OUT/scaling-$n"
    done
}

overload() {
    # One sim worker: 32 slots, 32 tokens of 20 ms: 50 requests/s.
    local sim=(--spawn-sim-workers 1 --input-len 32 --output-len 32)
    "$BIN" bench "${sim[@]}" --rate 10 --priority-mix 5:100 --num-requests 150 \
        --out "$OUT/overload-unloaded"
    # Three rounds on the same router: its memory after each shows whether it stays bounded.
    "$BIN" bench "${sim[@]}" --rate 500,500,500 --priority-mix 0:98,5:2 --num-requests 5000 \
        --out "$OUT/overload-10x"
    OPENINFER_PREEMPTION=false "$BIN" bench "${sim[@]}" --rate 500 --priority-mix 0:98,5:2 \
        --num-requests 5000 --out "$OUT/overload-10x-no-preemption"
    "$BIN" bench "${sim[@]}" --rate 500 --priority-mix 0:80,5:20 --num-requests 5000 \
        --out "$OUT/overload-10x-mix-80-20"
}

deadlines() {
    # One sim worker: 32 slots, 100 tokens of 20 ms (101 steps with the prompt's): 16
    # requests/s. Offered 160/s for 30 s, each request with a 5 s grpc-timeout.
    local sim=(--spawn-sim-workers 1 --input-len 16 --output-len 100 --rate 160
        --num-requests 4800 --deadline 5s)
    "$BIN" bench "${sim[@]}" --out "$OUT/deadlines"
    OPENINFER_DEADLINE_ADMISSION=false "$BIN" bench "${sim[@]}" --out "$OUT/deadlines-off"
}

tenants() {
    # One sim worker: 8 slots, 4 tokens of 50 ms (5 steps with the prompt's): 40 requests/s.
    # Heavy offers 400/s, light 8/s (120 requests: 15 s a phase); a level holds at most 400
    # requests (10 s of capacity), so that first come, first served waits are bounded.
    OPENINFER_MAX_QUEUE_PER_PRIORITY=400 "$BIN" bench --spawn-sim-workers 1 \
        --sim-max-running 8 --sim-step-time 50ms --input-len 8 --output-len 4 \
        --num-requests 120 --tenant-mix heavy:10,light:0.2 --out "$OUT/tenants"
}

for what in "${@:-vs-hf scaling overload deadlines tenants}"; do
    for w in $what; do
        case "$w" in
            vs-hf) vs_hf ;;
            scaling) scaling ;;
            overload) overload ;;
            deadlines) deadlines ;;
            tenants) tenants ;;
            *) echo "unknown figure set: $w (vs-hf, scaling, overload, deadlines, tenants)" >&2; exit 2 ;;
        esac
    done
done
echo "results under $OUT/*/bench.json"
