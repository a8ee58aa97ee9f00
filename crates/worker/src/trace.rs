//! The worker's spans of one sequence: `prefill` from its arrival to its first token, then
//! `decode` to its end (one span for the whole phase, with the step count, not one per
//! token). Both are children of the router's dispatch span, whose `traceparent` comes with the
//! sequence, so that they sit in the request's trace. With export off a sequence has one plain
//! span, `sequence`, that gives its log lines the request and trace ids.

use openinfer_core::FinishReason;
use openinfer_proto::worker::v1 as pb;
use openinfer_telemetry::{otel, trace, TraceId, TraceParent, TRACEPARENT};
use tracing::field::Empty;
use tracing::Span;

/// The trace of one sequence on this worker.
pub struct SequenceTrace {
    parent: Option<TraceParent>,
    trace_id: TraceId,
    wire_id: u64,
    request_id: String,
    phase: Phase,
}

enum Phase {
    /// Export off: one span for the log lines.
    Logged(Span),
    Prefill(Span),
    Decode {
        span: Span,
        steps: u32,
    },
}

impl SequenceTrace {
    /// Opens the prefill span of `spec` (before it is handed to the engine). Its parent is the
    /// `traceparent` the sequence carries, else `stream`'s (from the `Execute` call's metadata).
    pub fn start(spec: &pb::SequenceSpec, model: &str, stream: Option<TraceParent>) -> Self {
        let parent = spec
            .trace_context
            .get(TRACEPARENT)
            .and_then(|v| TraceParent::parse(v))
            .or(stream);
        if !otel::exporting() {
            let span = tracing::info_span!(
                parent: None,
                "sequence",
                request_id = spec.request_id.as_str(),
                trace_id = Empty,
            );
            let trace_id = trace::join(&span, parent);
            return SequenceTrace {
                parent,
                trace_id,
                wire_id: spec.sequence_id,
                request_id: String::new(),
                phase: Phase::Logged(span),
            };
        }
        let span = tracing::info_span!(
            parent: None,
            "prefill",
            otel.name = "prefill",
            gen_ai.request.model = model,
            openinfer.sequence_id = spec.sequence_id,
            openinfer.prompt_tokens = spec.prompt_ids.len(),
            openinfer.resumed_tokens = spec.generated_ids.len(),
            gen_ai.usage.output_tokens = Empty,
            gen_ai.response.finish_reasons = Empty,
            otel.status_code = Empty,
            request_id = spec.request_id.as_str(),
            trace_id = Empty,
        );
        let trace_id = trace::join(&span, parent);
        SequenceTrace {
            parent,
            trace_id,
            wire_id: spec.sequence_id,
            request_id: spec.request_id.clone(),
            phase: Phase::Prefill(span),
        }
    }

    /// The span of the phase the sequence is in.
    pub fn span(&self) -> &Span {
        match &self.phase {
            Phase::Logged(span) | Phase::Prefill(span) | Phase::Decode { span, .. } => span,
        }
    }

    /// A token came out: the first ends prefill and opens decode.
    pub fn token(&mut self) {
        match &mut self.phase {
            Phase::Logged(_) => {}
            Phase::Decode { steps, .. } => *steps += 1,
            Phase::Prefill(prefill) => {
                // Without a router's context (a direct client), decode hangs under prefill.
                let parent = self
                    .parent
                    .unwrap_or_else(|| trace::traceparent(prefill, self.trace_id));
                let span = tracing::info_span!(
                    parent: None,
                    "decode",
                    otel.name = "decode",
                    openinfer.sequence_id = self.wire_id,
                    openinfer.decode_steps = Empty,
                    gen_ai.usage.output_tokens = Empty,
                    gen_ai.response.finish_reasons = Empty,
                    otel.status_code = Empty,
                    request_id = self.request_id.as_str(),
                    trace_id = Empty,
                );
                trace::join(&span, Some(parent));
                self.phase = Phase::Decode { span, steps: 0 };
            }
        }
    }

    /// The sequence left the engine: closes the open span with the outcome.
    pub fn end(self, reason: FinishReason, completion_tokens: usize) {
        let failed = matches!(reason, FinishReason::Error | FinishReason::Cancelled);
        let reason = reason.as_str();
        let span = match self.phase {
            Phase::Logged(span) => {
                tracing::debug!(parent: &span, reason, completion_tokens, "sequence ended");
                return;
            }
            Phase::Prefill(span) => span,
            Phase::Decode { span, steps } => {
                span.record("openinfer.decode_steps", steps);
                span
            }
        };
        span.record("gen_ai.usage.output_tokens", completion_tokens);
        span.record("gen_ai.response.finish_reasons", reason);
        if failed {
            span.record("otel.status_code", "ERROR");
        }
        tracing::debug!(parent: &span, reason, completion_tokens, "sequence ended");
    }
}
