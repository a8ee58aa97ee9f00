//! Logs and traces: `--log` / `--log-format` choose what stderr shows; the standard `OTEL_*`
//! variables turn on OTLP trace export (see `openinfer_telemetry::otel`).

use openinfer_telemetry::{LogConfig, LogFormat as Format, Telemetry, TelemetryError};

use crate::args::{Command, LogArgs, LogFormat};

/// Installs the global subscriber; keep the guard for the life of the process (dropping it
/// flushes the last spans).
pub fn init(args: &LogArgs, command: &Command) -> Result<Telemetry, TelemetryError> {
    openinfer_telemetry::init(&LogConfig {
        filter: args.log.clone(),
        format: match args.log_format {
            LogFormat::Text => Format::Text,
            LogFormat::Json => Format::Json,
        },
        service: service_name(command).into(),
    })
}

/// The OpenTelemetry service name a command's spans carry unless `OTEL_SERVICE_NAME` is set.
fn service_name(command: &Command) -> &'static str {
    match command {
        Command::Router(_) => "openinfer-router",
        Command::Worker(_) => "openinfer-worker",
        _ => "openinfer",
    }
}
