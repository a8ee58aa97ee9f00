//! Joining a span to its request's trace, and handing the trace on to the next hop.
//!
//! Every request span records a `trace_id` field, exported or not, so that log lines can be
//! matched with the trace: with export on it is the OpenTelemetry trace id; with export off it
//! is the client's (from `traceparent`) or a fresh random one, and it still travels to the
//! workers, so the logs of one request share it across processes.

use opentelemetry::trace::{
    SpanContext, SpanId as OtelSpanId, TraceContextExt, TraceFlags, TraceId as OtelTraceId,
    TraceState,
};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::otel::exporting;
use crate::traceparent::{SpanId, TraceId, TraceParent};

/// Makes `span` continue the trace of `parent` (or start one) and records its `trace_id`
/// field. Call it right after creating the span, before any child span is made.
pub fn join(span: &Span, parent: Option<TraceParent>) -> TraceId {
    let fallback = || parent.map_or_else(TraceId::random, |p| p.trace_id);
    let id = if exporting() {
        if let Some(p) = parent {
            let _ = span.set_parent(remote_context(&p));
        }
        otel_context(span).map_or_else(fallback, |sc| TraceId(sc.trace_id().to_bytes()))
    } else {
        fallback()
    };
    span.record("trace_id", tracing::field::display(id));
    id
}

/// Renames `span` (its `otel.name`), also once it has started.
pub fn rename(span: &Span, name: &str) {
    span.record("otel.name", name);
    if exporting() {
        span.context().span().update_name(name.to_string());
    }
}

/// The `traceparent` that makes a callee's spans children of `span` in trace `trace_id`.
pub fn traceparent(span: &Span, trace_id: TraceId) -> TraceParent {
    match otel_context(span).filter(|_| exporting()) {
        Some(sc) => TraceParent {
            trace_id: TraceId(sc.trace_id().to_bytes()),
            span_id: SpanId(sc.span_id().to_bytes()),
            sampled: sc.is_sampled(),
        },
        // Not exported: only the trace id matters (for the logs); nobody records the span.
        None => TraceParent {
            trace_id,
            span_id: SpanId::random(),
            sampled: false,
        },
    }
}

fn otel_context(span: &Span) -> Option<SpanContext> {
    if !exporting() {
        return None;
    }
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then_some(sc)
}

fn remote_context(p: &TraceParent) -> opentelemetry::Context {
    let flags = if p.sampled {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    opentelemetry::Context::new().with_remote_span_context(SpanContext::new(
        OtelTraceId::from_bytes(p.trace_id.0),
        OtelSpanId::from_bytes(p.span_id.0),
        flags,
        true,
        TraceState::default(),
    ))
}
