//! Observability shared by the router and the workers:
//!
//! * [`logging`]: the `tracing` subscriber (text or JSON lines, request ids on every line),
//!   with OpenTelemetry export ([`otel`]) when the standard `OTEL_*` variables ask for it;
//! * [`traceparent`] and [`trace`]: the W3C trace context in and out, so that one request is
//!   one trace across processes;
//! * [`metrics`]: Prometheus families and the `/metrics` endpoint.

pub mod logging;
pub mod metrics;
pub mod otel;
pub mod trace;
pub mod traceparent;

pub use logging::{init, LogConfig, LogFormat, Telemetry};
pub use traceparent::{SpanId, TraceId, TraceParent, TRACEPARENT};

/// What can go wrong setting telemetry up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The log filter does not parse.
    #[error(
        "invalid log filter {0}; use tracing EnvFilter syntax, e.g. `info,openinfer_engine=debug`"
    )]
    Filter(String),
    /// The OTLP exporter cannot start.
    #[error("cannot start the OTLP trace exporter: {0}; check OTEL_EXPORTER_OTLP_ENDPOINT")]
    Exporter(String),
    /// A global subscriber is already installed.
    #[error("cannot install the log subscriber: {0}")]
    Install(String),
    /// A metric family cannot be registered (a duplicate name).
    #[error("cannot register a metric: {0}")]
    Metrics(String),
    /// The metrics port cannot be bound.
    #[error("cannot serve metrics on {0}")]
    Bind(String),
}
