# syntax=docker/dockerfile:1
# The CUDA image of `openinfer` (`--features cuda`: candle's CUDA kernels, cuBLAS, NCCL for
# tensor parallelism). Build from the repository root, for the GPUs' compute capability
# (90: H100/H200, 89: L4/L40S, 80: A100):
#
#   docker build -f deploy/docker/cuda.Dockerfile --build-arg CUDA_COMPUTE_CAP=90 -t openinfer:cuda .
#
# The builder is NVIDIA's `devel` image (nvcc, headers, the libcuda link stub); the runtime
# stage is NVIDIA's `runtime` image (CUDA libraries and NCCL, no compiler and no Rust
# toolchain), runs as a non-root user and needs no network at start. The node's driver must
# support the CUDA version below (13.0: driver 580 or newer).

ARG CUDA_VERSION=13.0.0
ARG UBUNTU_RELEASE=ubuntu24.04

FROM nvidia/cuda:${CUDA_VERSION}-devel-${UBUNTU_RELEASE} AS chef
ARG RUST_VERSION=1.95.0
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl gcc libc6-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
ENV CARGO_HOME=/usr/local/cargo RUSTUP_HOME=/usr/local/rustup PATH=/usr/local/cargo/bin:$PATH
RUN curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
    | sh -s -- -y --no-modify-path --profile minimal --default-toolchain "${RUST_VERSION}"
RUN cargo install cargo-chef --locked --version 0.1.78
WORKDIR /src

# The recipe: the workspace's manifests, lockfile and targets, without the sources.
FROM chef AS planner
COPY Cargo.toml Cargo.lock ./
COPY crates crates
COPY proto proto
COPY tests tests
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
# The GPUs' compute capability, without the dot (candle compiles its kernels for it).
ARG CUDA_COMPUTE_CAP=90
ENV CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP} \
    CUDA_HOME=/usr/local/cuda \
    LIBRARY_PATH=/usr/local/cuda/lib64/stubs
COPY --from=planner /src/recipe.json recipe.json
RUN cargo chef cook --release --locked --package openinfer-cli --features cuda --recipe-path recipe.json
COPY Cargo.toml Cargo.lock ./
COPY crates crates
COPY proto proto
COPY tests tests
RUN cargo build --release --locked --package openinfer-cli --features cuda \
    && strip target/release/openinfer

FROM nvidia/cuda:${CUDA_VERSION}-runtime-${UBUNTU_RELEASE} AS runtime
RUN useradd --uid 65532 --user-group --no-create-home --shell /usr/sbin/nologin openinfer
COPY --from=builder /src/target/release/openinfer /usr/local/bin/openinfer
USER 65532:65532
# gRPC API (router, serve), worker gRPC, router and worker /metrics.
EXPOSE 50051 50061 9464 9465
ENTRYPOINT ["/usr/local/bin/openinfer"]
CMD ["serve", "--listen", "0.0.0.0:50051", "--device", "cuda"]
