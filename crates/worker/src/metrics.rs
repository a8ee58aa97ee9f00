//! The worker's Prometheus metrics (`openinfer_worker_*`), all labelled with the model the
//! worker serves.

use openinfer_core::FinishReason;
use openinfer_telemetry::metrics::{Families, BATCH_SIZES, STEP_SECONDS};
use openinfer_telemetry::TelemetryError;
use prometheus::{Histogram, IntCounter, IntCounterVec, IntGauge, Registry};

/// What the engine thread reports, bound to one model.
#[derive(Clone)]
pub struct WorkerMetrics {
    model: String,
    /// Sequences running.
    pub running: IntGauge,
    /// Sequences waiting for KV blocks.
    pub waiting: IntGauge,
    /// KV blocks in use.
    pub kv_used: IntGauge,
    /// KV blocks in all.
    pub kv_total: IntGauge,
    /// Sequences per engine step.
    pub batch_size: Histogram,
    /// Seconds per engine step.
    pub step_duration: Histogram,
    /// Tokens of sequences taken in, to prefill (a resumed sequence's generated ones included).
    pub prompt_tokens: IntCounter,
    /// Tokens generated.
    pub generation_tokens: IntCounter,
    sequences: IntCounterVec,
    /// Sequences preempted (by a router, a drain, or the engine short of KV blocks).
    pub preemptions: IntCounter,
    /// Router connections.
    pub connections: IntGauge,
    /// Prompt tokens whose KV came from the prefix cache.
    pub prefix_cache_hit_tokens: IntCounter,
    /// Full blocks in the prefix cache.
    pub prefix_cache_blocks: IntGauge,
    /// Cached blocks evicted to hold other tokens.
    pub prefix_cache_evictions: IntCounter,
}

impl WorkerMetrics {
    /// Declares the families on `registry`, for `model`.
    pub fn new(registry: &Registry, model: &str) -> Result<Self, TelemetryError> {
        let f = Families(registry);
        let m = [model];
        let gauge = |name: &str, help: &str| -> Result<IntGauge, TelemetryError> {
            Ok(f.gauge(name, help, &["model"])?.with_label_values(&m))
        };
        let counter = |name: &str, help: &str| -> Result<IntCounter, TelemetryError> {
            Ok(f.counter(name, help, &["model"])?.with_label_values(&m))
        };
        let metrics = WorkerMetrics {
            model: model.to_string(),
            running: gauge(
                "openinfer_worker_running_sequences",
                "Sequences running in the engine.",
            )?,
            waiting: gauge(
                "openinfer_worker_waiting_sequences",
                "Sequences taken in and waiting for KV-cache blocks.",
            )?,
            kv_used: gauge(
                "openinfer_worker_kv_blocks_used",
                "KV-cache blocks in use.",
            )?,
            kv_total: gauge("openinfer_worker_kv_blocks_capacity", "KV-cache blocks in all.")?,
            batch_size: f
                .histogram(
                    "openinfer_worker_batch_size",
                    "Sequences in each engine step's forward pass.",
                    &["model"],
                    BATCH_SIZES,
                )?
                .with_label_values(&m),
            step_duration: f
                .histogram(
                    "openinfer_worker_step_duration_seconds",
                    "Seconds per engine step (forward pass, sampling, detokenization).",
                    &["model"],
                    STEP_SECONDS,
                )?
                .with_label_values(&m),
            prompt_tokens: counter(
                "openinfer_worker_prompt_tokens_total",
                "Tokens of sequences taken in, to prefill: the prompt, plus the tokens a resumed sequence had generated.",
            )?,
            generation_tokens: counter(
                "openinfer_worker_generation_tokens_total",
                "Tokens generated.",
            )?,
            sequences: f.counter(
                "openinfer_worker_sequences_total",
                "Sequences that left the engine, by outcome (length, stop, eos, cancelled, preempted, rejected, error).",
                &["model", "outcome"],
            )?,
            preemptions: counter(
                "openinfer_worker_preemptions_total",
                "Sequences preempted (asked by a router, at the end of a drain, or short of KV blocks).",
            )?,
            connections: gauge(
                "openinfer_worker_connections",
                "Router connections (Execute streams) open.",
            )?,
            prefix_cache_hit_tokens: counter(
                "openinfer_worker_prefix_cache_hit_tokens_total",
                "Prompt tokens whose KV came from the prefix cache instead of a prefill (hit rate: this over openinfer_worker_prompt_tokens_total).",
            )?,
            prefix_cache_blocks: gauge(
                "openinfer_worker_prefix_cache_blocks",
                "Full KV blocks held in the prefix cache, in use or not (those not in use count as free).",
            )?,
            prefix_cache_evictions: counter(
                "openinfer_worker_prefix_cache_evictions_total",
                "Cached KV blocks taken back, least recently used first, to hold other tokens.",
            )?,
        };
        for reason in FinishReason::ALL {
            metrics
                .sequences
                .with_label_values(&[model, reason.as_str()]);
        }
        Ok(metrics)
    }

    /// Brings the prefix-cache series up to the engine's totals `s`.
    pub fn prefix_cache(&self, s: &openinfer_engine::kv_cache::PrefixCacheStats) {
        let catch_up = |c: &IntCounter, total: u64| c.inc_by(total.saturating_sub(c.get()));
        catch_up(&self.prefix_cache_hit_tokens, s.hit_tokens);
        catch_up(&self.prefix_cache_evictions, s.evictions);
        self.prefix_cache_blocks.set(s.cached_blocks as i64);
    }

    /// Counts a sequence's end (a preempted one is also a preemption).
    pub fn sequence_ended(&self, reason: FinishReason) {
        self.sequences
            .with_label_values(&[self.model.as_str(), reason.as_str()])
            .inc();
        if reason == FinishReason::Preempted {
            self.preemptions.inc();
        }
    }
}
