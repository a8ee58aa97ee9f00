# syntax=docker/dockerfile:1
# The CPU image of `openinfer`: one binary, whose subcommands are the router, the worker and
# `serve` (both in one process). Build from the repository root:
#
#   docker build -f deploy/docker/cpu.Dockerfile -t openinfer:cpu .
#
# The dependency layer is cached with cargo-chef: it is rebuilt only when a manifest or
# Cargo.lock changes. The runtime stage holds the binary alone (distroless, no shell, no
# toolchain), runs as a non-root user and needs no network at start.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS chef
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
COPY --from=planner /src/recipe.json recipe.json
RUN cargo chef cook --release --locked --package openinfer-cli --recipe-path recipe.json
COPY Cargo.toml Cargo.lock ./
COPY crates crates
COPY proto proto
COPY tests tests
RUN cargo build --release --locked --package openinfer-cli \
    && strip target/release/openinfer

FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
COPY --from=builder /src/target/release/openinfer /usr/local/bin/openinfer
# distroless's `nonroot` user.
USER 65532:65532
# gRPC API (router, serve), worker gRPC, router and worker /metrics.
EXPOSE 50051 50061 9464 9465
ENTRYPOINT ["/usr/local/bin/openinfer"]
CMD ["serve", "--listen", "0.0.0.0:50051"]
