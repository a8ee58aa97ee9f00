//! The router's Prometheus metrics (`openinfer_router_*`). Latencies follow the OpenTelemetry
//! `gen_ai.server.*` semantics: time to first token, time per output token (inter-token
//! latency) and request duration, all in seconds, measured at the router.
//!
//! Label values are bounded: `model` takes only models a worker serves (requests for anything
//! else count under `unknown`), `worker` only connected workers (removed when they go), and
//! `priority` the levels -8..=8 with everything outside counted as `other`.

use openinfer_telemetry::metrics::{Families, REQUEST_SECONDS, STEP_SECONDS};
use openinfer_telemetry::TelemetryError;
use prometheus::{HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry};

/// How a request ended, as counted by `openinfer_router_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Finished (length, stop or eos).
    Success,
    /// Refused as invalid (bad field, unknown model).
    Invalid,
    /// Refused by admission control (a full queue or budget, or shed).
    Refused,
    /// No worker could serve it, or the router was draining.
    Unavailable,
    /// Its queue deadline passed.
    Timeout,
    /// Its client went away first.
    Cancelled,
    /// A worker failed it.
    Error,
    /// No or an unknown API key, or a priority above its tenant's cap.
    Denied,
}

impl Outcome {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Invalid => "invalid",
            Outcome::Refused => "refused",
            Outcome::Unavailable => "unavailable",
            Outcome::Timeout => "timeout",
            Outcome::Cancelled => "cancelled",
            Outcome::Error => "error",
            Outcome::Denied => "denied",
        }
    }

    const ALL: [Outcome; 8] = [
        Outcome::Success,
        Outcome::Invalid,
        Outcome::Refused,
        Outcome::Unavailable,
        Outcome::Timeout,
        Outcome::Cancelled,
        Outcome::Error,
        Outcome::Denied,
    ];
}

/// Why admission refused a request (`openinfer_router_admission_refusals_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The router-wide request limit.
    QueueFull,
    /// The router-wide prompt-token budget.
    TokenBudget,
    /// The per-priority queue limit.
    PriorityQueueFull,
    /// Shed from the queue for higher-priority work.
    Shed,
    /// No worker serves the model.
    NoWorker,
    /// The router is draining.
    Draining,
    /// Too much finished output waits for its clients to read it.
    UnreadOutput,
    /// The request could not be served before its client's deadline.
    Deadline,
    /// Its tenant's `requests_per_minute`.
    TenantRequests,
    /// Its tenant's `tokens_per_minute`.
    TenantTokens,
    /// Its tenant's `max_concurrent`.
    TenantConcurrency,
}

impl Refusal {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::QueueFull => "queue_full",
            Refusal::TokenBudget => "token_budget",
            Refusal::PriorityQueueFull => "priority_queue_full",
            Refusal::Shed => "shed",
            Refusal::NoWorker => "no_worker",
            Refusal::Draining => "draining",
            Refusal::UnreadOutput => "unread_output",
            Refusal::Deadline => "deadline",
            Refusal::TenantRequests => "tenant_requests",
            Refusal::TenantTokens => "tenant_tokens",
            Refusal::TenantConcurrency => "tenant_concurrency",
        }
    }

    const ALL: [Refusal; 11] = [
        Refusal::QueueFull,
        Refusal::TokenBudget,
        Refusal::PriorityQueueFull,
        Refusal::Shed,
        Refusal::NoWorker,
        Refusal::Draining,
        Refusal::UnreadOutput,
        Refusal::Deadline,
        Refusal::TenantRequests,
        Refusal::TenantTokens,
        Refusal::TenantConcurrency,
    ];
}

/// The label value of a priority level.
pub fn priority_label(priority: i32) -> String {
    if (-8..=8).contains(&priority) {
        priority.to_string()
    } else {
        "other".into()
    }
}

/// Every metric the router exports.
#[derive(Clone)]
pub struct RouterMetrics {
    /// Requests by model and outcome.
    pub requests: IntCounterVec,
    /// Admission refusals by model and reason.
    pub refusals: IntCounterVec,
    /// Requests waiting, by model and priority.
    pub queue_depth: IntGaugeVec,
    /// Seconds from arrival to first dispatch, by model and priority.
    pub queue_time: HistogramVec,
    /// Seconds from arrival to the first token.
    pub ttft: HistogramVec,
    /// Seconds between output tokens.
    pub itl: HistogramVec,
    /// Seconds from arrival to the end.
    pub duration: HistogramVec,
    /// Prompt tokens of finished requests.
    pub prompt_tokens: IntCounterVec,
    /// Generated tokens streamed to clients.
    pub generation_tokens: IntCounterVec,
    /// Requests running on workers.
    pub running: IntGaugeVec,
    /// Workers connected per model.
    pub workers: IntGaugeVec,
    /// Registry events seen (`up`, `down`).
    pub registrations: IntCounterVec,
    /// Sequences the router preempted.
    pub preemptions: IntCounterVec,
    /// Sequences resumed on another worker than the one they ran on.
    pub migrations: IntCounterVec,
    /// 1 while the etcd watch is synchronised, 0 while etcd is unreachable.
    pub registry_up: IntGaugeVec,
    /// Per worker: sequences running (as its last report says).
    pub worker_running: IntGaugeVec,
    /// Per worker: KV blocks in use.
    pub worker_kv_used: IntGaugeVec,
    /// Per worker: KV blocks in all.
    pub worker_kv_total: IntGaugeVec,
    /// Bytes of generated output held for clients that have not read it yet.
    pub unread_output: IntGauge,
    /// Prefix-cache keys the router knows workers hold (bounded by --prefix-index-entries).
    pub prefix_index_entries: IntGauge,
    /// Prompt blocks that placement found on the chosen worker's prefix cache.
    pub prefix_blocks_matched: IntCounter,
    /// Tokens generated for requests that then did not complete.
    pub wasted_tokens: IntCounterVec,
    /// Requests that ended, by tenant and outcome.
    pub tenant_requests: IntCounterVec,
    /// Tokens of finished requests, by tenant and kind (`prompt`, `completion`).
    pub tenant_tokens: IntCounterVec,
    /// Requests refused for their credentials, by reason.
    pub auth_failures: IntCounterVec,
    /// Tenants file reloads, by result (`ok`, `error`).
    pub tenants_reloads: IntCounterVec,
    /// Client connections closed at once because `--max-connections` were open.
    pub connections_refused: IntCounter,
    /// Client connections open now.
    pub connections_open: IntGauge,
    /// Prompts handed to validation and the tokenizer.
    pub prompts_tokenized: IntCounter,
}

impl RouterMetrics {
    /// Declares the families on `registry`.
    pub fn new(registry: &Registry) -> Result<Self, TelemetryError> {
        let f = Families(registry);
        let model = &["model"];
        let per_worker = &["model", "worker"];
        Ok(RouterMetrics {
            requests: f.counter(
                "openinfer_router_requests_total",
                "Requests that ended, by model and outcome (success, invalid, refused, unavailable, timeout, cancelled, error).",
                &["model", "outcome"],
            )?,
            refusals: f.counter(
                "openinfer_router_admission_refusals_total",
                "Requests admission control refused or shed, by model and reason.",
                &["model", "reason"],
            )?,
            queue_depth: f.gauge(
                "openinfer_router_queue_depth",
                "Requests waiting in the router's queue, by model and priority.",
                &["model", "priority"],
            )?,
            queue_time: f.histogram(
                "openinfer_router_queue_time_seconds",
                "Seconds from arrival to the first dispatch to a worker, by model and priority.",
                &["model", "priority"],
                REQUEST_SECONDS,
            )?,
            ttft: f.histogram(
                "openinfer_router_time_to_first_token_seconds",
                "Seconds from arrival to the first generated token (gen_ai.server.time_to_first_token).",
                model,
                REQUEST_SECONDS,
            )?,
            itl: f.histogram(
                "openinfer_router_inter_token_latency_seconds",
                "Seconds between consecutive generated tokens of a request (gen_ai.server.time_per_output_token).",
                model,
                STEP_SECONDS,
            )?,
            duration: f.histogram(
                "openinfer_router_request_duration_seconds",
                "Seconds from arrival to the end of a finished request (gen_ai.server.request.duration).",
                model,
                REQUEST_SECONDS,
            )?,
            prompt_tokens: f.counter(
                "openinfer_router_prompt_tokens_total",
                "Prompt tokens of finished requests.",
                model,
            )?,
            generation_tokens: f.counter(
                "openinfer_router_generation_tokens_total",
                "Generated tokens streamed to clients.",
                model,
            )?,
            running: f.gauge(
                "openinfer_router_running_requests",
                "Requests running on workers.",
                model,
            )?,
            workers: f.gauge(
                "openinfer_router_workers",
                "Workers connected, by model.",
                model,
            )?,
            registrations: f.counter(
                "openinfer_router_worker_registrations_total",
                "Worker registry events seen in etcd, by model and event (up, down).",
                &["model", "event"],
            )?,
            preemptions: f.counter(
                "openinfer_router_preemptions_total",
                "Running sequences the router preempted to make room for higher-priority work.",
                model,
            )?,
            migrations: f.counter(
                "openinfer_router_migrations_total",
                "Requests resumed on a different worker than the one they ran on.",
                model,
            )?,
            registry_up: f.gauge(
                "openinfer_router_registry_up",
                "1 while the router's etcd watch is synchronised, 0 while etcd is unreachable.",
                &[],
            )?,
            worker_running: f.gauge(
                "openinfer_router_worker_running_sequences",
                "Sequences running on each worker, from its latest capacity report.",
                per_worker,
            )?,
            worker_kv_used: f.gauge(
                "openinfer_router_worker_kv_blocks_used",
                "KV-cache blocks in use on each worker, from its latest capacity report.",
                per_worker,
            )?,
            worker_kv_total: f.gauge(
                "openinfer_router_worker_kv_blocks_capacity",
                "KV-cache blocks on each worker, from its latest capacity report.",
                per_worker,
            )?,
            wasted_tokens: f.counter(
                "openinfer_router_wasted_tokens_total",
                "Tokens generated for requests that then did not complete (cancelled by their client, past their deadline, or failed): work the workers did for nobody.",
                model,
            )?,
            tenant_requests: f.counter(
                "openinfer_router_tenant_requests_total",
                "Requests that ended, by tenant (from the tenants file; `anonymous` without one) and outcome.",
                &["tenant", "outcome"],
            )?,
            tenant_tokens: f.counter(
                "openinfer_router_tenant_tokens_total",
                "Tokens of finished requests, by tenant and kind (prompt, completion).",
                &["tenant", "kind"],
            )?,
            auth_failures: f.counter(
                "openinfer_router_auth_failures_total",
                "Requests refused for their credentials, by reason (missing, malformed, unknown, priority_cap).",
                &["reason"],
            )?,
            tenants_reloads: f.counter(
                "openinfer_router_tenants_reloads_total",
                "Reloads of the tenants file, by result (ok, error: the previous version stays in force).",
                &["result"],
            )?,
            connections_refused: f
                .counter(
                    "openinfer_router_connections_refused_total",
                    "Client connections closed at once because --max-connections were open.",
                    &[],
                )?
                .with_label_values(&[] as &[&str]),
            connections_open: f
                .gauge(
                    "openinfer_router_connections_open",
                    "Client connections open now (bounded by --max-connections).",
                    &[],
                )?
                .with_label_values(&[] as &[&str]),
            prompts_tokenized: f
                .counter(
                    "openinfer_router_prompts_tokenized_total",
                    "Prompts handed to validation and the tokenizer since start (requests refused before it cost no tokenizer time).",
                    &[],
                )?
                .with_label_values(&[] as &[&str]),
            unread_output: f
                .gauge(
                    "openinfer_router_unread_output_bytes",
                    "Bytes of generated output held in the router for clients that have not read it yet (bounded by --max-unread-output).",
                    &[],
                )?
                .with_label_values(&[] as &[&str]),
            prefix_index_entries: f
                .gauge(
                    "openinfer_router_prefix_index_entries",
                    "Prefix-cache keys the router knows its workers hold (bounded by --prefix-index-entries).",
                    &[],
                )?
                .with_label_values(&[] as &[&str]),
            prefix_blocks_matched: f
                .counter(
                    "openinfer_router_prefix_blocks_matched_total",
                    "Prompt blocks that placement found in the chosen worker's prefix cache (cache-aware placement).",
                    &[],
                )?
                .with_label_values(&[] as &[&str]),
        })
    }

    /// Creates the zero series of a model the router has just learnt of, so that rates and
    /// alerts see it before its first event.
    pub fn model_known(&self, model: &str) {
        for o in Outcome::ALL {
            self.requests.with_label_values(&[model, o.as_str()]);
        }
        for r in Refusal::ALL {
            self.refusals.with_label_values(&[model, r.as_str()]);
        }
        self.queue_depth.with_label_values(&[model, "0"]);
        self.queue_time.with_label_values(&[model, "0"]);
        for h in [&self.ttft, &self.itl, &self.duration] {
            h.with_label_values(&[model]);
        }
        for c in [
            &self.prompt_tokens,
            &self.generation_tokens,
            &self.preemptions,
            &self.migrations,
            &self.wasted_tokens,
        ] {
            c.with_label_values(&[model]);
        }
        self.running.with_label_values(&[model]);
        self.workers.with_label_values(&[model]);
    }

    /// Counts a request's end.
    pub fn request(&self, model: &str, outcome: Outcome) {
        self.requests
            .with_label_values(&[model, outcome.as_str()])
            .inc();
    }

    /// Creates the zero series of a tenant (from the tenants file, or `anonymous`).
    pub fn tenant_known(&self, tenant: &str) {
        for o in Outcome::ALL {
            self.tenant_requests
                .with_label_values(&[tenant, o.as_str()]);
        }
        for kind in ["prompt", "completion"] {
            self.tenant_tokens.with_label_values(&[tenant, kind]);
        }
    }

    /// Counts an admission refusal.
    pub fn refused(&self, model: &str, reason: Refusal) {
        self.refusals
            .with_label_values(&[model, reason.as_str()])
            .inc();
    }

    /// Forgets a worker's series.
    pub fn worker_gone(&self, model: &str, worker: &str) {
        for g in [
            &self.worker_running,
            &self.worker_kv_used,
            &self.worker_kv_total,
        ] {
            let _ = g.remove_label_values(&[model, worker]);
        }
    }
}
