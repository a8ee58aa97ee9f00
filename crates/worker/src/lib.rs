//! The OpenInferencev2 worker: one engine thread that runs continuous batching, and the
//! `openinfer.worker.v1.Worker` gRPC service in front of it.
//!
//! * [`engine_loop`] owns the [`Engine`](openinfer_engine::Engine) on its own OS thread.
//! * [`service`] is the tonic service: `Info`, `Health` and one `Execute` stream per router.
//! * [`convert`] maps between wire messages and engine types.
//! * [`trace`] and [`metrics`] put each sequence in its request's trace and count the
//!   engine's work for Prometheus.
//! * [`process`] is a worker process's life: warm-up, serving, registration, drain.
//! * [`group`] forms and supervises tensor-parallel groups (ranks in processes, on one host
//!   or several).

pub mod convert;
pub mod engine_loop;
pub mod group;
pub mod metrics;
pub mod process;
pub mod service;
pub mod trace;

pub use engine_loop::{EngineHandle, LoopConfig};
pub use service::WorkerService;

use openinfer_proto::worker::v1::worker_server::WorkerServer;

/// Why the worker's server stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The gRPC server failed.
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Where a worker is in its life, as its `grpc.health.v1` service reports it (Kubernetes
/// probes read it; docs/deploy.md).
///
/// | state | `""` (liveness) | `openinfer.worker.v1.Worker` (readiness) |
/// |---|---|---|
/// | [`Starting`](Readiness::Starting): warm, not yet in the registry | SERVING | NOT_SERVING |
/// | [`Ready`](Readiness::Ready): registered (or static) | SERVING | SERVING |
/// | [`Draining`](Readiness::Draining) | NOT_SERVING | NOT_SERVING |
///
/// The port opens only after the warm-up step, so a worker that answers at all has loaded
/// its model. Once registered it stays ready through etcd outages: it keeps serving the
/// routers it has (ARCHITECTURE §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// Warm, not yet registered.
    Starting,
    /// Registered, or static membership: routers may send work.
    Ready,
    /// Draining after SIGTERM.
    Draining,
}

/// The service name the readiness state is reported under.
pub const READINESS_SERVICE: &str = "openinfer.worker.v1.Worker";

/// Serves `service` on an already bound listener (lets tests and `--listen 127.0.0.1:0` learn
/// the port first) until `shutdown` resolves, with `grpc.health.v1` following `readiness`.
pub async fn serve_on(
    service: WorkerService,
    listener: tokio::net::TcpListener,
    accept: openinfer_net::Accept,
    mut readiness: tokio::sync::watch::Receiver<Readiness>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    use tonic_health::ServingStatus::{NotServing, Serving};
    let (reporter, health) = tonic_health::server::health_reporter();
    tokio::spawn(async move {
        loop {
            let state = *readiness.borrow_and_update();
            let alive = if state == Readiness::Draining {
                NotServing
            } else {
                Serving
            };
            let ready = if state == Readiness::Ready {
                Serving
            } else {
                NotServing
            };
            reporter.set_service_status("", alive).await;
            reporter.set_service_status(READINESS_SERVICE, ready).await;
            if readiness.changed().await.is_err() {
                return;
            }
        }
    });
    // Mutual TLS when configured; small step messages never wait for Nagle's algorithm.
    let incoming = openinfer_net::incoming(listener, accept, || {
        tracing::warn!("router connection refused: the worker's connection limit is reached")
    });
    tonic::transport::Server::builder()
        .add_service(
            WorkerServer::new(service)
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
        )
        .add_service(health)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}
