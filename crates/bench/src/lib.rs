//! The benchmark harness behind `openinfer bench`, `bench-engine` and `bench-router`. Each
//! measures against a peer in the same run (HF transformers, llama.cpp, direct-to-worker), writes its
//! results as JSON and an SVG chart, and shows progress while it works.
//!
//! * [`serving`]: load against a router (fixed concurrency or gamma arrivals, synthetic or
//!   dataset prompts, priority mix), latency percentiles, goodput; optionally HF `generate`.
//! * [`engine`]: prefill and decode speed of the engine beside HF transformers and, on a GGUF
//!   file, beside [`llama_cpp`].
//! * [`router`]: what the router adds over direct-to-worker, and its memory under streams.
//! * [`tenants`]: tenants sharing a cluster (`--tenant-mix`), fair shares beside first come,
//!   first served.
//! * [`prefix`]: prefix caching off, on, and with cache-aware placement, on one workload
//!   (`--prefix-cache-compare`).
//! * [`workload`], [`stats`], [`chart`]: prompts and arrivals, percentiles and SLOs, SVG.
//! * [`child`], [`python`]: `openinfer` child processes, and the HF baseline scripts.
//! * [`progress`]: progress bars (shared with the `openinfer` binary).

pub mod args;
pub mod chart;
pub mod child;
pub mod engine;
pub mod llama_cpp;
pub mod prefix;
pub mod progress;
pub mod python;
pub mod router;
pub mod serving;
pub mod sse;
pub mod stats;
pub mod tenants;
pub mod workload;

pub use args::{BenchArgs, BenchEngineArgs, BenchRouterArgs};

/// The async runtime the benchmarks drive their clients on.
pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    use anyhow::Context;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}
