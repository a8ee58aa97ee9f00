//! OpenTelemetry trace export over OTLP/gRPC, configured by the standard `OTEL_*` variables.
//!
//! * `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`): where spans go.
//!   Unset (or `OTEL_SDK_DISABLED=true`, or `OTEL_TRACES_EXPORTER=none`): export is off and
//!   no OpenTelemetry layer is installed at all.
//! * `OTEL_SERVICE_NAME`: the service name (default: the component's, e.g. `openinfer-router`);
//!   `OTEL_RESOURCE_ATTRIBUTES` adds resource attributes.
//! * `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`: the sampler (default
//!   `parentbased_always_on`, so a client's sampling decision in `traceparent` is kept).
//! * `OTEL_BSP_*` tune the batch span processor; `OTEL_EXPORTER_OTLP_TIMEOUT`,
//!   `OTEL_EXPORTER_OTLP_HEADERS` and the rest are read by `opentelemetry-otlp`. An `https://`
//!   endpoint (or one without a scheme) is reached over TLS, trusting the system's roots.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{SdkTracerProvider, Tracer};
use opentelemetry_sdk::Resource;

use crate::TelemetryError;

static EXPORTING: AtomicBool = AtomicBool::new(false);

/// True once spans are exported (an OTLP endpoint is configured and the layer installed).
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Whether the environment asks for trace export.
pub fn configured() -> bool {
    let set = |k: &str| std::env::var(k).is_ok_and(|v| !v.trim().is_empty());
    let is = |k: &str, v: &str| std::env::var(k).is_ok_and(|x| x.trim().eq_ignore_ascii_case(v));
    (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        && !is("OTEL_SDK_DISABLED", "true")
        && !is("OTEL_TRACES_EXPORTER", "none")
}

/// The running exporter. Dropping it flushes the spans still buffered and stops it.
pub struct Exporter {
    provider: SdkTracerProvider,
    // The gRPC channel's connection tasks run here, so that export works from the batch
    // processor's own thread whatever runtime (if any) the rest of the process uses.
    runtime: Option<tokio::runtime::Runtime>,
}

impl Exporter {
    /// Starts the exporter the environment describes; `None` when export is off.
    pub fn from_env(default_service: &str) -> Result<Option<(Exporter, Tracer)>, TelemetryError> {
        if !configured() {
            return Ok(None);
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("openinfer-otlp")
            .enable_all()
            .build()
            .map_err(|e| TelemetryError::Exporter(format!("cannot start its runtime: {e}")))?;
        let exporter = {
            let _enter = runtime.enter();
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .build()
                .map_err(|e| TelemetryError::Exporter(e.to_string()))?
        };
        let service_set = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.is_empty());
        let mut resource = Resource::builder();
        if !service_set {
            resource = resource.with_service_name(default_service.to_string());
        }
        let resource = resource
            .with_attribute(opentelemetry::KeyValue::new(
                "service.version",
                env!("CARGO_PKG_VERSION"),
            ))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("openinfer");
        EXPORTING.store(true, Ordering::Relaxed);
        Ok(Some((
            Exporter {
                provider,
                runtime: Some(runtime),
            },
            tracer,
        )))
    }
}

/// How long stopping waits for the last spans to reach the collector: an unreachable one must
/// not hold up a process that was asked to stop.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(3);

impl Drop for Exporter {
    fn drop(&mut self) {
        EXPORTING.store(false, Ordering::Relaxed);
        if let Err(e) = self.provider.shutdown_with_timeout(FLUSH_TIMEOUT) {
            tracing::warn!(error = %e, "cannot flush the last spans to the OTLP endpoint");
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}
