//! The OpenInferencev2 worker: one engine thread that runs continuous batching, and the
//! `openinfer.worker.v1.Worker` gRPC service in front of it.
//!
//! * [`engine_loop`] owns the [`Engine`](openinfer_engine::Engine) on its own OS thread.
//! * [`service`] is the tonic service: `Info`, `Health` and one `Execute` stream per router.
//! * [`convert`] maps between wire messages and engine types.
//! * [`trace`] and [`metrics`] put each sequence in its request's trace and count the
//!   engine's work for Prometheus.

pub mod convert;
pub mod engine_loop;
pub mod metrics;
pub mod service;
pub mod trace;

pub use engine_loop::{EngineHandle, LoopConfig};
pub use service::WorkerService;

use std::net::SocketAddr;

use openinfer_proto::worker::v1::worker_server::WorkerServer;

/// Why the worker's server stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}; pick a free address with --listen")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Serves `service` on `addr` until `shutdown` resolves.
pub async fn serve(
    service: WorkerService,
    addr: SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })?;
    serve_on(service, listener, shutdown).await
}

/// Serves `service` on an already bound listener (lets tests and `--listen 127.0.0.1:0` learn
/// the port first).
pub async fn serve_on(
    service: WorkerService,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    // Small step messages must not wait for Nagle's algorithm.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(
            WorkerServer::new(service)
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
        )
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}
