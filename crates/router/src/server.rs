//! Assembles the router: scheduler task, worker links, and the gRPC server with the
//! `Inference` service, `grpc.health.v1.Health` and server reflection (v1 and v1alpha).

use std::sync::{Arc, Mutex};

use openinfer_proto::v1::inference_server::InferenceServer;
use openinfer_registry::Change;
use openinfer_telemetry::TelemetryError;
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tonic_health::ServingStatus;

use crate::config::RouterConfig;
use crate::metrics::RouterMetrics;
use crate::models::ModelTable;
use crate::scheduler::{self, SchedulerHandle};
use crate::service::InferenceService;
use crate::tenants::{Quotas, Tenants, TenantsError};
use crate::worker_link;
use openinfer_net::{ClientPems, Reloading};

/// Largest message the router sends a client (a unary answer of a long generation).
const MESSAGE_CEILING: usize = 64 << 20;

/// Why the router could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Its metrics could not be registered.
    #[error(transparent)]
    Telemetry(#[from] TelemetryError),
    /// Its tenants file was refused.
    #[error(transparent)]
    Tenants(#[from] TenantsError),
    /// Its TLS files were refused.
    #[error(transparent)]
    Tls(#[from] openinfer_net::TlsError),
    /// A setting is out of its range.
    #[error("{0}")]
    Config(String),
}

/// Why the router's server stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The gRPC server failed.
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// Reflection could not be built from the descriptor set (a build bug).
    #[error("server reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// Keeps one worker linked; dropping it unlinks the worker.
pub struct WorkerLink {
    _stop: oneshot::Sender<()>,
}

/// A running router core: scheduler plus worker links.
pub struct Router {
    cfg: Arc<RouterConfig>,
    models: ModelTable,
    scheduler: SchedulerHandle,
    serving: watch::Receiver<bool>,
    metrics: Arc<RouterMetrics>,
    tenants: Tenants,
    quotas: Arc<Mutex<Quotas>>,
    /// TLS of the public endpoint, as in force now.
    tls: Option<Reloading<rustls::ServerConfig>>,
    /// The same files for the HTTP API (HTTP/1.1 by ALPN).
    http_tls: Option<Reloading<rustls::ServerConfig>>,
    /// TLS towards workers, as in force now.
    worker_tls: Option<Reloading<ClientPems>>,
}

/// What requests still in flight when the drain times out are told (`UNAVAILABLE`).
const SHUTTING_DOWN: &str = "router shutting down; retry";

/// How long connections may take to close once every request has ended.
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

impl Router {
    /// Starts the scheduler, with its metrics on `registry`, and follows the tenants file
    /// when one is configured. Workers are added with [`Router::add_worker`].
    pub fn start(cfg: RouterConfig, registry: &Registry) -> Result<Router, StartError> {
        for (flag, w) in [
            ("--fair-input-weight", cfg.fair_input_weight),
            ("--fair-output-weight", cfg.fair_output_weight),
            ("--cache-balance-slack", cfg.cache_balance_slack),
        ] {
            if !(w.is_finite() && w >= 0.0) {
                return Err(StartError::Config(format!(
                    "{flag} must be a number of at least 0, not {w}"
                )));
            }
        }
        let cfg = Arc::new(cfg);
        let metrics = Arc::new(RouterMetrics::new(registry)?);
        let quotas = Arc::new(Mutex::new(Quotas::new(std::time::Instant::now())));
        let tenants = match &cfg.tenants_file {
            None => {
                metrics.tenant_known(crate::tenants::ANONYMOUS);
                Tenants::open()
            }
            Some(path) => {
                let directory = crate::tenants::file::load(path)?;
                for t in directory.tenants() {
                    metrics.tenant_known(&t.name);
                }
                let tenants = Tenants::with(directory);
                crate::tenants::reload::follow(
                    path.clone(),
                    tenants.clone(),
                    quotas.clone(),
                    metrics.clone(),
                );
                tenants
            }
        };
        let models = ModelTable::default();
        let (serving_tx, serving) = watch::channel(false);
        let scheduler = scheduler::spawn(cfg.clone(), models.clone(), serving_tx, metrics.clone());
        let tls = cfg
            .tls
            .clone()
            .map(|f| f.follow("public TLS"))
            .transpose()?;
        let http_tls = cfg
            .tls
            .clone()
            .map(|f| f.follow_with_alpn("HTTP API TLS", openinfer_net::ALPN_HTTP1))
            .transpose()?;
        let worker_tls = cfg
            .worker_tls
            .clone()
            .map(|f| f.follow("worker TLS"))
            .transpose()?;
        Ok(Router {
            cfg,
            models,
            scheduler,
            serving,
            metrics,
            tenants,
            quotas,
            tls,
            http_tls,
            worker_tls,
        })
    }

    /// Keeps a link to the worker at `addr` (reconnecting as needed) while the returned
    /// handle lives; dropping it removes the worker (its sequences resume elsewhere).
    pub fn add_worker(&self, addr: String) -> WorkerLink {
        let (stop, stopped) = oneshot::channel();
        tokio::spawn(worker_link::run(
            addr,
            self.worker_tls.clone(),
            self.scheduler.sender(),
            self.cfg.worker_queue,
            stopped,
        ));
        WorkerLink { _stop: stop }
    }

    /// Follows registry changes (from [`openinfer_registry::etcd::discover`]): a worker is
    /// linked when its record appears and dropped when it goes. Runs until `changes` closes.
    pub fn follow_registry(
        &self,
        mut changes: mpsc::Receiver<Change>,
    ) -> tokio::task::JoinHandle<()> {
        let router = self.clone_handles();
        tokio::spawn(async move {
            // Per registry key: the worker's address, its model and its link.
            let mut links: std::collections::HashMap<String, (String, String, WorkerLink)> =
                std::collections::HashMap::new();
            while let Some(change) = changes.recv().await {
                match change {
                    Change::Up { key, record } => {
                        if links
                            .get(&key)
                            .is_some_and(|(addr, _, _)| *addr == record.address)
                        {
                            continue;
                        }
                        tracing::info!(%key, address = %record.address, model = %record.model, "worker registered");
                        router
                            .metrics
                            .registrations
                            .with_label_values(&[record.model.as_str(), "up"])
                            .inc();
                        let link = router.add_worker(record.address.clone());
                        links.insert(key, (record.address, record.model, link));
                    }
                    Change::Down { key } => {
                        // The model as its record named it (model ids may contain `/`).
                        if let Some((_, model, _)) = links.remove(&key) {
                            tracing::info!(%key, %model, "worker deregistered");
                            router
                                .metrics
                                .registrations
                                .with_label_values(&[model.as_str(), "down"])
                                .inc();
                        }
                    }
                    Change::Reachable(up) => {
                        router
                            .metrics
                            .registry_up
                            .with_label_values::<&str>(&[])
                            .set(up.into());
                    }
                }
            }
        })
    }

    fn clone_handles(&self) -> Router {
        Router {
            cfg: self.cfg.clone(),
            models: self.models.clone(),
            scheduler: self.scheduler.clone(),
            serving: self.serving.clone(),
            metrics: self.metrics.clone(),
            tenants: self.tenants.clone(),
            quotas: self.quotas.clone(),
            tls: self.tls.clone(),
            http_tls: self.http_tls.clone(),
            worker_tls: self.worker_tls.clone(),
        }
    }

    /// The models known now.
    pub fn models(&self) -> &ModelTable {
        &self.models
    }

    /// Serves the public gRPC API on `listener`, and the OpenAI-compatible HTTP API on `http`
    /// when given, until `shutdown` resolves; then stops admitting (health turns
    /// NOT_SERVING) and lets in-flight requests finish.
    pub async fn serve_on(
        self,
        listener: TcpListener,
        http: Option<TcpListener>,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let (reporter, health) = tonic_health::server::health_reporter();
        let reflection = |b: tonic_reflection::server::Builder<'static>| {
            b.register_encoded_file_descriptor_set(openinfer_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 =
            reflection(tonic_reflection::server::Builder::configure()).build_v1()?;
        let reflection_v1alpha =
            reflection(tonic_reflection::server::Builder::configure()).build_v1alpha()?;

        tokio::spawn(return_freed_memory());
        let mut serving = self.serving.clone();
        tokio::spawn(async move {
            loop {
                let status = if *serving.borrow_and_update() {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                };
                for name in ["", "openinfer.v1.Inference"] {
                    reporter.set_service_status(name, status).await;
                }
                if serving.changed().await.is_err() {
                    return;
                }
            }
        });

        let service = InferenceService::new(
            self.scheduler.clone(),
            self.models.clone(),
            self.cfg.clone(),
            self.metrics.clone(),
            self.tenants.clone(),
            self.quotas.clone(),
        );
        let (http_stop, http_stopped) = watch::channel(false);
        let http = http.map(|listener| {
            let refused = self.metrics.connections_refused.clone();
            let mut stopped = http_stopped;
            tokio::spawn(crate::openai::serve(
                listener,
                openinfer_net::Accept {
                    tls: self.http_tls.clone(),
                    max_connections: self.cfg.max_connections,
                    handshake_timeout: self.cfg.handshake_timeout,
                    open: Some(self.metrics.connections_open.clone()),
                },
                move || refused.inc(),
                crate::openai::routes(service.clone(), self.serving.clone()),
                self.cfg.max_header_bytes as usize,
                async move {
                    let _ = stopped.wait_for(|s| *s).await;
                },
                CLOSE_GRACE,
            ))
        });
        let scheduler = self.scheduler.clone();
        let drain_timeout = self.cfg.drain_timeout;
        let (drained_tx, drained) = tokio::sync::oneshot::channel::<()>();
        let shutdown = async move {
            shutdown.await;
            tracing::info!(
                "draining: health NOT_SERVING, new requests refused; waiting for in-flight ones"
            );
            scheduler.drain().await;
            if tokio::time::timeout(drain_timeout, scheduler.idle())
                .await
                .is_err()
            {
                tracing::warn!(
                    ?drain_timeout,
                    "drain timeout: ending the requests still in flight with UNAVAILABLE"
                );
                scheduler.abort(SHUTTING_DOWN).await;
            }
            let _ = drained_tx.send(());
            let _ = http_stop.send(true);
        };
        let cfg = self.cfg.clone();
        let refused = self.metrics.connections_refused.clone();
        let incoming = openinfer_net::incoming(
            listener,
            openinfer_net::Accept {
                tls: self.tls.clone(),
                max_connections: cfg.max_connections,
                handshake_timeout: cfg.handshake_timeout,
                open: Some(self.metrics.connections_open.clone()),
            },
            move || refused.inc(),
        );
        let mut builder = tonic::transport::Server::builder();
        if let Some(age) = cfg.max_connection_age {
            // No grace: a stream in flight is never cut, only new ones go elsewhere.
            builder = builder.max_connection_age(age);
        }
        let server = builder
            .max_concurrent_streams(cfg.max_concurrent_streams)
            .http2_max_header_list_size(cfg.max_header_bytes)
            .http2_keepalive_interval(Some(cfg.keepalive_interval))
            .http2_keepalive_timeout(Some(cfg.keepalive_timeout))
            .layer(tower::util::MapResponseLayer::new(move |r| {
                over_limit(r, &cfg)
            }))
            .add_service(
                // A message over --max-request-bytes is refused before it is decoded.
                InferenceServer::new(service)
                    .max_decoding_message_size(self.cfg.max_request_bytes)
                    .max_encoding_message_size(MESSAGE_CEILING),
            )
            .add_service(health)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .serve_with_incoming_shutdown(incoming, shutdown);
        tokio::pin!(server);
        let mut drained = drained;
        tokio::select! {
            served = &mut server => return Ok(served?),
            Ok(()) = &mut drained => {}
        }
        // Every request has ended. A connection whose client does not read can hold its last
        // messages (and the graceful close) forever: it gets CLOSE_GRACE, then it is dropped.
        match tokio::time::timeout(CLOSE_GRACE, &mut server).await {
            Ok(served) => served?,
            Err(_) => tracing::warn!(
                grace = ?CLOSE_GRACE,
                "connections still open after the drain; closing them"
            ),
        }
        if let Some(http) = http {
            let _ = http.await;
        }
        Ok(())
    }
}

/// How often the router hands memory freed by ended streams back to the system.
const TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// glibc keeps what thousands of ended streams freed in its arenas, so the router's resident
/// memory would stay at its peak after a burst; trimming hands it back (a few milliseconds,
/// off the request path).
async fn return_freed_memory() {
    let mut tick = tokio::time::interval(TRIM_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim only releases free memory of the allocator's own arenas; it
        // touches no memory this program holds.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

/// tonic refuses a message over `--max-request-bytes` before decoding it, with
/// `OUT_OF_RANGE`; clients get the documented answer to an oversized request instead
/// (`INVALID_ARGUMENT` naming `--max-request-bytes`).
fn over_limit(
    response: http::Response<tonic::body::Body>,
    cfg: &RouterConfig,
) -> http::Response<tonic::body::Body> {
    let oversized = response
        .extensions()
        .get::<tonic::Status>()
        .is_some_and(|s| {
            s.code() == tonic::Code::OutOfRange
                && s.message()
                    .starts_with("Error, decoded message length too large")
        });
    if !oversized {
        return response;
    }
    tonic::Status::from(crate::validate::over_limit(cfg)).into_http()
}
