//! Prometheus metrics: helpers to declare families on a [`Registry`], and the `/metrics`
//! HTTP endpoint (text exposition format 0.0.4) on its own port.

use std::net::SocketAddr;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::TelemetryError;

pub use prometheus::Registry as MetricsRegistry;

/// Seconds, for request-level latencies (queue time, time to first token, end to end).
pub const REQUEST_SECONDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// Seconds, for per-token and per-step latencies.
pub const STEP_SECONDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5,
];

/// Sequences per engine step.
pub const BATCH_SIZES: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// Declares metric families on a registry.
pub struct Families<'a>(pub &'a Registry);

impl Families<'_> {
    /// A counter family (`name` ends in `_total`).
    pub fn counter(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> Result<IntCounterVec, TelemetryError> {
        self.register(IntCounterVec::new(Opts::new(name, help), labels))
    }

    /// A gauge family.
    pub fn gauge(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> Result<IntGaugeVec, TelemetryError> {
        self.register(IntGaugeVec::new(Opts::new(name, help), labels))
    }

    /// A histogram family with `buckets` (upper bounds; `+Inf` is implied).
    pub fn histogram(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
        buckets: &[f64],
    ) -> Result<HistogramVec, TelemetryError> {
        let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
        self.register(HistogramVec::new(opts, labels))
    }

    fn register<M: prometheus::core::Collector + Clone + 'static>(
        &self,
        m: prometheus::Result<M>,
    ) -> Result<M, TelemetryError> {
        let m = m.map_err(|e| TelemetryError::Metrics(e.to_string()))?;
        self.0
            .register(Box::new(m.clone()))
            .map_err(|e| TelemetryError::Metrics(e.to_string()))?;
        Ok(m)
    }
}

/// The registry's metrics in the Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut buf = Vec::new();
    // Encoding into memory fails only on metric families the registry already refused.
    let _ = TextEncoder::new().encode(&registry.gather(), &mut buf);
    String::from_utf8(buf).unwrap_or_default()
}

/// Serves `GET /metrics` for `registry` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    registry: Registry,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let registry = registry.clone();
            async move {
                (
                    [(http::header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
                    render(&registry),
                )
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Binds the metrics listener. An address given explicitly must be free; the default one
/// (`explicit` = false) falls back to a free port with a warning, so that several services on
/// one host all start.
pub async fn bind(
    addr: SocketAddr,
    explicit: bool,
) -> Result<tokio::net::TcpListener, TelemetryError> {
    match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => Ok(l),
        Err(e) if !explicit => {
            let any = SocketAddr::new(addr.ip(), 0);
            let l = tokio::net::TcpListener::bind(any)
                .await
                .map_err(|e| TelemetryError::Bind(format!("{any}: {e}; set --metrics-listen")))?;
            tracing::warn!(wanted = %addr, error = %e, got = ?l.local_addr().ok(), "the default metrics port is taken; serving metrics on another port (set --metrics-listen)");
            Ok(l)
        }
        Err(e) => Err(TelemetryError::Bind(format!(
            "{addr}: {e}; pick a free address with --metrics-listen"
        ))),
    }
}
