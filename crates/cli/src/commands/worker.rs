//! `openinfer worker`.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use openinfer_core::SequenceId;
use openinfer_engine::tp::Communicator;
use openinfer_engine::{Backend, SequenceRequest, SimConfig, SimEngine};
use openinfer_worker::{EngineHandle, LoopConfig, Readiness, WorkerService};

use super::tp_group::Role;
use crate::args::{EngineArgs, EngineKind, WorkerArgs, WorkerLoopArgs};

pub fn run(a: WorkerArgs) -> anyhow::Result<()> {
    let registry = super::etcd_config(&a.registry)?;
    // A bad address fails now, not after the model has loaded.
    advertised(a.advertise_addr.as_deref(), a.listen)?;
    let revision = match (&a.model, a.engine.engine) {
        (Some(dir), EngineKind::Model) => model_revision(dir),
        _ => "sim".to_string(),
    };
    let group = match super::tp_group::role(&a)? {
        Role::Whole => None,
        Role::Supervisor => return super::tp_group::supervise(&a),
        Role::Rank(rank) => {
            let comm = super::tp_group::join(&a, rank, registry.as_ref())?;
            if rank > 0 {
                return super::tp_group::follow(&a, comm);
            }
            Some(comm)
        }
    };
    let metrics = prometheus::Registry::new();
    let (handle, engine_thread) = start_engine(
        a.model.as_deref(),
        &a.engine,
        &a.worker,
        group,
        metrics.clone(),
    )?;
    let served = super::runtime()?.block_on(async move {
        let listener = super::bind(a.listen).await?;
        let addr = listener.local_addr()?;
        tracing::info!(%addr, model = %handle.info().model, "worker serving openinfer.worker.v1");
        super::serve_metrics(&a.metrics, super::WORKER_METRICS, metrics).await?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (readiness, readiness_rx) = tokio::sync::watch::channel(Readiness::Starting);
        let server = tokio::spawn(openinfer_worker::serve_on(
            WorkerService::new(handle.clone()),
            listener,
            readiness_rx,
            async {
                let _ = stop_rx.await;
            },
        ));
        // Registered only now: the model is loaded and warmed up and the port is open.
        let mut registration = match registry {
            Some(cfg) => {
                let record = record(&a, &handle, addr, revision)?;
                tracing::info!(key = %record.key(), address = %record.address, "registering in etcd");
                Some(openinfer_registry::Registration::start(
                    cfg,
                    record,
                    a.lease_ttl,
                ))
            }
            None => {
                readiness.send_replace(Readiness::Ready);
                None
            }
        };
        let mut signal = std::pin::pin!(super::shutdown_signal());
        let failed = loop {
            tokio::select! {
                () = &mut signal => break None,
                reason = handle.failed() => break Some(reason),
                () = first_registration(&mut registration), if *readiness.borrow() == Readiness::Starting => {
                    readiness.send_replace(Readiness::Ready);
                }
            }
        };
        readiness.send_replace(Readiness::Draining);
        if let Some(reason) = failed {
            // The group broke: leave the registry at once; routers resume the sequences.
            if let Some(r) = registration {
                r.deregister().await;
            }
            anyhow::bail!("{reason}");
        }
        // Drain: leave the registry first, so that routers stop sending work, then finish or
        // hand back what runs.
        if let Some(r) = registration {
            r.deregister().await;
        }
        handle.drain(a.drain_grace).await?;
        tracing::info!("drained; stopping");
        let _ = stop_tx.send(());
        server.await??;
        anyhow::Ok(())
    });
    // Every handle is gone with the runtime: the engine thread ends, and in a group rank 0's
    // engine tells the other ranks to stop before this process exits.
    let _ = engine_thread.join();
    served
}

/// Resolves once `registration` has written its record the first time (never without one).
async fn first_registration(registration: &mut Option<openinfer_registry::Registration>) {
    match registration {
        Some(r) => r.registered().await,
        None => std::future::pending().await,
    }
}

/// The address routers dial: `--advertise-addr` (HOST:PORT, or HOST with the listen port),
/// else the listen address, or HOSTNAME:PORT when listening on every interface.
fn advertised(advertise: Option<&str>, listen: SocketAddr) -> anyhow::Result<String> {
    let port = listen.port();
    let Some(given) = advertise.map(str::trim) else {
        return Ok(if listen.ip().is_unspecified() {
            format!("{}:{port}", super::hostname())
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
        _ => anyhow::bail!(
            "--advertise-addr `{given}` is not HOST:PORT or HOST (an IP address or a DNS name)"
        ),
    }
}

/// This worker's registry record.
fn record(
    a: &WorkerArgs,
    handle: &EngineHandle,
    addr: SocketAddr,
    revision: String,
) -> anyhow::Result<openinfer_registry::WorkerRecord> {
    let info = handle.info();
    let host = super::hostname();
    let address = advertised(a.advertise_addr.as_deref(), addr)?;
    let kv = info.kv.unwrap_or_default();
    Ok(openinfer_registry::WorkerRecord {
        group_id: a
            .group_id
            .clone()
            .unwrap_or_else(|| format!("{host}-{}", addr.port())),
        address,
        model: info.model.clone(),
        revision,
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
fn model_revision(dir: &Path) -> String {
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

/// Loads the model (or sets up the sim engine) and starts the engine thread; its handle, and
/// the thread, which ends once every handle is dropped.
pub fn start_engine(
    model: Option<&Path>,
    engine: &EngineArgs,
    worker: &WorkerLoopArgs,
    group: Option<Arc<dyn Communicator>>,
    metrics: prometheus::Registry,
) -> anyhow::Result<(EngineHandle, std::thread::JoinHandle<()>)> {
    let cfg = LoopConfig {
        command_queue: worker.command_queue,
        connection_buffer: worker.connection_buffer,
        model_name: engine.served_model_name.clone(),
        registry: Some(metrics),
    };
    let handle = match engine.engine {
        EngineKind::Model => {
            let model = model.context("--model DIR is required (or --engine sim)")?;
            spawn_warm(super::load_engine(model, engine, group)?, cfg)?
        }
        EngineKind::Sim => {
            let sim = SimEngine::new(SimConfig {
                model: engine
                    .served_model_name
                    .clone()
                    .unwrap_or_else(|| "sim".into()),
                step_time: engine.sim_step_time,
                total_blocks: engine.sim_kv_blocks,
                block_size: engine.block_size,
                max_running: engine.max_running,
                max_waiting: engine.max_waiting,
                max_model_len: engine.max_model_len.unwrap_or(4096),
                ..SimConfig::default()
            })?;
            tracing::info!(step_time = ?engine.sim_step_time, "sim engine: no model, fixed step time");
            spawn_warm(sim, cfg)?
        }
    };
    Ok(handle)
}

/// Runs one short sequence through the engine (first-use costs are paid before any client
/// or registry sees the worker), then starts the engine thread.
fn spawn_warm<E: Backend>(
    mut engine: E,
    cfg: LoopConfig,
) -> anyhow::Result<(EngineHandle, std::thread::JoinHandle<()>)> {
    let bos = engine.info().bos_token_id.unwrap_or(0);
    let mut req = SequenceRequest::greedy(SequenceId(u64::MAX), vec![bos], 1);
    req.stopping.ignore_eos = true;
    engine.add(req).context("warm-up")?;
    while engine.has_work() {
        engine.step().context("warm-up step")?;
    }
    Ok(EngineHandle::spawn(engine, cfg)?)
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
