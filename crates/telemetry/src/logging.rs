//! The process's `tracing` subscriber: log lines on stderr (text, or one JSON object per
//! line), and OpenTelemetry export when the environment configures it.
//!
//! JSON lines carry `trace_id` and `request_id` at the top level whenever the event happens
//! inside a request's span (router or worker), so that a log search by either finds every
//! line of a request.

use std::io::IsTerminal;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::{LookupSpan, SpanRef};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

use crate::otel::Exporter;
use crate::TelemetryError;

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// What to log and how.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// `EnvFilter` directives, e.g. `info,openinfer_engine=debug`.
    pub filter: String,
    /// Line format.
    pub format: LogFormat,
    /// The service name spans are exported under unless `OTEL_SERVICE_NAME` says otherwise.
    pub service: String,
}

/// Keeps the exporter alive; dropping it flushes the last spans.
#[must_use = "dropping the guard stops span export"]
pub struct Telemetry {
    _exporter: Option<Exporter>,
}

/// The crates whose spans are exported (at `info` and above), whatever the log filter says.
const TRACED_CRATES: [&str; 3] = ["openinfer_router", "openinfer_worker", "openinfer_engine"];

/// Installs the global subscriber. Fails on a bad filter, an exporter that cannot start, or a
/// second call.
pub fn init(cfg: &LogConfig) -> Result<Telemetry, TelemetryError> {
    let filter = EnvFilter::try_new(&cfg.filter)
        .map_err(|e| TelemetryError::Filter(format!("`{}`: {e}", cfg.filter)))?;
    let (text, json) = match cfg.format {
        LogFormat::Text => (
            Some(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_filter(filter),
            ),
            None,
        ),
        LogFormat::Json => (
            None,
            Some(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .event_format(JsonLines)
                    .with_filter(filter),
            ),
        ),
    };
    let (exporter, otel) = match Exporter::from_env(&cfg.service)? {
        Some((exporter, tracer)) => {
            let targets = TRACED_CRATES
                .iter()
                .fold(Targets::new(), |t, c| t.with_target(*c, LevelFilter::INFO));
            let layer = tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_threads(false)
                .with_location(false)
                .with_tracked_inactivity(false)
                .with_filter(targets);
            (Some(exporter), Some(layer))
        }
        None => (None, None),
    };
    let ids = json.is_some().then_some(RequestIdsLayer);
    tracing_subscriber::registry()
        .with(ids)
        .with(text)
        .with(json)
        .with(otel)
        .try_init()
        .map_err(|e| TelemetryError::Install(e.to_string()))?;
    Ok(Telemetry {
        _exporter: exporter,
    })
}

/// The request a span belongs to, kept in the span's extensions for the JSON formatter.
#[derive(Debug, Default, Clone)]
struct RequestIds {
    trace_id: Option<String>,
    request_id: Option<String>,
}

impl Visit for RequestIds {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "trace_id" => self.trace_id = Some(value.to_string()),
            "request_id" => self.request_id = Some(value.to_string()),
            _ => {}
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if matches!(field.name(), "trace_id" | "request_id") {
            self.record_str(field, &format!("{value:?}"));
        }
    }
}

/// Remembers the `trace_id` and `request_id` fields of every span.
struct RequestIdsLayer;

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for RequestIdsLayer {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            remember(&span, |ids| attrs.record(ids));
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            remember(&span, |ids| values.record(ids));
        }
    }
}

/// Adds what `record` finds to `span`'s ids; a span that names neither id keeps none.
fn remember<S: for<'a> LookupSpan<'a>>(
    span: &SpanRef<'_, S>,
    record: impl FnOnce(&mut RequestIds),
) {
    let mut ext = span.extensions_mut();
    if let Some(ids) = ext.get_mut::<RequestIds>() {
        record(ids);
        return;
    }
    let mut ids = RequestIds::default();
    record(&mut ids);
    if ids.trace_id.is_some() || ids.request_id.is_some() {
        ext.insert(ids);
    }
}

/// One JSON object per event: `timestamp`, `level`, `target`, the event's fields (`message`
/// among them), `trace_id` / `request_id` of the enclosing request, and `spans` (outermost
/// first).
struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let mut obj = Map::new();
        let mut ts = String::new();
        SystemTime.format_time(&mut Writer::new(&mut ts))?;
        obj.insert("timestamp".into(), ts.into());
        let meta = event.metadata();
        obj.insert("level".into(), meta.level().as_str().into());
        obj.insert("target".into(), meta.target().into());
        event.record(&mut JsonFields(&mut obj));
        if let Some(scope) = ctx.event_scope() {
            let mut names = Vec::new();
            let mut ids = RequestIds::default();
            for span in scope {
                names.push(Value::from(span.name()));
                if let Some(found) = span.extensions().get::<RequestIds>() {
                    ids.trace_id = ids.trace_id.or_else(|| found.trace_id.clone());
                    ids.request_id = ids.request_id.or_else(|| found.request_id.clone());
                }
            }
            names.reverse();
            if let Some(t) = ids.trace_id {
                obj.insert("trace_id".into(), t.into());
            }
            if let Some(r) = ids.request_id {
                obj.insert("request_id".into(), r.into());
            }
            obj.insert("spans".into(), Value::Array(names));
        }
        writeln!(writer, "{}", Value::Object(obj))
    }
}

/// Writes an event's fields into a JSON object.
struct JsonFields<'a>(&'a mut Map<String, Value>);

impl Visit for JsonFields<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }
}
