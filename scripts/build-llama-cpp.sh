#!/usr/bin/env bash
# Builds llama.cpp's CPU benchmarks (the peer `openinfer bench-engine --llama-cpp` runs beside
# the engine) from the sources vendored in PyPI's llama-cpp-python sdist, pinned below: the same
# tree `scripts/make_gguf_fixtures.py` converts fixtures with.
#
#   scripts/build-llama-cpp.sh            # prints the bin directory on its last line
#
# Puts the binaries in target/llama.cpp/build/bin (llama-bench, llama-batched-bench,
# llama-quantize, llama-perplexity). cmake comes from PyPI into target/llama.cpp/venv. About
# 20 minutes on 2 cores the first time; later runs only check. Not part of `.ci/run`.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VERSION=0.3.36
URL="https://pypi.org/packages/ec/e9/e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/llama_cpp_python-${VERSION}.tar.gz"
SRC_ROOT="$ROOT/target/llama-cpp-src"
SRC="$SRC_ROOT/llama_cpp_python-${VERSION}/vendor/llama.cpp"
OUT="$ROOT/target/llama.cpp"
TARGETS=(llama-bench llama-batched-bench llama-quantize llama-perplexity)

if [[ ! -f "$SRC/CMakeLists.txt" ]]; then
  mkdir -p "$SRC_ROOT"
  echo "downloading llama-cpp-python ${VERSION} sdist" >&2
  curl -fsSL "$URL" -o "$SRC_ROOT/sdist.tar.gz"
  tar -xzf "$SRC_ROOT/sdist.tar.gz" -C "$SRC_ROOT"
fi

if [[ ! -x "$OUT/venv/bin/cmake" ]]; then
  python3 -m venv "$OUT/venv"
  "$OUT/venv/bin/pip" install --quiet --disable-pip-version-check cmake ninja
fi
export PATH="$OUT/venv/bin:$PATH"

# The CPU's vector extensions, each turned on when /proc/cpuinfo lists it. Not -march=native:
# that also turns on AMX wherever the CPU has it, and a VM that hides AMX's register state from
# the kernel kills llama.cpp with SIGILL on its first quantized product.
flags=$(grep -m1 '^flags' /proc/cpuinfo)
has() { [[ " $flags " == *" $1 "* ]] && echo ON || echo OFF; }
ISA=(
  -DGGML_NATIVE=OFF
  -DGGML_AVX="$(has avx)" -DGGML_AVX2="$(has avx2)" -DGGML_FMA="$(has fma)"
  -DGGML_F16C="$(has f16c)" -DGGML_BMI2="$(has bmi2)" -DGGML_AVX_VNNI="$(has avx_vnni)"
  -DGGML_AVX512="$(has avx512f)" -DGGML_AVX512_VBMI="$(has avx512vbmi)"
  -DGGML_AVX512_VNNI="$(has avx512_vnni)" -DGGML_AVX512_BF16="$(has avx512_bf16)"
  -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
)
stamp="$OUT/build/isa.txt"
if [[ ! -f "$OUT/build/build.ninja" || "$(cat "$stamp" 2>/dev/null)" != "${ISA[*]}" ]]; then
  cmake -S "$SRC" -B "$OUT/build" -G Ninja \
    -DCMAKE_BUILD_TYPE=Release \
    "${ISA[@]}" \
    -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_TESTS=OFF >&2
  echo "${ISA[*]}" > "$stamp"
fi
cmake --build "$OUT/build" --target "${TARGETS[@]}" -j "$(nproc)" >&2
echo "$OUT/build/bin"
