#!/usr/bin/env bash
# Builds `openinfer` with CUDA and NCCL (`--features cuda`) for the NVIDIA H200 (compute
# capability 9.0, CUDA 13.0 driver) on a host without CUDA: the CUDA 13.0 toolkit comes from
# PyPI wheels into target/cuda-venv (nvcc, runtime, cuBLAS, cuRAND, NVRTC, NCCL). The wheels
# ship no driver library, so a link-time stub of libcuda.so.1 is made from the symbols cudarc
# binds; the GPU host's driver provides the real one at run time.
#
# Clippy runs first over the whole workspace with the feature on (`-D warnings`).
# Output: target/cuda/release/openinfer (stripped). On the GPU host, NCCL and cuBLAS must be
# on LD_LIBRARY_PATH (its Python environment has them; see docs/tensor-parallel.md).
# Usage: scripts/build-cuda.sh            (CUDA_COMPUTE_CAP=80 ... for another GPU)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV=target/cuda-venv
PYTHON="${PYTHON:-python3}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"

[ -x "$VENV/bin/pip" ] || "$PYTHON" -m venv "$VENV"
# Every component pinned to 13.0: newer PTX does not load on a 13.0 driver.
"$VENV/bin/pip" install --progress-bar off -q \
    "nvidia-cuda-nvcc==13.0.*" "nvidia-nvvm==13.0.*" "nvidia-cuda-crt==13.0.*" \
    "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*" "nvidia-cuda-nvrtc==13.0.*" \
    "nvidia-cublas==13.0.*" "nvidia-curand==10.4.*" "nvidia-nccl-cu13==2.*"

SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
CUDA="$SITE/nvidia/cu13"
NCCL="$SITE/nvidia/nccl"
# The linker wants unversioned names; NCCL's header and library join the toolkit's.
for lib in "$CUDA"/lib/*.so.* "$NCCL"/lib/*.so.*; do
    base="$(basename "$lib")"
    ln -sf "$lib" "$CUDA/lib/${base%%.so.*}.so"
done
ln -sf "$NCCL/include/nccl.h" "$CUDA/include/nccl.h"
# The driver stub: every cu* function cudarc declares, in a library named libcuda.so.1.
STUB="$CUDA/lib/libcuda.so"
if [ ! -f "$STUB" ]; then
    CUDARC="$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -maxdepth 1 -name 'cudarc-0.19.*' | sort | tail -1)"
    if [ -z "$CUDARC" ]; then
        cargo fetch
        CUDARC="$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -maxdepth 2 -name 'cudarc-0.19.*' | sort | tail -1)"
    fi
    grep -ohE '\bfn cu[A-Za-z0-9_]+\(' "$CUDARC"/src/driver/sys/mod.rs | sort -u |
        sed -E 's/fn (cu[A-Za-z0-9_]+)\(/void \1(void) {}/' > target/libcuda-stub.c
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$STUB" target/libcuda-stub.c
fi

export CUDA_HOME="$CUDA" CUDA_PATH="$CUDA" NVCC="$CUDA/bin/nvcc" PATH="$CUDA/bin:$PATH"
export LIBRARY_PATH="$CUDA/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
export CARGO_TARGET_DIR=target/cuda
# Warning-free with the feature on (the CPU-only CI never compiles the CUDA code).
cargo clippy --release --workspace --all-targets --locked \
    --features openinfer-cli/cuda,openinfer-worker/cuda,openinfer-engine/cuda -- -D warnings
cargo build --release -p openinfer-cli --features cuda --locked
strip target/cuda/release/openinfer
# It loads and starts (the driver stub stands in for libcuda.so.1; no device is touched).
mkdir -p target/cuda-stub
ln -sf "$STUB" target/cuda-stub/libcuda.so.1
LD_LIBRARY_PATH="target/cuda-stub:$CUDA/lib:$NCCL/lib" target/cuda/release/openinfer --version
ls -la target/cuda/release/openinfer
