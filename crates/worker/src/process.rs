//! A worker process's life, shared by `openinfer worker` and the worker inside `openinfer
//! serve`: warm up the engine before anyone can see it, serve `openinfer.worker.v1` with
//! `grpc.health.v1` saying where it is ([`Readiness`]), register in etcd once serving, and on
//! SIGTERM leave the registry first, finish or hand back what runs, then stop.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use openinfer_core::SequenceId;
use openinfer_engine::{Backend, EngineError, SequenceRequest};
use openinfer_registry::{EtcdConfig, Registration, WorkerRecord};
use tokio::net::TcpListener;

use crate::{EngineHandle, LoopConfig, Readiness, ServeError, WorkerService};

/// Why a worker process stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The engine failed to warm up or start.
    #[error("the engine did not start: {0}")]
    Engine(#[from] EngineError),
    /// The worker's metrics could not be registered.
    #[error(transparent)]
    Telemetry(#[from] openinfer_telemetry::TelemetryError),
    /// `--advertise-addr` is not an address.
    #[error("--advertise-addr `{0}` is not HOST:PORT or HOST (an IP address or a DNS name)")]
    Address(String),
    /// The gRPC server failed.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// The engine stopped (a tensor-parallel group lost a rank).
    #[error("{0}")]
    Failed(String),
    /// The drain could not finish.
    #[error("the drain failed: {0}")]
    Drain(String),
}

/// How the worker joins the cluster: `--registry`, `--advertise-addr`, `--group-id`,
/// `--lease-ttl`, `--drain-grace`.
#[derive(Debug, Clone)]
pub struct Membership {
    /// etcd (`None`: static membership; routers are told the address).
    pub registry: Option<EtcdConfig>,
    /// What routers dial: HOST:PORT, or HOST for the listen port.
    pub advertise: Option<String>,
    /// The group's id in the registry (default: HOSTNAME-PORT).
    pub group_id: Option<String>,
    /// Lifetime of the registry lease.
    pub lease_ttl: Duration,
    /// How long running sequences may take to finish on SIGTERM.
    pub drain_grace: Duration,
    /// A digest of the weights (see [`model_revision`]).
    pub revision: String,
}

/// Runs one short sequence through `engine` (first-use costs are paid before any client or
/// registry sees the worker), then starts the engine thread: its handle, and the thread,
/// which ends once every handle is dropped.
pub fn warm_up<E: Backend>(
    mut engine: E,
    cfg: LoopConfig,
) -> Result<(EngineHandle, std::thread::JoinHandle<()>), WorkerError> {
    let bos = engine.info().bos_token_id.unwrap_or(0);
    let mut req = SequenceRequest::greedy(SequenceId(u64::MAX), vec![bos], 1);
    req.stopping.ignore_eos = true;
    engine.add(req)?;
    while engine.has_work() {
        engine.step()?;
    }
    Ok(EngineHandle::spawn(engine, cfg)?)
}

/// Serves `handle` on `listener` until `shutdown` resolves or the engine fails: registers
/// once serving (when a registry is set), reports readiness, and drains on the way out. The
/// caller announces the address (the worker inside `openinfer serve` is not for clients).
pub async fn serve(
    handle: EngineHandle,
    listener: TcpListener,
    accept: openinfer_net::Accept,
    m: Membership,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WorkerError> {
    let addr = listener
        .local_addr()
        .map_err(|e| WorkerError::Failed(format!("the listener has no address: {e}")))?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (readiness, readiness_rx) = tokio::sync::watch::channel(Readiness::Starting);
    let server = tokio::spawn(crate::serve_on(
        WorkerService::new(handle.clone()),
        listener,
        accept,
        readiness_rx,
        async {
            let _ = stop_rx.await;
        },
    ));
    // Registered only now: the model is loaded and warmed up and the port is open.
    let mut registration = match &m.registry {
        Some(cfg) => {
            let record = record(&handle, &m, addr)?;
            tracing::info!(key = %record.key(), address = %record.address, "registering in etcd");
            Some(Registration::start(cfg.clone(), record, m.lease_ttl))
        }
        None => {
            readiness.send_replace(Readiness::Ready);
            None
        }
    };
    let mut shutdown = std::pin::pin!(shutdown);
    let failed = loop {
        tokio::select! {
            () = &mut shutdown => break None,
            reason = handle.failed() => break Some(reason),
            () = first_registration(&mut registration), if *readiness.borrow() == Readiness::Starting => {
                readiness.send_replace(Readiness::Ready);
            }
        }
    };
    readiness.send_replace(Readiness::Draining);
    // Leave the registry first, so that routers stop sending work (at once when the group
    // broke: routers resume its sequences elsewhere).
    if let Some(r) = registration {
        r.deregister().await;
    }
    if let Some(reason) = failed {
        return Err(WorkerError::Failed(reason));
    }
    // Then finish or hand back what runs.
    handle
        .drain(m.drain_grace)
        .await
        .map_err(|s| WorkerError::Drain(s.message().to_string()))?;
    tracing::info!("drained; stopping");
    let _ = stop_tx.send(());
    server
        .await
        .map_err(|e| WorkerError::Failed(format!("the server task panicked: {e}")))??;
    Ok(())
}

/// Resolves once `registration` has written its record the first time (never without one).
async fn first_registration(registration: &mut Option<Registration>) {
    match registration {
        Some(r) => r.registered().await,
        None => std::future::pending().await,
    }
}

/// The address routers dial: `advertise` (HOST:PORT, or HOST with the listen port), else the
/// listen address, or HOSTNAME:PORT when listening on every interface.
pub fn advertised(advertise: Option<&str>, listen: SocketAddr) -> Result<String, WorkerError> {
    let port = listen.port();
    let Some(given) = advertise.map(str::trim) else {
        return Ok(if listen.ip().is_unspecified() {
            format!("{}:{port}", hostname())
        } else {
            listen.to_string()
        });
    };
    let bare = given.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port).to_string());
    }
    if given.parse::<SocketAddr>().is_ok() {
        return Ok(given.to_string());
    }
    match given.rsplit_once(':') {
        None if !given.is_empty() => Ok(format!("{given}:{port}")),
        Some((host, p)) if !host.is_empty() && !host.contains(':') && p.parse::<u16>().is_ok() => {
            Ok(given.to_string())
        }
        _ => Err(WorkerError::Address(given.to_string())),
    }
}

/// This worker's registry record.
fn record(
    handle: &EngineHandle,
    m: &Membership,
    addr: SocketAddr,
) -> Result<WorkerRecord, WorkerError> {
    let info = handle.info();
    let kv = info.kv.unwrap_or_default();
    Ok(WorkerRecord {
        group_id: m
            .group_id
            .clone()
            .unwrap_or_else(|| format!("{}-{}", hostname(), addr.port())),
        address: advertised(m.advertise.as_deref(), addr)?,
        model: info.model.clone(),
        revision: m.revision.clone(),
        dtype: info.dtype.clone(),
        tp_size: info.tp_size,
        devices: vec![info.device.clone()],
        kv_blocks: kv.total_blocks,
        block_size: kv.block_size,
        max_running: info.max_running_sequences,
        max_model_len: info.max_model_len,
        version: info.version.clone(),
        labels: Default::default(),
    })
}

/// A digest of the model directory's config and weight files (names, sizes, config text):
/// workers with the same revision serve the same weights.
pub fn model_revision(dir: &Path) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x100_0000_01b3);
        }
    };
    eat(&std::fs::read(dir.join("config.json")).unwrap_or_default());
    let mut files: Vec<(String, u64)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let len = e.metadata().ok()?.len();
            name.ends_with(".safetensors").then_some((name, len))
        })
        .collect();
    files.sort();
    for (name, len) in files {
        eat(name.as_bytes());
        eat(&len.to_le_bytes());
    }
    format!("{h:016x}")
}

/// This host's name (`HOSTNAME`, else `/etc/hostname`, else `worker`).
pub fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".into())
}

/// A multi-threaded async runtime.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

/// Resolves when SIGINT or SIGTERM arrives.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGTERM");
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    tracing::info!("shutdown signal received");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_advertised_address_takes_the_listen_port_when_given_a_host() {
        let listen: SocketAddr = "0.0.0.0:50061".parse().unwrap();
        let adv = |s| advertised(Some(s), listen).unwrap();
        assert_eq!(adv("10.1.2.3"), "10.1.2.3:50061");
        assert_eq!(adv("10.1.2.3:7000"), "10.1.2.3:7000");
        assert_eq!(adv("fd00::7"), "[fd00::7]:50061");
        assert_eq!(adv("[fd00::7]"), "[fd00::7]:50061");
        assert_eq!(adv("[fd00::7]:7000"), "[fd00::7]:7000");
        assert_eq!(adv("worker-0.workers"), "worker-0.workers:50061");
        assert_eq!(adv("worker-0.workers:7000"), "worker-0.workers:7000");
        for bad in ["", "host:port", "a:b:c", ":7000"] {
            assert!(advertised(Some(bad), listen).is_err(), "{bad}");
        }
        let local: SocketAddr = "127.0.0.2:50061".parse().unwrap();
        assert_eq!(advertised(None, local).unwrap(), "127.0.0.2:50061");
        assert!(advertised(None, listen).unwrap().ends_with(":50061"));
    }
}
