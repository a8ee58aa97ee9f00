//! One request as operators see it: its trace span (named `{operation} {model}`, with the
//! OpenTelemetry GenAI attributes) and its count in the metrics when it ends.

use std::sync::Arc;

use openinfer_telemetry::{otel, trace, TraceId, TraceParent};
use opentelemetry::{Array, StringValue, Value};
use tracing::field::Empty;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::error::RouterError;
use crate::metrics::{Outcome, RouterMetrics};
use crate::request::{Request, Summary};

/// What a request's trace needs as it moves through the router.
#[derive(Debug, Clone)]
pub struct RequestTrace {
    /// The request's span; queue wait and dispatches are its children.
    pub span: Span,
    /// Its trace (exported or not: log lines and workers carry it).
    pub trace_id: TraceId,
}

/// The GenAI operation of the public `Generate` calls and of `/v1/completions`.
pub const TEXT_COMPLETION: &str = "text_completion";
/// The GenAI operation of `/v1/chat/completions`.
pub const CHAT: &str = "chat";

/// A request's span and metrics from arrival to its end. Dropped before
/// [`finished`](Self::finished) or [`fail`](Self::fail), the request counts as cancelled (its
/// client went away).
pub struct RequestRecord {
    trace: RequestTrace,
    metrics: Arc<RouterMetrics>,
    /// The `model` label (a served model, or `unknown`).
    model: String,
    /// Its tenant, once its credentials named one.
    tenant: Option<Arc<str>>,
    done: bool,
}

impl RequestRecord {
    /// Opens the span of a request that continues `parent` (the client's `traceparent`).
    /// With export off the span carries only what log lines need (`request_id`, `trace_id`).
    pub fn start(
        operation: &'static str,
        system: &'static str,
        rpc: &'static str,
        priority: i32,
        parent: Option<TraceParent>,
        metrics: Arc<RouterMetrics>,
    ) -> Self {
        let span = if !otel::exporting() {
            tracing::info_span!(
                "request",
                request_id = Empty,
                trace_id = Empty,
                tenant = Empty
            )
        } else {
            tracing::info_span!(
                "request",
                otel.name = operation,
                otel.kind = "server",
                otel.status_code = Empty,
                otel.status_description = Empty,
                rpc.system = system,
                rpc.method = rpc,
                gen_ai.operation.name = operation,
                gen_ai.provider.name = "openinfer",
                gen_ai.request.model = Empty,
                gen_ai.request.max_tokens = Empty,
                gen_ai.request.temperature = Empty,
                gen_ai.request.top_p = Empty,
                gen_ai.request.seed = Empty,
                gen_ai.response.id = Empty,
                gen_ai.response.model = Empty,
                gen_ai.usage.input_tokens = Empty,
                gen_ai.usage.output_tokens = Empty,
                openinfer.priority = priority,
                openinfer.tenant = Empty,
                openinfer.user = Empty,
                openinfer.queue_time_s = Empty,
                openinfer.time_to_first_token_s = Empty,
                request_id = Empty,
                trace_id = Empty,
            )
        };
        let trace_id = trace::join(&span, parent);
        RequestRecord {
            trace: RequestTrace { span, trace_id },
            metrics,
            model: "unknown".into(),
            tenant: None,
            done: false,
        }
    }

    /// The request's span.
    pub fn span(&self) -> &Span {
        &self.trace.span
    }

    /// The request's trace, for the validated request to carry.
    pub fn trace(&self) -> RequestTrace {
        self.trace.clone()
    }

    /// Names the request in logs and traces (before validation, as the client sent it).
    pub fn request_id(&self, id: &str) {
        self.trace.span.record("request_id", id);
        self.trace.span.record("gen_ai.response.id", id);
    }

    /// Names the request's tenant on its span (so on every log line inside it) and in its
    /// per-tenant metrics.
    pub fn tenant(&mut self, tenant: &Arc<str>) {
        self.trace.span.record("tenant", tenant.as_ref());
        self.trace.span.record("openinfer.tenant", tenant.as_ref());
        self.tenant = Some(tenant.clone());
    }

    /// The end user the client names (OpenAI's `user`), on the exported span.
    pub fn user(&self, user: &str) {
        self.trace.span.record("openinfer.user", user);
    }

    /// Counts the request's end under its tenant.
    fn count_tenant(&self, outcome: Outcome) {
        if let Some(t) = &self.tenant {
            self.metrics
                .tenant_requests
                .with_label_values(&[t.as_ref(), outcome.as_str()])
                .inc();
        }
    }

    /// A child span of the request, for a step worth seeing in its trace (none with export
    /// off: log lines find the request's ids on the request span).
    pub fn child(&self, make: impl FnOnce(&Span) -> Span) -> Span {
        child_span(&self.trace.span, make)
    }

    /// Records what validation made of the request.
    pub fn validated(&mut self, req: &Request, operation: &str) {
        self.model = req.model.clone();
        if !otel::exporting() {
            return;
        }
        let span = &self.trace.span;
        trace::rename(span, &format!("{operation} {}", req.model));
        span.record("gen_ai.request.model", req.model.as_str());
        span.record("gen_ai.response.model", req.model.as_str());
        span.record("gen_ai.request.max_tokens", req.stopping.max_new_tokens);
        if let Some(t) = req.sampling.temperature {
            span.record("gen_ai.request.temperature", f64::from(t));
        }
        if let Some(p) = req.sampling.top_p {
            span.record("gen_ai.request.top_p", f64::from(p));
        }
        if let Some(s) = req.sampling.seed {
            span.record("gen_ai.request.seed", s);
        }
    }

    /// Labels the request with a model the router serves (for requests that fail validation
    /// after naming one).
    pub fn model_known(&mut self, model: &str) {
        self.model = model.to_string();
    }

    /// The request finished: usage, finish reason, latencies.
    pub fn finished(&mut self, s: &Summary) {
        self.done = true;
        let span = &self.trace.span;
        if otel::exporting() {
            span.record("gen_ai.usage.input_tokens", s.prompt_tokens);
            span.record("gen_ai.usage.output_tokens", s.completion_tokens);
            span.record("openinfer.queue_time_s", s.queue_time);
            span.record("openinfer.time_to_first_token_s", s.time_to_first_token);
            span.set_attribute(
                "gen_ai.response.finish_reasons",
                Value::Array(Array::String(vec![StringValue::from(s.reason.as_str())])),
            );
        }
        let m = &self.metrics;
        let model = [self.model.as_str()];
        if s.completion_tokens > 0 {
            m.ttft
                .with_label_values(&model)
                .observe(s.time_to_first_token);
        }
        m.duration.with_label_values(&model).observe(s.total_time);
        m.request(&self.model, Outcome::Success);
        self.count_tenant(Outcome::Success);
        if let Some(t) = &self.tenant {
            let tokens = |kind| m.tenant_tokens.with_label_values(&[t.as_ref(), kind]);
            tokens("prompt").inc_by(s.prompt_tokens.into());
            tokens("completion").inc_by(s.completion_tokens.into());
        }
        tracing::debug!(parent: span, reason = s.reason.as_str(), prompt_tokens = s.prompt_tokens, completion_tokens = s.completion_tokens, total_s = s.total_time, "request finished");
    }

    /// The request failed with `e`: recorded, and handed back for its client.
    pub fn failed_with(&mut self, e: RouterError) -> RouterError {
        self.failed(&e);
        e
    }

    fn failed(&mut self, e: &RouterError) {
        self.done = true;
        let span = &self.trace.span;
        if otel::exporting() {
            span.record("otel.status_code", "ERROR");
            span.record("otel.status_description", e.to_string());
            span.set_attribute("error.type", error_type(e));
        }
        self.metrics.request(&self.model, outcome(e));
        self.count_tenant(outcome(e));
        tracing::debug!(parent: span, error = %e, "request failed");
    }
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        if !self.done {
            if otel::exporting() {
                self.trace.span.set_attribute("error.type", "cancelled");
            }
            self.metrics.request(&self.model, Outcome::Cancelled);
            self.count_tenant(Outcome::Cancelled);
            tracing::debug!(parent: &self.trace.span, "request cancelled: its client went away");
        }
    }
}

/// `make(parent)` when spans are exported, else a disabled span (nothing is built).
pub fn child_span(parent: &Span, make: impl FnOnce(&Span) -> Span) -> Span {
    if otel::exporting() {
        make(parent)
    } else {
        Span::none()
    }
}

fn outcome(e: &RouterError) -> Outcome {
    match e {
        RouterError::Invalid(_) | RouterError::UnknownModel { .. } => Outcome::Invalid,
        RouterError::QueueFull(..) => Outcome::Refused,
        RouterError::QueueTimeout(_)
        | RouterError::TooLateToStart(_)
        | RouterError::DeadlineDuringGeneration(_) => Outcome::Timeout,
        RouterError::Unavailable(_) => Outcome::Unavailable,
        RouterError::Worker(_) | RouterError::Internal(_) => Outcome::Error,
        RouterError::Unauthenticated(_) | RouterError::PermissionDenied(_) => Outcome::Denied,
    }
}

/// The `error.type` attribute: the gRPC status code's name.
fn error_type(e: &RouterError) -> &'static str {
    match e {
        RouterError::Invalid(_) => "INVALID_ARGUMENT",
        RouterError::UnknownModel { .. } => "NOT_FOUND",
        RouterError::QueueFull(..) => "RESOURCE_EXHAUSTED",
        RouterError::QueueTimeout(_)
        | RouterError::TooLateToStart(_)
        | RouterError::DeadlineDuringGeneration(_) => "DEADLINE_EXCEEDED",
        RouterError::Unavailable(_) => "UNAVAILABLE",
        RouterError::Worker(_) | RouterError::Internal(_) => "INTERNAL",
        RouterError::Unauthenticated(_) => "UNAUTHENTICATED",
        RouterError::PermissionDenied(_) => "PERMISSION_DENIED",
    }
}
